"""Encoded image bytes to the model's pixels: one function (`load`) shared by the training pipeline and the
exported serving graph, so that training and serving see bit-identical pixels.

`load` reads the JPEG header first and decodes a photo much larger than the target in the DCT domain
(`decode_jpeg(ratio=2|4|8)`, the largest ratio whose output still covers the target size): a 12 MP phone photo
decodes several times faster than in full. It turns a JPEG upright by its EXIF orientation tag (TensorFlow's
decoders ignore it; the tag is read in the graph, so the SavedModel does the same), resizes (bilinear, no crop)
and rounds to uint8, so decoded images cost S*S*3 bytes wherever they are kept.

Contract of the decoded-pixels signature (`resize`/`resize_uint8` of a uint8 image): the caller's pixels are
taken as they are, already upright.
"""

import functools

import tensorflow as tf

# Formats tf.io.decode_image reads; the extension filter of folder sources.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")

# decode_jpeg's DCT-domain downscaling factors (libjpeg's scale 1/1, 1/2, 1/4, 1/8).
_JPEG_RATIOS = (1, 2, 4, 8)
# Segments walked from the start of a JPEG looking for EXIF: it is the first (or, after JFIF, the second).
_MAX_JPEG_SEGMENTS = 16
# Entries of EXIF's first directory searched for the orientation tag: tags are sorted, and at most 9 standard
# tags (0x0100-0x0111) come before it.
_MAX_IFD_ENTRIES = 32
_ORIENTATION_TAG = 0x0112


def load(image_bytes: tf.Tensor, image_size: int) -> tf.Tensor:
  """Encoded JPEG/PNG/GIF/BMP/WebP bytes to uint8 RGB [image_size, image_size, 3], upright: THE pixels the model
  sees, in training and in serving."""
  return resize_uint8(_decode(image_bytes, image_size), image_size)


def decode(image_bytes: tf.Tensor) -> tf.Tensor:
  """Encoded bytes to uint8 RGB [H, W, 3] at full size, upright: gray and RGBA become RGB, a GIF its first frame."""
  return _decode(image_bytes, None)


def resize_uint8(image: tf.Tensor, image_size: int) -> tf.Tensor:
  """uint8 [H, W, 3] (or a batch [N, H, W, 3]) to uint8 [image_size, image_size, 3]: bilinear, no crop, rounded."""
  # ResizeBilinear reads uint8 directly (identical output): a float copy of the full-size image first costs time.
  resized = tf.image.resize(image, (image_size, image_size), method="bilinear")
  return tf.cast(tf.round(resized), tf.uint8)  # Bilinear weights sum to 1: values stay within 0..255.


def resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
  """`resize_uint8` as float32 (values 0..255, whole numbers), the model's input type."""
  return tf.cast(resize_uint8(image, image_size), tf.float32)


def decode_and_resize(image_bytes: tf.Tensor, image_size: int) -> tf.Tensor:
  """`load` as float32 (values 0..255, whole numbers), the model's input type."""
  return tf.cast(load(image_bytes, image_size), tf.float32)


def _decode(image_bytes: tf.Tensor, image_size: int | None) -> tf.Tensor:
  image_bytes = tf.convert_to_tensor(image_bytes, tf.string)

  def jpeg():
    decoders = [functools.partial(tf.io.decode_jpeg, image_bytes, channels=3, ratio=ratio)
                for ratio in _JPEG_RATIOS]
    decoded = tf.switch_case(_jpeg_ratio_index(image_bytes, image_size), decoders) if image_size else decoders[0]()
    return orient(decoded, jpeg_orientation(image_bytes))

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


def orient(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
  """Turns a decoded [H, W, C] image upright by its EXIF orientation (1..8; PIL's ImageOps.exif_transpose)."""
  transforms = [
      lambda: image,  # 1: upright.
      lambda: tf.image.flip_left_right(image),  # 2: mirrored.
      lambda: tf.image.rot90(image, 2),  # 3: upside down.
      lambda: tf.image.flip_up_down(image),  # 4: mirrored upside down.
      lambda: tf.image.transpose(image),  # 5: mirrored, rotated.
      lambda: tf.image.rot90(image, 3),  # 6: stored rotated 90 degrees counter-clockwise (phones held upright).
      lambda: tf.image.rot90(tf.image.transpose(image), 2),  # 7: the transverse of 5.
      lambda: tf.image.rot90(image, 1),  # 8: stored rotated 90 degrees clockwise.
  ]
  return tf.switch_case(orientation - 1, transforms)


def jpeg_orientation(image_bytes: tf.Tensor) -> tf.Tensor:
  """The EXIF orientation tag (int32 1..8) of JPEG bytes; 1 when absent or unreadable (never an error)."""
  tiff = _exif_tiff_offset(image_bytes)
  header = _bytes_at(image_bytes, tiff, 8)
  little_endian = tf.reduce_all(header[:2] == 0x49)  # "II"; "MM" is big-endian.

  def number(pieces, start, count):
    """Unsigned integer of `count` bytes at `start` of the last axis of `pieces`, in the file's byte order."""
    digits = pieces[..., start:start + count]
    weights = tf.constant([256 ** i for i in range(count)], tf.int64)
    return tf.reduce_sum(digits * tf.where(little_endian, weights, tf.reverse(weights, [0])), axis=-1)

  directory = tiff + number(header, 4, 4)
  count = number(_bytes_at(image_bytes, directory, 2), 0, 2)
  entries = tf.reshape(_bytes_at(image_bytes, directory + 2, 12 * _MAX_IFD_ENTRIES), [_MAX_IFD_ENTRIES, 12])
  is_orientation = (number(entries, 0, 2) == _ORIENTATION_TAG) & (tf.range(_MAX_IFD_ENTRIES, dtype=tf.int64) < count)
  value = tf.gather(number(entries, 8, 2), tf.argmax(tf.cast(is_orientation, tf.int32)))
  known = (tiff >= 0) & tf.reduce_any(is_orientation) & (value >= 1) & (value <= 8)
  return tf.cast(tf.where(known, value, 1), tf.int32)


def _exif_tiff_offset(image_bytes: tf.Tensor) -> tf.Tensor:
  """Offset (int64) of the TIFF header inside the JPEG's EXIF (APP1) segment, -1 when there is none."""
  length = tf.cast(tf.strings.length(image_bytes), tf.int64)
  exif_signature = tf.constant(list(b"Exif\0\0"), tf.int64)

  def walk(position, found, steps):
    head = _bytes_at(image_bytes, position, 10)  # Marker (FF xx), big-endian segment length, 6 bytes of data.
    marker, segment_length = head[1], head[2] * 256 + head[3]
    is_exif = (marker == 0xE1) & tf.reduce_all(head[4:] == exif_signature)
    # Image data (SOS), the end (EOI) or anything that is not a marker: EXIF comes before all of them.
    stop = (head[0] != 0xFF) | (marker == 0xDA) | (marker == 0xD9) | (segment_length < 2) | is_exif
    found = tf.where(is_exif, position + 10, found)
    return tf.where(stop, length, position + 2 + segment_length), found, steps + 1

  def more(position, found, steps):
    return (position + 4 <= length) & (steps < _MAX_JPEG_SEGMENTS)

  start = tf.constant(2, tf.int64)  # After the SOI marker.
  _, found, _ = tf.while_loop(more, walk, (start, tf.constant(-1, tf.int64), tf.constant(0)))
  return found


def _bytes_at(data: tf.Tensor, position: tf.Tensor, count: int) -> tf.Tensor:
  """`count` bytes of `data` from `position` as int64, zeros beyond either end: a short or odd file never fails."""
  length = tf.cast(tf.strings.length(data), tf.int64)
  piece = tf.strings.substr(data, tf.clip_by_value(position, 0, length), tf.constant(count, tf.int64))
  padded = tf.strings.substr(tf.strings.join([piece, b"\0" * count]), 0, count)
  return tf.cast(tf.io.decode_raw(padded, tf.uint8), tf.int64)
