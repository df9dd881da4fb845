"""model.tflite: a full-integer file a phone's image classifier takes as it is, judged on the validation split."""

import json
import math
import pathlib

import numpy as np
import pytest

from bench import tflite as bench_tflite
from export import main as export_main
from export import saved_model, tflite
from trainer import config_checks
from trainer.config import Config
from trainer.errors import UserInputError
from trainer.input import data


@pytest.fixture(scope="module")
def int8_export(trained_workdir) -> pathlib.Path:
  # The gate is tested on its own below: 6 validation images make one differing image a 17-point loss.
  return pathlib.Path(export_main.export_run(
      str(trained_workdir), {"tflite": True, "tflite_quantization": "int8", "tflite_max_accuracy_drop": 1.0},
      version=101))


@pytest.fixture(scope="module")
def val_pixels(trained, trained_workdir) -> tuple[np.ndarray, np.ndarray]:
  """The validation split as the run decodes it: uint8 [N, S, S, 3] and labels."""
  inputs = data.load(trained.config.data, trained.config.data.image_size, str(trained_workdir / "cache"))
  pairs = list(inputs.val.images.as_numpy_iterator())
  return np.stack([image for image, _ in pairs]).astype(np.uint8), np.array([label for _, label in pairs])


def test_int8_file_takes_uint8_pixels_and_carries_labels_and_input_in_its_metadata(int8_export, trained):
  size, classes = trained.config.data.image_size, list(trained.classes)
  interpreter = tflite.interpreter_for(str(int8_export / "model.tflite"))
  source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
  assert source["dtype"] == np.uint8 and source["shape"].tolist() == [1, size, size, 3]
  assert source["quantization"] == (1.0, 0)  # A camera's uint8 pixel is the model's pixel value.
  assert target["dtype"] == np.uint8 and target["shape"].tolist() == [1, len(classes)]

  metadata, _ = tflite.metadata_modules()
  displayer = metadata.MetadataDisplayer.with_model_file(str(int8_export / "model.tflite"))
  described = json.loads(displayer.get_metadata_json())
  assert displayer.get_associated_file_buffer("labels.txt").decode().split("\n") == classes
  image_input = described["subgraph_metadata"][0]["input_tensor_metadata"][0]
  assert image_input["content"]["content_properties"]["color_space"] == "RGB"
  assert image_input["process_units"][0]["options"] == {"mean": [0.0], "std": [1.0]}
  assert image_input["stats"] == {"max": [255.0], "min": [0.0]}
  recorded = json.loads((int8_export / saved_model.METADATA_FILE).read_text())["tflite"]
  assert trained.config.model.backbone in described["description"]
  assert f"val accuracy {recorded['evaluation']['val_accuracy']:.4f}" in described["description"]
  assert recorded["quantization"] == "int8" and recorded["bytes"] == (int8_export / "model.tflite").stat().st_size


def test_recorded_accuracy_and_agreement_are_the_files_own_on_the_whole_validation_split(int8_export, trained,
                                                                                         val_pixels):
  pixels, labels = val_pixels
  interpreter = tflite.interpreter_for(str(int8_export / "model.tflite"))
  source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
  predicted = []
  for image in pixels:
    interpreter.set_tensor(source["index"], image[np.newaxis])
    interpreter.invoke()
    predicted.append(int(np.argmax(interpreter.get_tensor(target["index"])[0])))
  in_memory = np.argmax(trained.model(pixels.astype(np.float32), training=False).numpy(), axis=1)

  evaluation = json.loads((int8_export / saved_model.METADATA_FILE).read_text())["tflite"]["evaluation"]
  assert evaluation["images"] == len(labels) > 0
  assert evaluation["val_accuracy"] == pytest.approx(np.mean(np.array(predicted) == labels))
  assert evaluation["saved_model_val_accuracy"] == pytest.approx(np.mean(in_memory == labels))
  assert evaluation["agreement_with_saved_model"] == pytest.approx(np.mean(np.array(predicted) == in_memory))


def test_mediapipe_image_classifier_reads_the_file_as_it_is(int8_export, trained, val_pixels):
  import mediapipe as mp
  from mediapipe.tasks.python import vision
  from mediapipe.tasks.python.core import base_options
  image = val_pixels[0][0]  # At the model's size: the task's own resize leaves it as it is.
  interpreter = tflite.interpreter_for(str(int8_export / "model.tflite"))
  interpreter.set_tensor(interpreter.get_input_details()[0]["index"], image[np.newaxis])
  interpreter.invoke()
  expected = tflite.dequantized(interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0],
                                interpreter.get_output_details()[0])

  options = vision.ImageClassifierOptions(
      base_options=base_options.BaseOptions(model_asset_path=str(int8_export / "model.tflite")), max_results=1)
  with vision.ImageClassifier.create_from_options(options) as classifier:
    best = classifier.classify(mp.Image(image_format=mp.ImageFormat.SRGB, data=image)).classifications[0].categories[0]

  assert best.category_name == trained.classes[int(np.argmax(expected))]
  assert best.score == pytest.approx(float(np.max(expected)), abs=1 / 256)


def test_a_file_losing_more_than_the_margin_is_refused_in_one_line_and_not_published(trained_workdir, monkeypatch):
  def lossy_file(model, classes, config, path, inputs):  # What write_tflite records, without converting.
    pathlib.Path(path).write_bytes(b"TFL3")
    return {"quantization": config.export.tflite_quantization, "bytes": 4,
            "evaluation": {"images": 6, "val_accuracy": 0.5, "saved_model_val_accuracy": 1.0,
                           "agreement_with_saved_model": 0.5}}
  monkeypatch.setattr(tflite, "write_tflite", lossy_file)

  with pytest.raises(saved_model.ExportParityError) as refused:
    export_main.export_run(str(trained_workdir), {"tflite": True}, version=102)

  message = str(refused.value)
  assert "\n" not in message and "0.5000" in message and "1.0000" in message
  assert "--tflite_max_accuracy_drop=" in message
  assert not (trained_workdir / "export" / "classifier" / "102").exists()
  assert json.loads((trained_workdir / "export" / "classifier" / ".partial-102" / saved_model.METADATA_FILE)
                    .read_text())["tflite"]["evaluation"]["val_accuracy"] == 0.5  # Kept for inspection.


def test_the_margin_accepts_a_loss_up_to_it_and_suggests_a_flag_that_accepts_a_larger_one():
  record = {"quantization": "int8", "evaluation": {"images": 200, "val_accuracy": 0.94,
                                                   "saved_model_val_accuracy": 0.955}}
  assert tflite.refusal(record, 0.015) is None
  message = tflite.refusal(record, 0.01)
  assert "0.9400" in message and "0.9550" in message
  suggested = float(message.rsplit("--tflite_max_accuracy_drop=", 1)[1].rstrip("."))
  assert tflite.refusal(record, suggested) is None


@pytest.mark.parametrize("overrides", [{"tflite_quantization": "int4"}, {"tflite_max_accuracy_drop": -0.01},
                                       {"tflite_max_accuracy_drop": 1.5}, {"tflite_max_accuracy_drop": math.nan}])
def test_quantization_and_margin_are_refused_before_anything_is_read(overrides):
  with pytest.raises(UserInputError, match="--tflite_"):
    config_checks.validate(Config().replace(**overrides))


def test_bench_measures_a_trained_run_and_writes_its_figures(trained_workdir, tmp_path):
  figures = bench_tflite.main(["bench.tflite", f"--run={trained_workdir}", "--quantizations=int8",
                               f"--workdir={tmp_path}", f"--json={tmp_path / 'figures.json'}"])

  assert json.loads((tmp_path / "figures.json").read_text()) == figures
  (row,) = figures["rows"]
  assert row["quantization"] == "int8" and row["bytes"] == (tmp_path / "int8.tflite").stat().st_size
  assert 0 <= row["val_accuracy"] <= 1 and 0 <= row["agreement_with_saved_model"] <= 1 and row["ms_per_image"] > 0
  assert 0 <= figures["saved_model_val_accuracy"] <= 1 and figures["validation_images"] > 0
