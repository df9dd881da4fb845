"""The exported SavedModel computes what the trained model computes, on every input form a server receives."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow_serving.apis import prediction_log_pb2

from export import end_of_run, saved_model, tflite
from export import main as export_main
from trainer.errors import UserInputError
from trainer.input import images


@pytest.fixture(scope="module")
def loaded(trained_export_dir):
  return tf.saved_model.load(str(trained_export_dir))


def _encoded(pixels: np.ndarray, fmt: str, mode: str = "RGB", **options) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels, "RGB").convert(mode).save(buffer, format=fmt, **options)
  return buffer.getvalue()


def _reference(trained, decoded_rgb: list[np.ndarray]) -> np.ndarray:
  size = trained.config.data.image_size
  return trained.model(tf.stack([images.resize(image, size) for image in decoded_rgb]), training=False).numpy()


def test_bytes_of_every_format_and_size_give_the_in_memory_probabilities(trained, loaded):
  rng = np.random.default_rng(0)
  pixels = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((40, 50), (33, 21), (64, 64), (20, 60),
                                                                            (31, 47), (48, 36))]
  jpeg = _encoded(pixels[0], "JPEG")
  # Lossless formats: PIL's decoding is the reference, including gray and RGBA becoming RGB.
  lossless = [_encoded(pixels[1], "PNG", "L"), _encoded(pixels[2], "PNG", "RGBA"), _encoded(pixels[3], "BMP"),
              _encoded(pixels[4], "GIF", "P"), _encoded(pixels[5], "WEBP", lossless=True)]
  decoded = [images.decode(jpeg).numpy()] + [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in lossless]

  served = loaded.signatures["serving_default"](image_bytes=tf.constant([jpeg] + lossless))

  expected = _reference(trained, decoded)
  assert np.max(np.abs(served["probabilities"].numpy() - expected)) <= 1e-4
  assert served["class_ids"].numpy().tolist() == np.argmax(expected, axis=1).tolist()


def test_image_tensor_signature_and_the_outputs_agree_with_the_labels(trained, loaded, trained_export_dir):
  batch = np.random.default_rng(1).integers(0, 256, (3, 45, 70, 3), dtype=np.uint8)

  served = {k: v.numpy() for k, v in loaded.signatures["serving_image_tensor"](images=tf.constant(batch)).items()}

  assert np.max(np.abs(served["probabilities"] - _reference(trained, list(batch)))) <= 1e-4
  labels = (trained_export_dir / "assets" / "labels.txt").read_text().splitlines()
  assert labels == list(trained.classes)
  assert [c.decode() for c in served["classes"]] == [labels[i] for i in served["class_ids"]]
  best_first = np.argsort(-served["probabilities"], axis=1)
  assert served["top_k_classes"].tolist() == [[labels[i].encode() for i in row] for row in best_first]
  assert np.allclose(served["top_k_scores"], np.sort(served["probabilities"], axis=1)[:, ::-1])


def test_bad_bytes_in_a_batch_are_named_by_position(loaded):
  jpeg = _encoded(np.zeros((8, 8, 3), np.uint8), "JPEG")

  with pytest.raises(tf.errors.InvalidArgumentError, match=r"image_bytes\[1\] is not a JPEG, PNG, GIF, BMP or WebP"):
    loaded.signatures["serving_default"](image_bytes=tf.constant([jpeg, b"%PDF-1.4 not an image", jpeg]))


def test_metadata_records_parity_and_the_run_and_warmup_requests_replay(trained, loaded, trained_export_dir):
  metadata = json.loads((trained_export_dir / "export_metadata.json").read_text())
  assert metadata["classes"] == list(trained.classes)
  assert metadata["image_size"] == trained.config.data.image_size
  assert metadata["config_identity"] == trained.config.identity_hash()
  assert metadata["parity"]["files"] > 0
  assert 0 <= max(metadata["parity"]["max_abs_diff"].values()) <= saved_model.PARITY_TOLERANCE

  records = list(tf.data.TFRecordDataset(str(trained_export_dir / saved_model.WARMUP_FILE)).as_numpy_iterator())
  assert records
  for record in records:
    request = prediction_log_pb2.PredictionLog.FromString(record).predict_log.request
    assert request.model_spec.name == "classifier"
    inputs = {name: tf.constant(tf.make_ndarray(proto)) for name, proto in request.inputs.items()}
    outputs = loaded.signatures[request.model_spec.signature_name](**inputs)
    assert outputs["probabilities"].shape == (len(next(iter(inputs.values()))), len(trained.classes))


def test_export_command_adds_versions_never_overwrites_and_writes_tflite(trained_workdir, trained):
  # The accuracy gate has its own tests (test_tflite.py): a few validation images make one flip a large loss.
  model_dir = trained_workdir / "export" / "classifier"
  next_version = max(int(name) for name in os.listdir(model_dir) if name.isdigit()) + 1
  path = export_main.export_run(str(trained_workdir), {"top_k": 2, "tflite": True, "tflite_max_accuracy_drop": 1.0})

  assert path == str(model_dir / str(next_version))
  metadata = json.loads((model_dir / str(next_version) / "export_metadata.json").read_text())
  assert metadata["source"] == trained.checkpoint
  assert metadata["tflite"]["quantization"] == "float16"
  assert metadata["tflite"]["evaluation"]["max_abs_diff"] < 0.05
  interpreter = tflite.interpreter_for(f"{path}/model.tflite")
  assert interpreter.get_input_details()[0]["dtype"] == np.float32
  assert interpreter.get_output_details()[0]["shape"].tolist() == [1, len(trained.classes)]
  served = tf.saved_model.load(path).signatures["serving_image_tensor"](images=tf.zeros([1, 9, 9, 3], tf.uint8))
  assert served["top_k_scores"].shape == (1, 2)
  with pytest.raises(UserInputError, match="immutable"):
    export_main.export_run(str(trained_workdir), version=1)


def test_saved_model_cli_runs_on_a_npy_of_jpeg_bytes(loaded, trained_export_dir, tmp_path):
  jpeg = _encoded(np.full((30, 30, 3), (220, 40, 40), np.uint8), "JPEG")
  np.save(tmp_path / "input.npy", np.array([jpeg], dtype=object))
  expected = loaded.signatures["serving_default"](image_bytes=tf.constant([jpeg]))["classes"].numpy()[0].decode()

  result = subprocess.run(
      [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", "run", "--dir", str(trained_export_dir),
       "--tag_set", "serve", "--signature_def", "serving_default", "--inputs", f"image_bytes={tmp_path / 'input.npy'}"],
      capture_output=True, text=True, check=True)

  assert f"Result for output key classes:\n[b'{expected}']" in result.stdout


def test_a_failed_export_check_keeps_the_training_and_export_main_retries(tiny_config, color_folder, tmp_path,
                                                                          monkeypatch):
  from trainer.loop import train  # Imported here: the other tests share one trained run.
  workdir = tmp_path / "run"
  checked = saved_model.check_parity
  monkeypatch.setattr(saved_model, "check_parity", lambda *args: {name: 1.0 for name in checked(*args)})

  with pytest.raises(UserInputError) as raised:
    train.train_and_evaluate(tiny_config.replace(data_dir=str(color_folder), finetune_epochs=0), str(workdir),
                               exporter=end_of_run.SavedModelExport())

  message = str(raised.value)
  assert "\n" not in message and f"python -m export.main --workdir={workdir}" in message
  assert not (workdir / "export" / "classifier" / "1").exists()  # Nothing unchecked reaches a model server.
  monkeypatch.undo()
  path = export_main.export_run(str(workdir))
  assert path == str(workdir / "export" / "classifier" / "1")
  assert json.loads((workdir / "export" / "classifier" / "1" / "export_metadata.json").read_text())["source"]


def test_a_full_disk_during_the_export_is_one_line_and_publishes_nothing(trained_workdir, monkeypatch):
  """A full disk at the warm-up file (one of the export's places: the SavedModel, the warm-up, model.tflite, the
  metadata) ended in a traceback and left a partial export behind."""
  import errno
  model_dir = trained_workdir / "export" / "classifier"
  before = sorted(os.listdir(model_dir))

  def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(saved_model, "write_warmup_requests", full_disk)
  with pytest.raises(UserInputError, match=f"The disk holding {model_dir} is full: the export needs about"):
    export_main.export_run(str(trained_workdir))
  assert sorted(os.listdir(model_dir)) == before  # No new version, no partial one.
