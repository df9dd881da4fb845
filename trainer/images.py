"""Decoding and resizing of one image: shared by the training pipeline and the exported serving graph, so that
training and serving see exactly the same pixels."""

import tensorflow as tf

# Formats tf.io.decode_image reads; the extension filter of folder sources.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")


def decode(image_bytes: tf.Tensor) -> tf.Tensor:
  """Encoded JPEG/PNG/GIF/BMP/WebP bytes to uint8 RGB [H, W, 3]: gray and RGBA become RGB, a GIF its first frame."""
  image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False, dtype=tf.uint8)
  image.set_shape([None, None, 3])
  return image


def resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
  """Any [H, W, 3] image to float32 [image_size, image_size, 3] with values in 0..255 (bilinear, no crop)."""
  # ResizeBilinear reads uint8 directly (identical output): a float copy of the full-size image first costs time.
  return tf.image.resize(image, (image_size, image_size), method="bilinear")


def decode_and_resize(image_bytes: tf.Tensor, image_size: int) -> tf.Tensor:
  return resize(decode(image_bytes), image_size)
