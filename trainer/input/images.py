"""Encoded image bytes to the model's pixels: one function (`load`) shared by the training pipeline and the
exported serving graph, so that training and serving see bit-identical pixels.

`load` reads the JPEG header first and decodes a photo much larger than the target in the DCT domain
(`decode_jpeg(ratio=2|4|8)`, the largest ratio whose output still covers the target size): a phone photo
decodes ~1.5x faster than in full on this machine (entropy decoding, the same at every scale, is most of the
work; BUILD_NOTES.md). It turns a JPEG upright by its EXIF orientation tag (TensorFlow's
decoders ignore it; the tag is read in the graph, so the SavedModel does the same), resizes (bilinear,
antialiased, no crop) and rounds to uint8, so decoded images cost S*S*3 bytes wherever they are kept.

Contract of the decoded-pixels signature (`resize`/`resize_uint8` of a uint8 image): the caller's pixels are
taken as they are, already upright.
"""

import functools

import tensorflow as tf

# Formats tf.io.decode_image reads; the extension filter of folder sources.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")

# decode_jpeg's DCT-domain downscaling factors (libjpeg's scale 1/1, 1/2, 1/4, 1/8).
_JPEG_RATIOS = (1, 2, 4, 8)
# Bytes of a JPEG searched for its EXIF segment: it is the first (or, after JFIF, the second) segment, and a
# segment holds at most 64 KiB.
_EXIF_WINDOW = 1 << 16
# Bytes of EXIF's TIFF block read for its first directory (which follows its 8-byte header).
_TIFF_WINDOW = 1 << 10
# Entries of EXIF's first directory searched for the orientation tag: tags are sorted, and at most 9 standard
# tags (0x0100-0x0111) come before it.
_MAX_IFD_ENTRIES = 32
_ORIENTATION_TAG = 0x0112
# EXIF orientation 1..8 as (transpose, then flip up-down, then flip left-right): 6 is a phone held upright, its
# photo stored rotated 90 degrees counter-clockwise.
_ORIENTATIONS = ((False, False, False), (False, False, True), (False, True, True), (False, True, False),
                 (True, False, False), (True, False, True), (True, True, True), (True, True, False))


# Every function here is plain TensorFlow ops (no Python control flow on tensors): AutoGraph, which tf.data runs on
# each map function, need not parse and rewrite them (with data.py's map functions left alone too, data.load of 20
# files took 0.53-0.63 s of CPU instead of 1.02 s; BUILD_NOTES.md).
plain_graph = tf.autograph.experimental.do_not_convert


@plain_graph
def load(image_bytes: tf.Tensor, image_size: int) -> tf.Tensor:
  """Encoded JPEG/PNG/GIF/BMP/WebP bytes to uint8 RGB [image_size, image_size, 3], upright: THE pixels the model
  sees, in training and in serving."""
  return resize_uint8(_decode(_as_bytes(image_bytes), image_size), image_size)


@plain_graph
def decode(image_bytes: tf.Tensor) -> tf.Tensor:
  """Encoded bytes to uint8 RGB [H, W, 3] at full size, upright: gray and RGBA become RGB, a GIF its first frame."""
  return _decode(_as_bytes(image_bytes), None)


@plain_graph
def check(image_bytes: tf.Tensor) -> tf.Tensor:
  """Raises tf.errors.InvalidArgumentError when `load` cannot decode these bytes, at a fraction of its cost: the
  same path with a JPEG decoded at 1/8 scale. libjpeg reads every entropy-coded byte at any scale, so a JPEG that
  fails at one scale fails at all (330 of 330 truncated or corrupted JPEGs agreed, BUILD_NOTES.md).

  Returns that small image (uint8 [h, w, 3]): in a graph, what depends on it keeps the decode from being pruned.
  """
  return _decode(_as_bytes(image_bytes), 1)


@plain_graph
def header_size(image_bytes: tf.Tensor) -> tf.Tensor:
  """int64 [height, width] from the header of JPEG, PNG, GIF or BMP bytes, before anything is decoded (a
  decompression bomb is refused by its header); [0, 0] for other formats (decoding is then the check). A JPEG
  whose header cannot be read raises InvalidArgumentError, as decoding it would."""
  image_bytes = _as_bytes(image_bytes)
  head = tf.cast(tf.io.decode_raw(tf.strings.substr(image_bytes, 0, 32), tf.uint8, fixed_length=32), tf.int64)

  def read(start, count, big_endian):
    weights = tf.constant([256 ** i for i in range(count)][::-1 if big_endian else 1], tf.int64)
    return tf.reduce_sum(head[start:start + count] * weights)

  def starts(magic: bytes):
    return tf.equal(tf.strings.substr(image_bytes, 0, len(magic)), magic)

  # PNG: IHDR's width and height, big-endian, at 16; GIF: the screen's, little-endian, at 6; BMP: the DIB
  # header's at 18 (a negative height means top-down rows).
  bmp_height = read(22, 4, False)
  sizes = [(starts(b"\x89PNG\r\n\x1a\n"), tf.stack([read(20, 4, True), read(16, 4, True)])),
           (starts(b"GIF8"), tf.stack([read(8, 2, False), read(6, 2, False)])),
           (starts(b"BM"), tf.stack([tf.where(bmp_height >= 2 ** 31, 2 ** 32 - bmp_height, bmp_height),
                                     read(18, 4, False)]))]
  size = tf.zeros([2], tf.int64)
  for is_format, format_size in reversed(sizes):
    size = tf.where(is_format, format_size, size)
  return tf.cond(tf.io.is_jpeg(image_bytes),
                 lambda: tf.cast(tf.io.extract_jpeg_shape(image_bytes)[:2], tf.int64), lambda: size)


@plain_graph
def resize_uint8(image: tf.Tensor, image_size: int) -> tf.Tensor:
  """uint8 [H, W, 3] (or a batch [N, H, W, 3]) to uint8 [image_size, image_size, 3]: bilinear, no crop, rounded,
  antialiased when it shrinks.

  Without the antialiasing filter a PNG (or BMP, GIF, WebP) shrank by sampling 4 pixels of each output's
  neighbourhood, and aliased: the same photo as a JPEG (shrunk in the DCT first) and as a PNG differed by 9-15 of
  255 per pixel at 96 px on hymenoptera (ants 0.80 against bees 0.53); with it, by 2-4 (BUILD_NOTES.md)."""
  resized = tf.image.resize(image, (image_size, image_size), method="bilinear", antialias=True)
  return tf.cast(tf.round(resized), tf.uint8)  # Bilinear weights sum to 1: values stay within 0..255.


@plain_graph
def resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
  """`resize_uint8` as float32 (values 0..255, whole numbers), the model's input type."""
  return tf.cast(resize_uint8(image, image_size), tf.float32)


@plain_graph
def decode_and_resize(image_bytes: tf.Tensor, image_size: int) -> tf.Tensor:
  """`load` as float32 (values 0..255, whole numbers), the model's input type."""
  return tf.cast(load(image_bytes, image_size), tf.float32)


def _as_bytes(image_bytes) -> tf.Tensor:
  # A tensor, not Python bytes: a tf.function traces anew for every distinct Python value.
  return tf.convert_to_tensor(image_bytes, tf.string)


# One function call, not ~100 ops one at a time, where it runs eagerly (the file checks, 15x faster measured);
# inside a graph (tf.data, the SavedModel) it is a nested function like any other.
@functools.partial(tf.function, autograph=False)
def _decode(image_bytes: tf.Tensor, image_size: int | None) -> tf.Tensor:
  def jpeg():
    decoders = [functools.partial(tf.io.decode_jpeg, image_bytes, channels=3, ratio=ratio)
                for ratio in _JPEG_RATIOS]
    decoded = tf.switch_case(_jpeg_ratio_index(image_bytes, image_size), decoders) if image_size else decoders[0]()
    orientation = jpeg_orientation(image_bytes)
    # Most photos are stored upright: they skip the transpose and reverse (each a copy, ~10% of a decode).
    return tf.cond(orientation == 1, lambda: decoded, lambda: orient(decoded, orientation))

  def other():
    return tf.io.decode_image(image_bytes, channels=3, expand_animations=False, dtype=tf.uint8)

  image = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
  image.set_shape([None, None, 3])
  return image


def _jpeg_ratio_index(image_bytes: tf.Tensor, image_size: int) -> tf.Tensor:
  """Index in _JPEG_RATIOS of the largest ratio whose decoded image is still at least image_size on each side."""
  height_width = tf.io.extract_jpeg_shape(image_bytes)[:2]
  shortest = tf.reduce_min(height_width)
  # decode_jpeg's output side is ceil(side / ratio) >= side // ratio.
  return tf.reduce_sum(tf.cast(shortest // _JPEG_RATIOS[1:] >= image_size, tf.int32))


@plain_graph
def orient(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
  """Turns a decoded [H, W, C] image upright by its EXIF orientation (1..8; PIL's ImageOps.exif_transpose)."""
  # Data, not control flow (tf.cond/switch_case): a branch per orientation made every pipeline slow to build.
  transpose, flip_up_down, flip_left_right = tf.unstack(tf.gather(tf.constant(_ORIENTATIONS), orientation - 1))
  image = tf.transpose(image, tf.where(transpose, [1, 0, 2], [0, 1, 2]))
  return tf.reverse(image, tf.boolean_mask([0, 1], [flip_up_down, flip_left_right]))


@plain_graph
def jpeg_orientation(image_bytes: tf.Tensor) -> tf.Tensor:
  """The EXIF orientation tag (int32 1..8) of JPEG bytes; 1 when absent or unreadable (never an error)."""
  # EXIF's APP1 segment is its marker, 2 bytes of length, "Exif\0\0", then a TIFF block: found by that string
  # (one split, no loop in the graph), checked by the marker. Entropy-coded data escapes every 0xFF byte, so
  # nothing before the segment looks like its start. The raw split op: tf.strings.split's ragged result costs
  # more ops than the whole parse (it ran once per training image: 175 us of a 1.2 ms decode, BUILD_NOTES.md).
  window = tf.reshape(tf.strings.substr(image_bytes, 0, _EXIF_WINDOW), [1])
  parts = tf.raw_ops.StringSplitV2(input=window, sep=b"Exif\0\0", maxsplit=1).values
  before_length = tf.strings.length(parts[0])
  marker = tf.strings.substr(parts[0], tf.maximum(before_length - 4, 0), 2)
  found = (tf.size(parts) == 2) & (before_length >= 4) & tf.equal(marker, b"\xff\xe1")
  # The TIFF block's first bytes, then zeros: every read below stays inside it, so odd files never fail.
  tiff = tf.cast(tf.io.decode_raw(tf.strings.substr(parts[-1], 0, _TIFF_WINDOW), tf.uint8,
                                  fixed_length=_TIFF_WINDOW + 12 * _MAX_IFD_ENTRIES + 16), tf.int64)
  little_endian = tf.reduce_all(tiff[:2] == ord("I"))  # "II"; "MM" is big-endian.

  def number(digits):
    """The unsigned integers of the byte pairs or quads on the last axis of `digits`, in the file's byte order."""
    weights = tf.constant([256 ** i for i in range(digits.shape[-1])], tf.int64)
    return tf.reduce_sum(digits * tf.where(little_endian, weights, weights[::-1]), axis=-1)

  # The first directory: a 2-byte entry count, then 12-byte entries (tag, type, count, value).
  directory = tf.gather(tiff, tf.clip_by_value(number(tiff[4:8]), 0, _TIFF_WINDOW) +
                        tf.range(2 + 12 * _MAX_IFD_ENTRIES, dtype=tf.int64))
  count = number(directory[:2])
  entries = tf.reshape(directory[2:], [_MAX_IFD_ENTRIES, 12])
  tags_and_values = number(tf.reshape(tf.gather(entries, [0, 1, 8, 9], axis=1), [_MAX_IFD_ENTRIES, 2, 2]))
  is_orientation = ((tags_and_values[:, 0] == _ORIENTATION_TAG) &
                    (tf.range(_MAX_IFD_ENTRIES, dtype=tf.int64) < count))
  value = tf.gather(tags_and_values[:, 1], tf.argmax(tf.cast(is_orientation, tf.int32)))
  known = found & tf.reduce_any(is_orientation) & (value >= 1) & (value <= 8)
  return tf.cast(tf.where(known, value, 1), tf.int32)
