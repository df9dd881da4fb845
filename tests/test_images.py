"""The one decode path (trainer.input.images): EXIF orientation like PIL, DCT-domain decoding of large JPEGs, uint8
pixels, and the training pipeline's pixels equal to the exported serving graph's, exactly."""

import io
import shutil
import struct

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import write_image
from PIL import Image, ImageOps

from export import saved_model
from trainer.config import Config
from trainer.input import data, images

# Phone photos of class 7 stored sideways with an EXIF orientation tag (see ../shared/README.md).
PHONE_PHOTOS = ("train/7/IMG_5874.JPG", "train/7/IMG_5978.JPG", "val/7/IMG_5935.JPG")
ORIENTATION = 0x0112


@pytest.fixture(scope="module")
def phone_photos(shared_dir):
  return [shared_dir / "datasets" / "sign_language_digits" / name for name in PHONE_PHOTOS]


def _pixels(height=16, width=24, seed=0) -> np.ndarray:
  """Noise: every rotation and mirror of it is a different image."""
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _jpeg(pixels: np.ndarray, exif: bytes = b"") -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, "JPEG", quality=95, exif=exif)
  return buffer.getvalue()


def _with_app1(jpeg: bytes, payload: bytes) -> bytes:
  """The JPEG with an APP1 segment holding `payload` right after its SOI marker."""
  return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def _exif_orientation(value: int, byte_order: str) -> bytes:
  """An EXIF APP1 payload holding only the orientation tag, in the given TIFF byte order ('<' II, '>' MM)."""
  tiff = (b"II*\0" if byte_order == "<" else b"MM\0*") + struct.pack(byte_order + "I", 8)
  directory = struct.pack(byte_order + "HHHIHHI", 1, ORIENTATION, 3, 1, value, 0, 0)
  return b"Exif\0\0" + tiff + directory


def _pil_upright(pixels: np.ndarray, orientation: int) -> np.ndarray:
  """PIL's ImageOps.exif_transpose of these pixels tagged with `orientation`."""
  image = Image.fromarray(pixels)
  image.getexif()[ORIENTATION] = orientation
  return np.asarray(ImageOps.exif_transpose(image))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_turned_upright_like_pil(orientation):
  tagged = Image.Exif()
  tagged[ORIENTATION] = orientation
  encoded = _jpeg(_pixels(), tagged.tobytes())
  stored = tf.io.decode_jpeg(encoded, channels=3).numpy()  # As stored: TensorFlow's decoder ignores the tag.
  np.testing.assert_array_equal(images.decode(encoded).numpy(), _pil_upright(stored, orientation))


@pytest.mark.parametrize("byte_order", ["<", ">"])
def test_orientation_is_read_in_either_tiff_byte_order(byte_order):
  encoded = _with_app1(_jpeg(_pixels()), _exif_orientation(8, byte_order))
  assert images.jpeg_orientation(tf.constant(encoded)).numpy() == 8


@pytest.mark.parametrize("payload", [b"Exif\0\0MM\0*\xff\xff\xff\xf0", b"Exif\0\0", b"Exif\0\0II*\0\x08\0\0\0\xff\xff",
                                     b"XMP data, not EXIF"])
def test_odd_or_truncated_exif_reads_as_upright_and_still_decodes(payload):
  pixels = _pixels()
  encoded = _with_app1(_jpeg(pixels), payload)
  assert images.jpeg_orientation(tf.constant(encoded)).numpy() == 1
  np.testing.assert_array_equal(images.decode(encoded).numpy(), tf.io.decode_jpeg(encoded, channels=3).numpy())


def test_phone_photos_are_upright_like_pil(phone_photos):
  for path in phone_photos:
    encoded = path.read_bytes()
    stored = tf.io.decode_jpeg(encoded, channels=3).numpy()
    with Image.open(path) as photo:
      orientation = photo.getexif()[ORIENTATION]
      pil = np.asarray(ImageOps.exif_transpose(photo).convert("RGB"), np.int16)
    assert orientation != 1, f"{path} is expected to be stored sideways"
    ours = images.decode(encoded).numpy()
    # Exact against PIL's transpose of the same decoded pixels (PIL's own decoder rounds a little differently).
    np.testing.assert_array_equal(ours, _pil_upright(stored, orientation))
    assert np.abs(ours - pil).mean() < 2, path
    assert np.abs(stored - pil).mean() > 20, f"{path}: sideways and upright should differ"
    # The model's pixels (DCT-domain decode, resize) are upright too.
    small = images.load(encoded, 32).numpy().astype(np.int16)
    pil_small = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB").resize((32, 32)), np.int16)
    pil_sideways = np.asarray(Image.open(path).convert("RGB").resize((32, 32)), np.int16)
    assert np.abs(small - pil_small).mean() < np.abs(small - pil_sideways).mean() / 4, path


@pytest.mark.parametrize("size,ratio", [(100, 8), (101, 4), (200, 4), (201, 2), (401, 1)])
def test_large_jpegs_decode_at_the_largest_ratio_that_still_covers_the_size(size, ratio):
  encoded = _jpeg(_pixels(800, 1000))  # Shortest side 800.
  expected = images.resize_uint8(tf.io.decode_jpeg(encoded, channels=3, ratio=ratio), size)
  np.testing.assert_array_equal(images.load(encoded, size).numpy(), expected.numpy())


def test_other_formats_decode_like_decode_image(tmp_path, shared_dir):
  for fmt, mode in [("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "L"), ("GIF", "P"), ("BMP", "RGB")]:
    encoded = write_image(tmp_path / f"image.{fmt.lower()}", (200, 90, 30), fmt=fmt, mode=mode).read_bytes()
    expected = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    np.testing.assert_array_equal(images.decode(encoded).numpy(), expected.numpy(), err_msg=f"{fmt} {mode}")
  bmp = (shared_dir / "images" / "cat.bmp").read_bytes()
  assert images.load(bmp, 32).shape == (32, 32, 3)


def test_model_pixels_are_rounded_uint8_and_the_float_form_holds_the_same_values(tmp_path):
  encoded = _jpeg(_pixels(40, 30))
  pixels = images.load(encoded, 16)
  assert pixels.dtype == tf.uint8 and pixels.shape == (16, 16, 3)
  np.testing.assert_array_equal(images.decode_and_resize(encoded, 16).numpy(), pixels.numpy().astype(np.float32))
  # Bilinear resizing (antialiased) of the full decode gives fractions; the model gets them rounded.
  unrounded = tf.image.resize(images.decode(encoded), (16, 16), antialias=True).numpy()
  assert np.any(unrounded != np.round(unrounded))
  np.testing.assert_array_equal(pixels.numpy(), np.round(unrounded).astype(np.uint8))


def test_a_photo_shrinks_to_about_the_same_pixels_as_a_jpeg_and_as_a_png():
  """A JPEG shrinks in the DCT domain first; other formats were resized straight down and aliased: the same photo
  was 'ants 0.80' as a JPEG and 'bees 0.53' as a PNG at 96 px. Fine stripes are aliasing's test pattern."""
  y, x = np.mgrid[0:480, 0:480]
  stripes = (127 + 120 * np.sin(x * 0.9 + y * 0.35)).astype(np.uint8)
  photo = np.stack([stripes, np.flipud(stripes), (x // 2 % 256).astype(np.uint8)], -1)
  png = io.BytesIO()
  Image.fromarray(photo).save(png, "PNG")
  as_jpeg = images.load(_jpeg(photo), 96).numpy().astype(int)
  as_png = images.load(png.getvalue(), 96).numpy().astype(int)
  assert np.abs(as_jpeg - as_png).mean() < 10  # 45.6 of 255 without the antialiasing filter, 7.5 with it.


def test_truncated_jpeg_is_an_error_not_an_image():
  encoded = _jpeg(_pixels(64, 64))
  with pytest.raises(tf.errors.InvalidArgumentError):
    images.load(encoded[:len(encoded) // 2], 16)


def _succeeds(function) -> bool:
  try:
    function()
  except tf.errors.InvalidArgumentError:
    return False
  return True


def test_the_cheap_check_fails_exactly_where_decoding_in_full_fails():
  encoded = _jpeg(_pixels(96, 128))
  rng = np.random.default_rng(0)
  outcomes = set()
  for trial in range(24):
    damaged = bytearray(encoded)
    if trial % 2:
      damaged = damaged[:int(rng.integers(200, len(encoded)))]
    else:
      start = int(rng.integers(700, len(encoded) - 40))
      damaged[start:start + 30] = rng.integers(0, 256, 30, dtype=np.uint8).tobytes()
    damaged = bytes(damaged)
    decodes = _succeeds(lambda: images.decode(damaged))
    assert _succeeds(lambda: images.check(damaged)) == decodes == _succeeds(lambda: images.load(damaged, 64)), trial
    outcomes.add(decodes)
  assert outcomes == {True, False}  # Both kinds of damage were tried.


def _pixel_export(tmp_path, image_size: int):
  """The real serving graph (export.saved_model's archive) around a model that outputs its input pixels."""
  inputs = keras.Input((image_size, image_size, 3))
  model = keras.Model(inputs, keras.layers.Flatten()(inputs))
  labels = tmp_path / "labels.txt"
  labels.write_text("pixels\n")
  saved_model._archive(model, str(labels), image_size, top_k=1).write_out(str(tmp_path / "export"), verbose=False)
  return tf.saved_model.load(str(tmp_path / "export"))


def test_training_pipeline_pixels_equal_the_serving_graphs_exactly(tmp_path, phone_photos, shared_dir):
  size = 32
  folder = tmp_path / "data"
  (folder / "seven").mkdir(parents=True)
  for index, path in enumerate(phone_photos):
    shutil.copy(path, folder / "seven" / f"{index}.jpg")
  for index in range(3):
    write_image(folder / "small" / f"{index}.jpg", (30, 90, 200), size=(45 + 7 * index, 37))
    write_image(folder / "small" / f"{index}.png", (200, 90, 30), size=(33, 50 + index), fmt="PNG")
  shutil.copy(shared_dir / "images" / "cat.bmp", folder / "small" / "cat.bmp")
  config = Config().replace(data_dir=str(folder), validation_split=0.34, deterministic=True).data
  loaded = data.load(config, size, str(tmp_path / "cache"))
  served = _pixel_export(tmp_path, size)
  for split in (loaded.train, loaded.val):
    trained = np.stack([np.asarray(image, np.float32) for image, _ in split.images.as_numpy_iterator()])
    encoded = tf.constant([open(path, "rb").read() for path in split.paths])
    by_bytes = served.signatures["serving_default"](image_bytes=encoded)["probabilities"].numpy()
    np.testing.assert_array_equal(by_bytes.reshape(trained.shape), trained)
  assert {path.split("/")[-2] for path in loaded.train.paths + loaded.val.paths} == {"seven", "small"}
