"""A trained classifier as a SavedModel in TF Serving's layout, with image decoding and labels inside the graph.

`serving_default` takes `image_bytes` (tf.string [None]: JPEG, PNG, GIF, BMP or WebP of any size) and returns
`probabilities` (float32 [None, C]), `class_ids` (int32 [None]) and `classes` (the label strings).
Built with keras.export.ExportArchive: a hand-made tf.Module around a Keras 3 model reloads but fails in
`saved_model_cli run` (measured here).
"""

import os
import shutil

import keras
import tensorflow as tf

from trainer import images


def next_version(model_dir: str) -> int:
  """One more than the highest numeric version folder (TF Serving serves the highest), 1 for a new model."""
  if not os.path.isdir(model_dir):
    return 1
  versions = [int(name) for name in os.listdir(model_dir) if name.isdigit()]
  return max(versions, default=0) + 1


def export_saved_model(model: keras.Model, classes: list[str], image_size: int, export_root: str,
                       model_name: str, version: int | None = None) -> str:
  """Writes export_root/model_name/version/ and returns that path; an existing version is never overwritten."""
  model_dir = os.path.join(export_root, model_name)
  version = next_version(model_dir) if version is None else version
  path = os.path.join(model_dir, str(version))
  if os.path.exists(path):
    raise FileExistsError(f"{path} exists; TF Serving versions are immutable. Choose another --version.")
  labels = tf.constant(list(classes), dtype=tf.string)

  def predict(images_0_255):
    probabilities = tf.cast(model(images_0_255, training=False), tf.float32)
    class_ids = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
    return {"probabilities": probabilities, "class_ids": class_ids, "classes": tf.gather(labels, class_ids)}

  def serve_image_bytes(image_bytes):
    decoded = tf.map_fn(lambda one: images.decode_and_resize(one, image_size), image_bytes,
                        fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32))
    return predict(decoded)

  archive = keras.export.ExportArchive()
  archive.track(model)
  archive.add_endpoint("serving_default", serve_image_bytes,
                       input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
  # Written beside the final folder and renamed, so a model server watching model_dir never loads half a model.
  partial = os.path.join(model_dir, f".partial-{version}")
  shutil.rmtree(partial, ignore_errors=True)
  archive.write_out(partial, verbose=False)
  os.replace(partial, path)
  return path
