"""A trained classifier as a SavedModel in TF Serving's layout, with image decoding and labels inside the graph.

WORKDIR/export/<model_name>/<version>/ holds:
- the SavedModel. `serving_default` takes `image_bytes` (tf.string [None]: JPEG, PNG, GIF, BMP or WebP, any size,
  gray and RGBA become RGB); `serving_image_tensor` takes `images` (uint8 [None, None, None, 3], any size). Both
  return `probabilities` (float32 [None, C]), `class_ids` (int32 [None]), `classes` (the label strings),
  `top_k_classes` and `top_k_scores` ([None, k]).
- `assets/labels.txt`, one class name per line: the graph reads its labels from it.
- `assets.extra/tf_serving_warmup_requests`: real requests (validation images) that TF Serving replays at load.
- `export_metadata.json`: versions, classes, image size, the training config's hash, the parity check, for a
  mixed-precision model how far the float32 model it serves is from it, and with `--tflite` the TFLite file's
  description and its evaluation on the validation split (see export/tflite.py).
- `model.tflite` with `--tflite`: TFLite metadata inside (labels, input, description); refused (the version left
  unpublished) when its val accuracy is more than --tflite_max_accuracy_drop below the SavedModel's.

Built with keras.export.ExportArchive: a hand-made tf.Module around a Keras 3 model reloads but fails in
`saved_model_cli run` (measured here). The export is written beside its version folder, loaded back and compared
with the in-memory model on validation files before it is renamed into place, so a model server watching the
model folder never sees a half-written or unchecked version.

A float16 or bfloat16 model is served as its float32 copy (the same classifier built under the float32 policy with
the trained weights, which mixed precision keeps in float32 already): a server's graph rounds differently from the
in-memory one, and in float16 that alone exceeds any tolerance that would still catch a wrong graph (0.007 measured
on MobileNet at 96 px). The copy is checked at PARITY_TOLERANCE like any float32 model; its difference from the
mixed-precision model is recorded, as information, under "precision" in export_metadata.json.
"""

import contextlib
import dataclasses
import datetime
import errno
import importlib.metadata
import json
import os
import platform
import shutil
import tempfile
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

from export import tflite
from trainer import errors
from trainer.config import Config
from trainer.errors import UserInputError
from trainer.input import data, images
from trainer.modeling import model as model_lib

SERVING_DEFAULT = "serving_default"
IMAGE_TENSOR_SIGNATURE = "serving_image_tensor"
LABELS_FILE = "labels.txt"
METADATA_FILE = "export_metadata.json"
TFLITE_FILE = tflite.TFLITE_FILE
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")

# Export fails above this difference between the reloaded SavedModel and the in-memory float32 model.
PARITY_TOLERANCE = 1e-3
# Enough validation files to catch a wrong graph; few enough that exporting stays quick on large datasets.
PARITY_FILES = 64
_PARITY_BATCH = 16
_WARMUP_BATCH = 8

# Leading bytes of the formats tf.io.decode_image reads (WebP: "RIFF", 4 bytes of size, then "WEBP").
_SIGNATURES = ((0, b"\xff\xd8\xff"), (0, b"\x89PNG\r\n\x1a\n"), (0, b"GIF8"), (0, b"BM"))
_WEBP = ((0, b"RIFF"), (8, b"WEBP"))


class ExportParityError(RuntimeError):
  """The export does not compute what the trained model computes: the reloaded SavedModel differs from it, or
  model.tflite loses more validation accuracy than --tflite_max_accuracy_drop allows."""


def next_version(model_dir: str) -> int:
  """One more than the highest numeric version folder (TF Serving serves the highest), 1 for a new model."""
  if not os.path.isdir(model_dir):
    return 1
  versions = [int(name) for name in os.listdir(model_dir) if name.isdigit()]
  return max(versions, default=0) + 1


def export_saved_model(model: keras.Model, classes: Sequence[str], config: Config, export_root: str,
                       parity_paths: Sequence[str], version: int | None = None, source: str = "",
                       inputs: data.InputData | None = None) -> str:
  """Writes export_root/<model_name>/<version>/ after checking it against `model`; returns that path.

  parity_paths: validation image files (see `trainer.input.data.sample_files`); the first PARITY_FILES are fed as bytes
  to the reloaded SavedModel and, decoded, to `model`, and make the warmup requests. source: where the weights
  came from (a checkpoint). inputs: the run's data, needed with --tflite (int8 is calibrated on its training
  split; the file is judged on its validation split). A mixed-precision `model` is exported as its float32 copy
  (see `float32_copy`). Raises ExportParityError (leaving the checked copy in a hidden `.partial-<version>`
  folder) when they differ by more than PARITY_TOLERANCE, or when model.tflite loses more accuracy than allowed.
  """
  export = config.export
  if export.tflite and inputs is None:
    raise ValueError("--tflite: export_saved_model needs the run's inputs to calibrate and judge model.tflite.")
  if export.top_k < 1:
    raise UserInputError(f"--top_k={export.top_k}: must be at least 1.")
  if not parity_paths:
    raise UserInputError("The export is checked on validation images, and there are none: give the data source "
                         "a validation split (--validation_split, or a val/ folder).")
  model_dir = os.path.join(export_root, export.model_name)
  version = next_version(model_dir) if version is None else version
  path = os.path.join(model_dir, str(version))
  if os.path.exists(path):
    raise UserInputError(f"{path} exists and TF Serving versions are immutable: choose another --version, or "
                         "leave it out to take the next free one.")
  samples = [_read(path) for path in parity_paths[:PARITY_FILES]]

  partial = os.path.join(model_dir, f".partial-{version}")
  shutil.rmtree(partial, ignore_errors=True)
  needed = sum(int(np.prod(weight.shape)) * 4 for weight in model.weights)  # float32 variables, roughly.
  with _a_full_disk_is_one_line(model_dir, partial, needed):
    return _write_and_publish(model, classes, config, partial, path, version, samples, source, inputs)


def _write_and_publish(model: keras.Model, classes: Sequence[str], config: Config, partial: str, path: str,
                       version: int, samples: Sequence[bytes], source: str, inputs) -> str:
  """The export written into `partial`, checked, then renamed to `path` (see `export_saved_model`)."""
  export, image_size = config.export, config.data.image_size
  with tempfile.TemporaryDirectory() as scratch:
    labels_path = os.path.join(scratch, LABELS_FILE)
    with open(labels_path, "w", encoding="utf-8") as f:
      f.write("".join(f"{name}\n" for name in classes))
    served = float32_copy(model, config, len(classes))
    archive = _archive(served, labels_path, image_size, min(export.top_k, len(classes)))
    archive.write_out(partial, verbose=False)

  parity = {"files": len(samples), "tolerance": PARITY_TOLERANCE,
            "max_abs_diff": check_parity(tf.saved_model.load(partial), served, samples, image_size)}
  worst = max(parity["max_abs_diff"].values())
  if worst > PARITY_TOLERANCE:
    raise ExportParityError(
        f"The exported SavedModel differs from the trained model by up to {worst:.3g} in probability on "
        f"{len(samples)} validation images (tolerance {PARITY_TOLERANCE:.3g}): {parity['max_abs_diff']}. The "
        f"unchecked export is left in {partial} for inspection.")
  write_warmup_requests(os.path.join(partial, WARMUP_FILE), export.model_name, samples[:_WARMUP_BATCH],
                        image_size)
  metadata = {"model_name": export.model_name, "version": version,
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "source": source, "classes": list(classes), "image_size": image_size,
              "top_k": min(export.top_k, len(classes)), "backbone": config.model.backbone,
              "config_identity": config.identity_hash(), "config": config.to_dict(), "versions": _versions(),
              "parity": parity}
  if served is not model:
    metadata["precision"] = {"trained": model.dtype_policy.name, "served": served.dtype_policy.name,
                             "max_abs_diff": max_difference(served, model, samples, image_size)}
  refused = None
  if export.tflite:
    metadata["tflite"] = tflite.write_tflite(served, classes, config, os.path.join(partial, TFLITE_FILE), inputs)
    refused = tflite.refusal(metadata["tflite"], export.tflite_max_accuracy_drop)
    evaluation = metadata["tflite"]["evaluation"]
    logging.info("model.tflite (%s, %d bytes): val accuracy %.4f, SavedModel %.4f, top-1 agreement %.4f on %d "
                 "validation images.", export.tflite_quantization, metadata["tflite"]["bytes"],
                 evaluation["val_accuracy"], evaluation["saved_model_val_accuracy"],
                 evaluation["agreement_with_saved_model"], evaluation["images"])
  with open(os.path.join(partial, METADATA_FILE), "w", encoding="utf-8") as f:
    json.dump(metadata, f, indent=2, ensure_ascii=False)
  if refused:
    raise ExportParityError(f"{refused} The unpublished export is left in {partial} for inspection.")
  os.replace(partial, path)
  return path


@contextlib.contextmanager
def _a_full_disk_is_one_line(model_dir: str, partial: str, needed: int):
  """A full disk anywhere in the export (the SavedModel, the warm-up file, model.tflite, the metadata) ends in one
  line naming the folder and what the export needs; the partial export is removed, nothing is published, and the
  training's checkpoints are untouched (python -m export.main exports them again)."""
  try:
    yield
  except (OSError, tf.errors.OpError) as e:
    full = (e.errno in (errno.ENOSPC, errno.EDQUOT) if isinstance(e, OSError)
            else any(words in e.message for words in errors.DISK_FULL))
    if not full:
      raise
    shutil.rmtree(partial, ignore_errors=True)
    free = shutil.disk_usage(model_dir).free
    raise UserInputError(f"The disk holding {model_dir} is full: the export needs about {needed / 2**20:.0f} MiB and "
                         f"{free / 2**20:.0f} MiB are free. Nothing was published; free space there and export again "
                         "(python -m export.main --workdir=WORKDIR): the training is kept in its checkpoints.") \
        from None


def _archive(model: keras.Model, labels_path: str, image_size: int, top_k: int) -> keras.export.ExportArchive:
  # The labels come from the labels.txt asset, so the served names and the shipped file cannot disagree.
  labels = tf.lookup.StaticHashTable(
      tf.lookup.TextFileInitializer(labels_path, tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER,
                                    tf.string, tf.lookup.TextFileIndex.WHOLE_LINE), default_value="")

  def predict(images_0_255):
    probabilities = tf.cast(model(images_0_255, training=False), tf.float32)
    class_ids = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
    top_k_scores, top_k_ids = tf.math.top_k(probabilities, k=top_k)
    return {"probabilities": probabilities, "class_ids": class_ids,
            "classes": labels.lookup(tf.cast(class_ids, tf.int64)),
            "top_k_classes": labels.lookup(tf.cast(top_k_ids, tf.int64)), "top_k_scores": top_k_scores}

  def serve_image_bytes(image_bytes):
    decoded = tf.map_fn(lambda indexed: _checked_decode_and_resize(*indexed, image_size),
                        (tf.range(tf.size(image_bytes)), image_bytes),
                        fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32))
    return predict(decoded)

  def serve_image_tensor(images_uint8):
    return predict(images.resize(images_uint8, image_size))

  archive = keras.export.ExportArchive()
  archive.track(model)
  archive.track(labels)
  archive.add_endpoint(SERVING_DEFAULT, serve_image_bytes,
                       input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
  archive.add_endpoint(IMAGE_TENSOR_SIGNATURE, serve_image_tensor,
                       input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
  return archive


def _checked_decode_and_resize(index: tf.Tensor, image_bytes: tf.Tensor, image_size: int) -> tf.Tensor:
  """Decodes one image of a batch; bytes of no supported format fail with an error naming their position."""
  head = tf.strings.substr(tf.strings.join([image_bytes, b"\0" * 12]), 0, 12)

  def starts(offset, magic):
    return tf.equal(tf.strings.substr(head, offset, len(magic)), magic)

  known = tf.reduce_any([starts(*signature) for signature in _SIGNATURES] +
                        [tf.logical_and(starts(*_WEBP[0]), starts(*_WEBP[1]))])
  message = tf.strings.format("image_bytes[{}] is not a JPEG, PNG, GIF, BMP or WebP image ({} bytes)",
                              (index, tf.strings.length(image_bytes)))
  with tf.control_dependencies([tf.debugging.Assert(known, [message])]):
    return images.decode_and_resize(tf.identity(image_bytes), image_size)


def float32_copy(model: keras.Model, config: Config, num_classes: int) -> keras.Model:
  """`model` when it computes in float32; else the same classifier built under the float32 policy, with its
  weights (mixed precision keeps every variable in float32, so the copy is exact)."""
  if model.dtype_policy.compute_dtype == "float32":
    return model
  trained_policy = keras.config.dtype_policy()
  keras.config.set_dtype_policy("float32")  # Layers take the global policy when built.
  try:
    copy = model_lib.build_classifier(dataclasses.replace(config.model, weights="none"), num_classes,
                                      config.data.image_size, config.data.seed)
  finally:
    keras.config.set_dtype_policy(trained_policy)
  # set_weights checks shapes only: the paths make sure each variable lands where it came from.
  if [w.path for w in copy.weights] != [w.path for w in model.weights]:
    raise ExportParityError(f"The float32 copy of {model.name} for serving does not have the trained model's "
                            "variables; rebuild it from the checkpoint with python -m export.main.")
  copy.set_weights(model.get_weights())
  return copy


def max_difference(model: keras.Model, other: keras.Model, samples: Sequence[bytes], image_size: int) -> float:
  """Max absolute probability difference of two in-memory models on the same decoded images."""
  worst = 0.0
  for start in range(0, len(samples), _PARITY_BATCH):
    pixels = tf.stack([images.decode_and_resize(b, image_size) for b in samples[start:start + _PARITY_BATCH]])
    difference = model(pixels, training=False) - tf.cast(other(pixels, training=False), tf.float32)
    worst = max(worst, float(tf.reduce_max(tf.abs(difference))))
  return worst


def check_parity(loaded, model: keras.Model, samples: Sequence[bytes], image_size: int) -> dict[str, float]:
  """Max absolute probability difference of each signature of `loaded` against `model` on the same images."""
  differences = {SERVING_DEFAULT: 0.0, IMAGE_TENSOR_SIGNATURE: 0.0}
  serve_bytes, serve_tensor = loaded.signatures[SERVING_DEFAULT], loaded.signatures[IMAGE_TENSOR_SIGNATURE]
  for start in range(0, len(samples), _PARITY_BATCH):
    batch = samples[start:start + _PARITY_BATCH]
    decoded = [images.decode(b) for b in batch]
    expected = model(tf.stack([images.resize(image, image_size) for image in decoded]), training=False).numpy()
    # Bytes are decoded by images.load (large JPEGs in the DCT domain), so the training pixels are its reference.
    from_bytes = model(tf.stack([images.decode_and_resize(b, image_size) for b in batch]), training=False).numpy()
    served = serve_bytes(image_bytes=tf.constant(batch))["probabilities"].numpy()
    differences[SERVING_DEFAULT] = max(differences[SERVING_DEFAULT], float(np.max(np.abs(served - from_bytes))))
    for image, reference in zip(decoded, expected):  # One call per image: each may have its own size.
      served = serve_tensor(images=image[tf.newaxis])["probabilities"].numpy()[0]
      differences[IMAGE_TENSOR_SIGNATURE] = max(differences[IMAGE_TENSOR_SIGNATURE],
                                                float(np.max(np.abs(served - reference))))
  return differences


def write_warmup_requests(path: str, model_name: str, samples: Sequence[bytes], image_size: int) -> None:
  """PredictionLog records TF Serving replays at load: each signature, at batch 1 and a larger batch."""
  tensor_image = images.decode(samples[0])[tf.newaxis]
  requests = [(SERVING_DEFAULT, "image_bytes", np.array(samples[:1], dtype=object)),
              (SERVING_DEFAULT, "image_bytes", np.array(samples, dtype=object)),
              (IMAGE_TENSOR_SIGNATURE, "images", tensor_image.numpy())]
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with tf.io.TFRecordWriter(path) as writer:
    for signature, input_name, value in requests:
      request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name=model_name,
                                                                          signature_name=signature))
      request.inputs[input_name].CopyFrom(tf.make_tensor_proto(value))
      log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
      writer.write(log.SerializeToString())


def _read(path: str) -> bytes:
  with tf.io.gfile.GFile(path, "rb") as f:
    return f.read()


def _versions() -> dict:
  try:
    package = importlib.metadata.version("transfer-trainer")
  except importlib.metadata.PackageNotFoundError:
    package = None
  return {"transfer_trainer": package, "tensorflow": tf.__version__, "keras": keras.__version__,
          "python": platform.python_version()}
