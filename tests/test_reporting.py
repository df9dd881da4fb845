"""What a run shows: TensorBoard event files read back with TensorBoard's own reader, and the report files."""

import contextlib
import io
import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

from tests.conftest import CLASS_COLORS, REPO, write_color_dataset
from trainer import reporting, train
from trainer.config import Config

CLASSES = sorted(CLASS_COLORS)


def _train(config: Config, workdir) -> tuple[dict, str]:
  """Runs training and returns its metrics and everything it printed to stdout."""
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    metrics = train.train_and_evaluate(config, str(workdir))
  return metrics, printed.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory, mobilenet_025_weights):
  """Two frozen epochs and one fine-tune epoch, with progress output, on three colour classes."""
  root = tmp_path_factory.mktemp("reporting")
  write_color_dataset(root / "data", 5, fmt="PNG")
  config = Config().replace(data_dir=str(root / "data"), backbone="mobilenet", alpha=0.25,
                            weights=mobilenet_025_weights, image_size=32, batch_size=8, frozen_epochs=2,
                            finetune_epochs=1, head_units=8, augment="light", frozen_lr=1e-2, finetune_lr=1e-3,
                            verbosity=0)
  workdir = root / "run"
  metrics, printed = _train(config, workdir)
  return config, workdir, metrics, printed


def _events(folder) -> event_accumulator.EventAccumulator:
  accumulator = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.TENSORS: 0})
  accumulator.Reload()
  return accumulator


def _scalars(accumulator, tag) -> dict[int, float]:
  return {event.step: float(tf.make_ndarray(event.tensor_proto)) for event in accumulator.Tensors(tag)}


def _decoded(png_bytes: bytes) -> Image.Image:
  image = Image.open(io.BytesIO(png_bytes))
  image.load()
  return image


def _images(accumulator, tag) -> dict[int, Image.Image]:
  """The image summary of each step, decoded (TF2 stores [width, height, encoded image...] as a string tensor)."""
  assert accumulator.SummaryMetadata(tag).plugin_data.plugin_name == "images"
  decoded = {}
  for event in accumulator.Tensors(tag):
    width, height, encoded = tf.make_ndarray(event.tensor_proto)
    decoded[event.step] = _decoded(encoded)
    assert decoded[event.step].size == (int(width), int(height))
  return decoded


def test_epoch_scalars_of_both_phases_share_one_epoch_axis(run):
  config, workdir, _, _ = run
  train_events, val_events = _events(workdir / "tensorboard" / "train"), _events(workdir / "tensorboard" / "validation")
  for accumulator in (train_events, val_events):
    for tag in ("epoch_loss", "epoch_accuracy"):
      assert sorted(_scalars(accumulator, tag)) == [1, 2, 3]
  assert _scalars(train_events, "epoch_phase") == {1: 0.0, 2: 0.0, 3: 1.0}
  learning_rates = _scalars(train_events, "epoch_learning_rate")
  assert learning_rates == pytest.approx({1: config.train.frozen_lr, 2: config.train.frozen_lr,
                                          3: config.train.finetune_lr})
  assert all(value > 0 for value in _scalars(train_events, "epoch_images_per_sec").values())
  history = json.loads((workdir / "report" / "history.json").read_text())
  assert _scalars(val_events, "epoch_accuracy") == pytest.approx({r["epoch"]: r["val_accuracy"] for r in history})


def test_phase_starts_are_marked_as_text(run):
  _, workdir, _, _ = run
  markers = {event.step: tf.make_ndarray(event.tensor_proto).item().decode()
             for event in _events(workdir / "tensorboard").Tensors("phase")}
  assert sorted(markers) == [1, 3]
  assert "frozen phase starts" in markers[1] and "finetune phase starts" in markers[3]
  assert "conv_dw_13" in markers[3]


def test_augmented_training_images_and_a_confusion_matrix_per_validation(run):
  _, workdir, _, _ = run
  grid = _images(_events(workdir / "tensorboard" / "train"), "augmented_training_images")
  assert list(grid) == [0] and min(grid[0].size) >= 200
  confusions = _images(_events(workdir / "tensorboard" / "validation"), "confusion_matrix")
  assert sorted(confusions) == [1, 2, 3]


def test_hparams_and_config_text_describe_the_run(run):
  config, workdir, _, _ = run
  accumulator = _events(workdir / "tensorboard")
  plugin_data = accumulator.SummaryMetadata(hparams_metadata.SESSION_START_INFO_TAG).plugin_data.content
  hparams = hparams_metadata.parse_session_start_info_plugin_data(plugin_data).hparams
  assert hparams["backbone"].string_value == "mobilenet"
  assert hparams["image_size"].number_value == 32
  assert hparams["head_units"].number_value == config.model.head_units
  assert hparams["finetune_lr"].number_value == pytest.approx(config.train.finetune_lr)
  assert hparams["augment"].string_value == "light"
  assert hparams["precision"].string_value == "float32"
  experiment = hparams_metadata.parse_experiment_plugin_data(
      accumulator.SummaryMetadata(hparams_metadata.EXPERIMENT_TAG).plugin_data.content)
  assert {(m.name.group, m.name.tag) for m in experiment.metric_infos} >= {("validation", "epoch_accuracy"),
                                                                          ("validation", "epoch_loss")}
  text = tf.make_ndarray(accumulator.Tensors("config")[0].tensor_proto).item().decode()
  logged = json.loads(textwrap.dedent(text))
  assert logged["data"]["data_dir"] == config.data.data_dir
  assert logged["model"]["unfreeze_from"] == "conv_dw_13"
  assert logged["run"]["classes"] == CLASSES


def test_metrics_json_matches_the_last_logged_scalars(run):
  _, workdir, metrics, _ = run
  on_disk = json.loads((workdir / "report" / "metrics.json").read_text())
  assert on_disk["val_accuracy"] == metrics["val_accuracy"]
  val_accuracy = _scalars(_events(workdir / "tensorboard" / "validation"), "epoch_accuracy")
  val_loss = _scalars(_events(workdir / "tensorboard" / "validation"), "epoch_loss")
  assert on_disk["val_accuracy"] == pytest.approx(val_accuracy[3])
  assert on_disk["val_loss"] == pytest.approx(val_loss[3], rel=1e-6)
  assert on_disk["phases"]["frozen"]["val_accuracy"] == pytest.approx(val_accuracy[2])
  assert on_disk["phases"]["finetune"]["val_accuracy"] == pytest.approx(val_accuracy[3])


def test_report_files_decode_and_agree_with_the_metrics(run):
  _, workdir, metrics, _ = run
  report = workdir / "report"
  for name in ("curves.png", "confusion_matrix.png"):
    image = _decoded((report / name).read_bytes())
    assert image.format == "PNG" and min(image.size) >= 200
  lines = (report / "classification_report.txt").read_text().splitlines()
  rows = {line.split()[0]: line.split()[1:] for line in lines if line.split() and line.split()[0] in CLASSES}
  # One validation image per class (5 images, validation_split 0.2).
  assert {name: int(values[-1]) for name, values in rows.items()} == {name: 1 for name in CLASSES}
  accuracy = next(line.split() for line in lines if line.strip().startswith("accuracy"))
  assert float(accuracy[1]) == pytest.approx(metrics["val_accuracy"], abs=5e-5) and accuracy[2] == "3"


def test_progress_names_the_phase_of_every_epoch(run):
  _, _, _, printed = run
  for header in ("Epoch 1/3 (frozen phase)", "Epoch 2/3 (frozen phase)", "Epoch 3/3 (finetune phase)"):
    assert header in printed
  assert "accuracy:" in printed and "loss:" in printed


def test_a_quiet_continued_run_prints_nothing_and_extends_the_epoch_axis(run, tmp_path):
  config, workdir, _, _ = run
  continued = tmp_path / "run"
  shutil.copytree(workdir, continued)
  _, printed = _train(config.replace(finetune_epochs=2, verbosity=-1), continued)
  assert printed == ""
  val_events = _events(continued / "tensorboard" / "validation")
  assert sorted(_scalars(val_events, "epoch_accuracy")) == [1, 2, 3, 4]
  assert sorted(_images(val_events, "confusion_matrix")) == [1, 2, 3, 4]
  # The augmented images belong to the start of the run: a continued run does not log them again.
  assert len(_events(continued / "tensorboard" / "train").Tensors("augmented_training_images")) == 1
  assert json.loads((continued / "report" / "metrics.json").read_text())["epochs"] == 4


def test_per_class_metrics_follow_their_definitions():
  # Rows are true classes, columns predictions; class 2 is never predicted.
  confusion = np.array([[3, 1, 0], [0, 2, 0], [1, 1, 0]])
  metrics = reporting.per_class_metrics(confusion)
  np.testing.assert_allclose(metrics["precision"], [3 / 4, 2 / 4, 0.0])
  np.testing.assert_allclose(metrics["recall"], [3 / 4, 2 / 2, 0 / 2])
  np.testing.assert_allclose(metrics["f1"], [3 / 4, 2 * 0.5 * 1.0 / 1.5, 0.0])
  np.testing.assert_array_equal(metrics["support"], [4, 2, 2])
  report = reporting.classification_report(confusion, ["a", "b", "c"])
  accuracy = next(line.split() for line in report.splitlines() if line.strip().startswith("accuracy"))
  assert accuracy[1:] == [f"{5 / 8:.4f}", "8"]


def test_validation_confusion_matrix_sums_over_replicas():
  """Under a two-replica MirroredStrategy (two logical CPUs, so in a fresh process), the confusion matrix of
  `run_epoch` counts every example once and matches the model's own predictions."""
  script = textwrap.dedent("""
      import numpy as np, tensorflow as tf
      cpu = tf.config.list_physical_devices("CPU")[0]
      tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
      from trainer import train
      from trainer.config import Config
      config = train.resolve(Config().replace(backbone="mobilenet", alpha=0.25, weights="none", image_size=32,
                                              head_units=4, augment="none"))
      strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
      trainer = train.Trainer(config, 3, strategy)
      rng = np.random.default_rng(0)
      images = rng.uniform(0, 255, (14, 32, 32, 3)).astype(np.float32)
      labels = rng.integers(0, 3, 14).astype(np.int32)
      batches = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)
      metrics = trainer.run_epoch(batches, training=False, steps=4, progress=False)
      predicted = np.argmax(trainer.model.predict(images, verbose=0), axis=-1)
      expected = np.zeros((3, 3), np.int64)
      np.add.at(expected, (labels, predicted), 1)
      assert strategy.num_replicas_in_sync == 2
      assert np.array_equal(metrics["confusion_matrix"], expected), (metrics["confusion_matrix"], expected)
      print("ok", metrics["confusion_matrix"].sum())
      """)
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split()[-2:] == ["ok", "14"]
