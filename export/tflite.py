"""model.tflite for phones: converted, quantized, described by TFLite metadata, and judged on the validation split.

The file takes RGB pixels in 0..255 at the run's image size, [1, S, S, 3], and returns the probabilities of the
classes, [1, C]: the backbone's own normalisation is inside the graph, as in the SavedModel. Quantizations
(--tflite_quantization):
- float32: the graph as it is;
- float16: weights stored in float16 (about half the size), computed in float32;
- dynamic_range: weights in int8, activations quantized on the fly;
- int8: full-integer, calibrated on CALIBRATION_IMAGES training images (seeded, decoded as for training); its input
  is uint8 (camera pixels go straight in: the input's quantization is pinned to scale 1, zero point 0) and its
  output uint8 probabilities (scale 1/256), as MediaPipe Model Maker's int8 classifiers and the runtimes' image
  classifier tasks expect.

Every file carries TFLite metadata written by MediaPipe's metadata writer: the labels (labels.txt packed in the
file), the input as an RGB image with NormalizationOptions mean 0 and std 1 (so the value range stays 0..255), and
a description (backbone, classes, image size, quantization, validation accuracy, date). MediaPipe's ImageClassifier
task (and the TFLite Task Library it replaced) read the file as it is: no label file or normalisation to add.

The converted file is evaluated on the whole validation split through LiteRT's interpreter, against the float32
model the SavedModel serves (the SavedModel is checked to compute what that model computes): its accuracy, the
SavedModel's, their top-1 agreement and the speed are recorded, and `refusal` says when the file loses more than
--tflite_max_accuracy_drop.
"""

import datetime
import os
import sys
import tempfile
import time
import types
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from trainer.config import Config
from trainer.errors import UserInputError
from trainer.input import data

TFLITE_FILE = "model.tflite"
# A few hundred images pin every activation's range as well as the whole split would (Model Maker uses 300-500).
CALIBRATION_IMAGES = 300
_EXTRA_HINT = "pip install 'transfer-trainer[tflite]' (ai-edge-litert and mediapipe)"
_EVALUATION_BATCH = 32
# The TFLite metadata schema version that introduced every field written here (model name and description, an
# image input with NormalizationOptions, a classification output with a TENSOR_AXIS_LABELS file): the schema's
# history in mediapipe/tasks/metadata/metadata_schema.fbs adds nothing of these after 1.0.0.
_METADATA_PARSER_VERSION = "1.0.0"


def write_tflite(model: keras.Model, classes: Sequence[str], config: Config, path: str,
                 inputs: data.InputData) -> dict:
  """Writes model.tflite (with metadata) of `model` at `path`; returns its description and its evaluation on the
  validation split of `inputs` (calibrated on their training split for int8)."""
  quantization, image_size = config.export.tflite_quantization, config.data.image_size
  calibration = calibration_images(inputs.train, config.data.seed) if quantization == "int8" else []
  content = convert(model, image_size, quantization, calibration)
  reference = saved_model_predictions(model, inputs.val)
  evaluation = evaluate(content, inputs.val, reference)
  description = (f"{config.model.backbone} classifier of {len(classes)} classes ({', '.join(classes[:10])}"
                 f"{', ...' if len(classes) > 10 else ''}) trained by transfer-trainer; {quantization} weights; "
                 f"input RGB {image_size}x{image_size} in 0..255; val accuracy {evaluation['val_accuracy']:.4f} "
                 f"on {evaluation['images']} images (SavedModel {evaluation['saved_model_val_accuracy']:.4f}); "
                 f"exported {datetime.date.today().isoformat()}.")
  with open(path, "wb") as f:
    f.write(with_metadata(content, classes, image_size, description))
  input_type = "uint8" if quantization == "int8" else "float32"
  return {"file": os.path.basename(path), "quantization": quantization, "bytes": os.path.getsize(path),
          "input": f"{input_type} [1, {image_size}, {image_size}, 3], RGB in 0..255, resized bilinear",
          "output": (f"{'uint8 (scale 1/256)' if quantization == 'int8' else 'float32'} [1, {len(classes)}] "
                     "probabilities, classes in the order of assets/labels.txt and of the file's metadata"),
          "metadata": {"labels": "labels.txt", "color_space": "RGB", "normalization": {"mean": [0.0], "std": [1.0]},
                       "description": description},
          "calibration_images": len(calibration), "evaluation": evaluation}


def refusal(record: dict, max_drop: float) -> str | None:
  """One line refusing the file of `record` when its val accuracy is more than `max_drop` below the SavedModel's;
  None when it is within."""
  evaluation = record["evaluation"]
  accuracy, reference = evaluation["val_accuracy"], evaluation["saved_model_val_accuracy"]
  if reference - accuracy <= max_drop + 1e-9:  # Accuracies are fractions of whole counts: no rounding slack.
    return None
  return (f"model.tflite ({record['quantization']}) reaches val accuracy {accuracy:.4f} against the SavedModel's "
          f"{reference:.4f} on {evaluation['images']} validation images, more than --tflite_max_accuracy_drop="
          f"{max_drop:g} below: choose another --tflite_quantization, or accept the loss with "
          f"--tflite_max_accuracy_drop={(reference - accuracy) + 0.005:.2f}.")


def calibration_images(train: data.Examples, seed: int, count: int = CALIBRATION_IMAGES) -> list[np.ndarray]:
  """Up to `count` training images (float32 [S, S, 3] in 0..255), a seeded draw from the training pipeline's own
  shuffled epoch (so decoded exactly as training decoded them)."""
  real = train.epoch(seed).filter(lambda image, label, weight, index: weight > 0)
  return [image.astype(np.float32) for image, _, _, _ in real.take(count).as_numpy_iterator()]


def convert(model: keras.Model, image_size: int, quantization: str, calibration: Sequence[np.ndarray]) -> bytes:
  """The TFLite flatbuffer of `model`'s forward pass at batch 1 (no metadata yet)."""
  full_integer = quantization == "int8"

  def forward(pixels):
    if full_integer:
      # Pins the input's quantization to scale 1, zero point 0 (uint8 code = pixel value) whatever range the
      # calibration images happen to span: a phone passes its uint8 pixels in unchanged.
      pixels = tf.quantization.fake_quant_with_min_max_args(pixels, min=0.0, max=255.0, num_bits=8)
    return model(pixels, training=False)

  # Converted from a SavedModel of the forward pass: from_concrete_functions on a Keras 3 model loses its weights
  # (NaN out, measured here), and from_keras_model prints every captured variable.
  with tempfile.TemporaryDirectory() as forward_dir:
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", forward,
                         input_signature=[tf.TensorSpec([1, image_size, image_size, 3], tf.float32, name="images")])
    archive.write_out(forward_dir, verbose=False)
    converter = tf.lite.TFLiteConverter.from_saved_model(forward_dir)
    if quantization != "float32":
      converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantization == "float16":
      converter.target_spec.supported_types = [tf.float16]
    if full_integer:
      converter.representative_dataset = lambda: ([image[np.newaxis]] for image in calibration)
      converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
      converter.inference_input_type = tf.uint8
      converter.inference_output_type = tf.uint8
    try:
      return converter.convert()
    except Exception as e:  # The converter raises ConverterError, or RuntimeError from MLIR, per failing op.
      first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
      raise UserInputError(f"--tflite_quantization={quantization}: the converter cannot convert this model "
                           f"({first_line[:300]}); choose float16 or dynamic_range.") from None


def saved_model_predictions(model: keras.Model, val: data.Examples) -> tuple[np.ndarray, np.ndarray]:
  """(labels, probabilities) of the validation split by the float32 model the SavedModel serves."""
  labels, probabilities = [], []
  for pixels, batch_labels in val.images.batch(_EVALUATION_BATCH):
    probabilities.append(np.asarray(model(pixels, training=False), np.float32))
    labels.append(batch_labels.numpy())
  if not labels:
    raise UserInputError("model.tflite is judged on the validation split, and it is empty: give the data source a "
                         "validation split (--validation_split, or a val/ folder).")
  return np.concatenate(labels), np.concatenate(probabilities)


def evaluate(content: bytes, val: data.Examples, reference: tuple[np.ndarray, np.ndarray]) -> dict:
  """Accuracy of the TFLite model `content` on every validation image through LiteRT's interpreter, one image a
  call as on a phone; the SavedModel's accuracy and the two's top-1 agreement from `reference`."""
  interpreter = interpreter_for(content)
  source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
  labels, expected = reference
  predicted, seconds, worst = [], 0.0, 0.0
  for pixels, _ in val.images.as_numpy_iterator():
    interpreter.set_tensor(source["index"], pixels[np.newaxis].astype(source["dtype"]))  # Whole numbers 0..255.
    start = time.perf_counter()
    interpreter.invoke()
    seconds += time.perf_counter() - start
    probabilities = dequantized(interpreter.get_tensor(target["index"])[0], target)
    worst = float(np.max([worst, np.max(np.abs(probabilities - expected[len(predicted)]))]))  # Keeps a NaN.
    predicted.append(int(np.argmax(probabilities)))
  predicted = np.array(predicted)
  return {"images": len(labels), "val_accuracy": float(np.mean(predicted == labels)),
          "saved_model_val_accuracy": float(np.mean(np.argmax(expected, axis=1) == labels)),
          "agreement_with_saved_model": float(np.mean(predicted == np.argmax(expected, axis=1))),
          "max_abs_diff": worst, "ms_per_image": 1000 * seconds / len(labels)}


def dequantized(values: np.ndarray, details: dict) -> np.ndarray:
  """A tensor read from the interpreter as real numbers: uint8/int8 ones through their scale and zero point."""
  scale, zero_point = details["quantization"]
  if np.issubdtype(values.dtype, np.floating) or scale == 0:
    return values.astype(np.float32)
  return (values.astype(np.float32) - zero_point) * scale


def interpreter_for(content_or_path: bytes | str):
  """LiteRT's interpreter (tf.lite.Interpreter is deprecated in its favour), tensors allocated."""
  try:
    from ai_edge_litert.interpreter import Interpreter
  except ImportError:
    raise UserInputError(f"--tflite needs LiteRT's interpreter to check model.tflite: {_EXTRA_HINT}.") from None
  if isinstance(content_or_path, str):
    interpreter = Interpreter(model_path=content_or_path)
  else:
    interpreter = Interpreter(model_content=content_or_path)
  interpreter.allocate_tensors()
  return interpreter


def with_metadata(content: bytes, classes: Sequence[str], image_size: int, description: str) -> bytes:
  """`content` with TFLite metadata: labels, RGB image input in 0..255 (mean 0, std 1), the description."""
  metadata_writer = metadata_modules()[1]
  writer = metadata_writer.MetadataWriter.create(bytearray(content))
  writer.add_general_info("transfer-trainer image classifier", description)
  writer.add_image_input(norm_mean=[0.0], norm_std=[1.0], color_space_type=writer.color_space_types.RGB,
                         description=f"RGB image {image_size}x{image_size}, values 0..255 (no normalisation "
                                     "needed: the model normalises inside).")
  writer.add_classification_output(metadata_writer.Labels().add(list(classes)),
                                   description="Probability of each class, in the order of the labels.")
  populated, _ = writer.populate()
  # Something in the first populate keeps this frame alive; holding the writer to exit, its __del__ would then
  # fail there (os already gone) with a printed error.
  del writer
  return bytes(populated)


def metadata_modules() -> tuple[types.ModuleType, types.ModuleType]:
  """MediaPipe's TFLite metadata modules (`metadata`: populator and displayer; `metadata_writer`).

  Their wheels (0.10.3x and 1.x, checked up to 1.2.3) no longer ship the C++ helper
  `mediapipe.tasks.cc.metadata.python._pywrap_metadata_version` that `metadata` imports, whose one use is the
  minimum parser version written into the metadata: without it the import fails. It is stood in for, when
  missing, by the version the fields written here need (_METADATA_PARSER_VERSION), so the maintained writer and
  reader do the rest.
  """
  try:
    from mediapipe.tasks.python.metadata import metadata
  except ModuleNotFoundError as e:
    if e.name is None or not e.name.startswith("mediapipe.tasks.cc"):
      raise UserInputError(f"--tflite writes TFLite metadata with MediaPipe's writer: {_EXTRA_HINT}.") from None
    _stand_in_version_helper()
    from mediapipe.tasks.python.metadata import metadata
  from mediapipe.tasks.python.metadata.metadata_writers import metadata_writer
  return metadata, metadata_writer


def _stand_in_version_helper() -> None:
  helper = types.ModuleType("mediapipe.tasks.cc.metadata.python._pywrap_metadata_version")
  helper.GetMinimumMetadataParserVersion = lambda metadata_buffer: _METADATA_PARSER_VERSION
  package = "mediapipe.tasks.cc"
  for name in ("", ".metadata", ".metadata.python"):
    sys.modules.setdefault(package + name, types.ModuleType(package + name))
  sys.modules[package + ".metadata.python"]._pywrap_metadata_version = helper
  sys.modules[helper.__name__] = helper

