"""What a run shows: TensorBoard event files read back with TensorBoard's own reader, and the report files."""

import contextlib
import copy
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
import tensorflow as tf
from conftest import CLASS_COLORS, REPO, write_color_dataset
from matplotlib.figure import Figure
from PIL import Image
from tensorboard.backend import application
from tensorboard.backend.event_processing import data_provider, event_accumulator, plugin_event_multiplexer
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import hparams_plugin
from tensorboard.plugins.hparams import metadata as hparams_metadata
from werkzeug import test as werkzeug_test

from trainer.config import Config, section_fields
from trainer.loop import steps, train
from trainer.reporting import class_labels, report_files, summaries
from trainer.runtime import runtime

CLASSES = sorted(CLASS_COLORS)


def _train(config: Config, workdir) -> tuple[dict, str]:
  """Runs training and returns its metrics and everything it printed to stdout."""
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    metrics = train.train_and_evaluate(config, str(workdir))
  return metrics, printed.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory, random_mobilenet_025_weights):
  """Two frozen epochs and one fine-tune epoch, with progress output, on three colour classes."""
  root = tmp_path_factory.mktemp("reporting")
  write_color_dataset(root / "data", 5, fmt="PNG")
  config = Config().replace(data_dir=str(root / "data"), backbone="mobilenet", alpha=0.25,
                            weights=random_mobilenet_025_weights, image_size=32, batch_size=8, frozen_epochs=2,
                            finetune_epochs=1, head_units=8, augment="light", frozen_lr=1e-2, finetune_lr=1e-3,
                            verbosity=0, keep_better_phase=False)  # metrics.json is the last epoch's, as logged.
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


def _phase_events(workdir, split) -> dict[str, event_accumulator.EventAccumulator]:
  """The event files of each phase's `split` run (train or validation), by phase."""
  return {phase: _events(workdir / "tensorboard" / phase / split) for phase in ("frozen", "finetune")}


def test_the_phases_are_runs_of_their_own_on_one_epoch_axis_under_the_same_tags(run):
  _, workdir, _, _ = run
  history = json.loads((workdir / "report" / "history.json").read_text())
  for split, prefix in (("train", ""), ("validation", "val_")):
    events = _phase_events(workdir, split)
    for tag, field in (("epoch_loss", "loss"), ("epoch_accuracy", "accuracy")):
      # The loss and accuracy charts draw each phase as its own line: the boundary is where one ends.
      assert _scalars(events["frozen"], tag) == pytest.approx(
          {r["epoch"]: r[prefix + field] for r in history if r["phase"] == "frozen"}, rel=1e-6)
      assert _scalars(events["finetune"], tag) == pytest.approx({3: history[2][prefix + field]}, rel=1e-6)


def _tags(accumulator) -> set[str]:
  return set(accumulator.Tags()["tensors"])


def test_learning_rate_and_throughput_have_a_chart_per_phase_readable_at_four_decimals(run):
  """TensorBoard draws a chart per tag, clips a chart's outliers and prints 4 decimals in its tables: a phase's
  rates on a chart of their own, in a unit the tag names, read as themselves."""
  config, workdir, _, _ = run
  events = _phase_events(workdir, "train")
  for phase, epochs, rate in (("frozen", [1, 2], config.train.frozen_lr), ("finetune", [3], config.train.finetune_lr)):
    [tag] = [tag for tag in _tags(events[phase]) if tag.startswith(f"learning_rate/{phase}")]
    unit = float(tag.rsplit("_x", 1)[1])
    assert _scalars(events[phase], tag) == pytest.approx({epoch: rate / unit for epoch in epochs})
    assert round(rate / unit, 4) == pytest.approx(rate / unit)
    throughput = {tag for tag in _tags(events[phase]) if tag.startswith("throughput/")}
    assert throughput and all(tag.startswith(f"throughput/{phase}_") for tag in throughput)
    # Each epoch is a full and a partial batch: a phase's first epoch compiles both, its next ones neither.
    compiled = _scalars(events[phase], f"throughput/{phase}_compile_seconds")
    assert sorted(compiled) == epochs and compiled[epochs[0]] > 0
    steady = {} if len(epochs) == 1 else _scalars(events[phase], f"throughput/{phase}_steady_images_per_sec")
    assert sorted(steady) == epochs[1:] and all(value > 0 for value in steady.values())


def test_phase_starts_are_marked_as_text(run):
  _, workdir, _, _ = run
  markers = {event.step: tf.make_ndarray(event.tensor_proto).item().decode()
             for event in _events(workdir / "tensorboard").Tensors("phase")}
  assert sorted(markers) == [1, 3]
  assert "frozen phase starts" in markers[1] and "finetune phase starts" in markers[3]
  assert "conv_dw_13" in markers[3] and "finetune/train" in markers[3]


def test_augmented_training_images_and_a_confusion_matrix_per_validation(run):
  _, workdir, _, _ = run
  events = _events(workdir / "tensorboard")
  grid = _images(events, "images/augmented_training")
  assert list(grid) == [0] and min(grid[0].size) >= 200
  # TensorBoard's image card is about twice as wide as tall: a wide grid fills it, a square one shrinks.
  width, height = grid[0].size
  assert width >= 1.4 * height
  confusions = _images(events, "images/confusion_matrix")
  assert sorted(confusions) == [1, 2, 3]
  # Drawn at about the card's height (~210 px), so that its text is not scaled down to illegible.
  assert all(180 <= image.size[1] <= 300 and image.size[0] >= image.size[1] for image in confusions.values())


def test_tensorboard_opens_loss_and_accuracy_first(run):
  """TensorBoard's Time Series groups the cards of every run by the tag's part before the first '/', sorted, and
  expands the first two groups: they are the loss and accuracy charts, not images."""
  _, workdir, _, _ = run
  tags = set()
  for folder in (workdir / "tensorboard").rglob("*"):
    if folder.is_dir() and any(path.name.startswith("events.out") for path in folder.iterdir()):
      accumulator = _events(folder)
      tags |= {tag for tag in _tags(accumulator)
               if accumulator.SummaryMetadata(tag).plugin_data.plugin_name in ("scalars", "images")}
  groups = sorted({tag.split("/", 1)[0] for tag in tags})
  assert groups[:2] == ["epoch_accuracy", "epoch_loss"]


def _session_start(folder):
  accumulator = _events(folder)
  plugin_data = accumulator.SummaryMetadata(hparams_metadata.SESSION_START_INFO_TAG).plugin_data.content
  return hparams_metadata.parse_session_start_info_plugin_data(plugin_data)


def _changed(value):
  """Another value of a config field's type."""
  return (not value if isinstance(value, bool) else value + 1 if isinstance(value, (int, float))
          else value + "x")


def test_hparams_name_the_trial_after_the_run_and_hold_every_setting_runs_differ_in(run):
  config, workdir, _, _ = run
  start = _session_start(workdir / "tensorboard" / summaries.HPARAMS_DIR)
  assert start.group_name == workdir.name
  hparams = start.hparams
  assert hparams["backbone"].string_value == "mobilenet"
  assert hparams["image_size"].number_value == 32
  assert hparams["head_units"].number_value == config.model.head_units
  assert hparams["finetune_lr"].number_value == pytest.approx(config.train.finetune_lr)
  assert hparams["augment"].string_value == "light"
  assert hparams["precision"].string_value == "float32"
  assert hparams["cache_features"].bool_value is config.train.cache_features
  # Every setting that makes two runs different runs (the workdir refuses to mix them) is an hparam.
  defaults = Config()
  identity = {field.name for section, field in section_fields()
              if defaults.replace(**{field.name: _changed(getattr(getattr(defaults, section), field.name))})
              .identity_hash() != defaults.identity_hash()}
  assert {"class_weight", "cache_features", "feature_views", "batchnorm", "feature_layer"} <= identity
  assert identity <= set(hparams)


def test_config_text_describes_the_run(run):
  config, workdir, _, _ = run
  accumulator = _events(workdir / "tensorboard")
  text = tf.make_ndarray(accumulator.Tensors("config")[0].tensor_proto).item().decode()
  assert "\\u" not in text  # Names in any script read as written.
  logged = json.loads(textwrap.dedent(text))
  assert logged["data"]["data_dir"] == config.data.data_dir
  assert logged["model"]["unfreeze_from"] == "conv_dw_13"
  assert logged["run"]["classes"] == CLASSES


def _hparams_dashboard(logdir) -> tuple[dict, list[dict]]:
  """What TensorBoard's HParams dashboard gets from its backend for `logdir`: the experiment (hparams, metrics)
  and the session groups with their hparams and metric values."""
  multiplexer = plugin_event_multiplexer.EventMultiplexer()
  multiplexer.AddRunsFromDirectory(str(logdir))
  multiplexer.Reload()
  provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
  plugin = hparams_plugin.HParamsPlugin(base_plugin.TBContext(logdir=str(logdir), multiplexer=multiplexer,
                                                              data_provider=provider))
  client = werkzeug_test.Client(application.TensorBoardWSGI([plugin], data_provider=provider))
  experiment = client.post("/data/plugin/hparams/experiment", json={"experimentName": ""}).get_json()
  request = {"startIndex": 0, "sliceSize": 100, "allowedStatuses": ["STATUS_UNKNOWN"],
             "colParams": [{"metric": metric["name"]} for metric in experiment["metricInfos"]]}
  groups = client.post("/data/plugin/hparams/session_groups", json=request).get_json()["sessionGroups"]
  return experiment, groups


def test_hparams_dashboard_of_a_single_run_shows_its_metrics(run):
  _, workdir, _, _ = run
  experiment, groups = _hparams_dashboard(workdir / "tensorboard")
  history = json.loads((workdir / "report" / "history.json").read_text())
  assert [group["name"] for group in groups] == [workdir.name]
  values = {value["name"]["tag"]: value["value"] for value in groups[0]["metricValues"]}
  assert len(values) == len(experiment["metricInfos"]) >= 5
  assert values["val_accuracy"] == pytest.approx(history[-1]["val_accuracy"])
  assert values["train_loss"] == pytest.approx(history[-1]["loss"], rel=1e-6)
  assert values["frozen_images_per_sec"] == pytest.approx(
      report_files.steady_images_per_sec([r for r in history if r["phase"] == "frozen"]), rel=1e-6)


def _record(epoch, phase="frozen", **fields):
  return {"epoch": epoch, "phase": phase, "loss": 1.0 / epoch, "accuracy": 0.5, "val_loss": 1.0,
          "val_accuracy": 0.5,
          "learning_rate": 1e-3, "images_per_sec": 10.0, "train_seconds": 10.0, "seconds": 12.0, **fields}


def _log(log_dir, config, history, classes=("a", "b")):
  log = summaries.TensorBoardLog(str(log_dir), classes)
  log.log_run(config, {"precision": "float32", "num_replicas": 1, "classes": list(classes)})
  for end in range(1, len(history) + 1):
    log.log_epoch(history[:end], np.eye(len(classes), dtype=np.int64))
  log.close()


def test_a_resumed_run_shows_each_epoch_once_in_tensorboard(tmp_path):
  """Epoch 3 was logged, then the run was killed before its checkpoint (or that checkpoint was found corrupt):
  the rerun trains epoch 3 again, and TensorBoard drew both. It shows the second one only, as TensorBoard reads."""
  from tensorboard.backend.event_processing import plugin_event_accumulator as event_accumulator  # TensorBoard's
  log_dir = tmp_path / "tensorboard"
  _log(log_dir, Config(), [_record(1), _record(2), _record(3, loss=0.9)])
  for path in log_dir.rglob("events.out.tfevents.*"):  # Written by an earlier process: it started seconds before.
    parts = path.name.split(".")
    parts[3] = f"{int(parts[3]) - 10:010d}"
    path.rename(path.with_name(".".join(parts)))
  resumed = summaries.TensorBoardLog(str(log_dir), ("a", "b"), next_epoch=3)
  resumed.log_epoch([_record(1), _record(2), _record(3, loss=0.4)], np.eye(2, dtype=np.int64))
  resumed.close()
  accumulator = event_accumulator.EventAccumulator(str(log_dir / "frozen" / "train"), purge_orphaned_data=True)
  accumulator.Reload()
  losses = [(event.step, float(tf.make_ndarray(event.tensor_proto))) for event in accumulator.Tensors("epoch_loss")]
  assert losses == [(1, 1.0), (2, 0.5), (3, pytest.approx(0.4))]


def test_hparams_dashboard_of_several_runs_shows_first_what_differs(tmp_path):
  history = [_record(1), _record(2)]
  _log(tmp_path / "plain" / "tensorboard", Config(), history)
  _log(tmp_path / "balanced" / "tensorboard", Config().replace(class_weight="balanced"), history)
  experiment, groups = _hparams_dashboard(tmp_path)
  differs = {info["name"] for info in experiment["hparamInfos"] if info["differs"]}
  assert differs == {"class_weight"}
  assert {group["name"] for group in groups} == {"plain", "balanced"}
  assert all(len(group["metricValues"]) == len(experiment["metricInfos"]) for group in groups)


def test_steady_images_per_sec_and_compile_time_are_logged_per_phase_when_recorded(tmp_path):
  # Epoch 1 compiled for 9 of its 10 seconds; epoch 2 (an older record) has no steady figures; epoch 3 fine-tunes
  # at a rate two orders of magnitude lower.
  history = [_record(1, compile_seconds=9.0, steady_images_per_sec=90.0), _record(2),
             _record(3, "finetune", images_per_sec=0.1, steady_images_per_sec=0.2, compile_seconds=5.0)]
  _log(tmp_path / "tensorboard", Config(), history)
  frozen = _events(tmp_path / "tensorboard" / "frozen" / "train")
  assert _scalars(frozen, "throughput/frozen_steady_images_per_sec") == {1: 90.0}
  assert _scalars(frozen, "throughput/frozen_compile_seconds") == {1: 9.0}
  assert _scalars(frozen, "throughput/frozen_epoch_images_per_sec") == {1: 10.0, 2: 10.0}
  finetune = _events(tmp_path / "tensorboard" / "finetune" / "train")
  assert _scalars(finetune, "throughput/finetune_steady_images_per_sec") == pytest.approx({3: 0.2})
  # Each phase's images/s: the images of its epochs with a steady rate over their time at that rate (frozen:
  # epoch 1's 100 images in 100/90 s; epoch 2 has none).
  hparams_events = _events(tmp_path / "tensorboard" / summaries.HPARAMS_DIR)
  assert _scalars(hparams_events, "frozen_images_per_sec")[3] == pytest.approx(90.0)
  assert _scalars(hparams_events, "finetune_images_per_sec")[3] == pytest.approx(0.2)
  # Two steady epochs of 100 images each: all 200 over their time at their rates.
  assert report_files.steady_images_per_sec([_record(1, steady_images_per_sec=90.0), _record(
      2, steady_images_per_sec=20.0)]) == pytest.approx(200 / (100 / 90 + 100 / 20))
  phases = report_files.summarize(history, ["a", "b"], None, ["frozen", "finetune"])["phases"]
  assert phases["frozen"]["steady_images_per_sec"] == pytest.approx(90.0)
  assert phases["finetune"]["steady_images_per_sec"] == pytest.approx(0.2)
  assert phases["frozen"]["compile_seconds"] == pytest.approx(9.0)


def test_metrics_json_matches_the_last_logged_scalars(run):
  _, workdir, metrics, _ = run
  on_disk = json.loads((workdir / "report" / "metrics.json").read_text())
  assert on_disk["val_accuracy"] == metrics["val_accuracy"]
  validation = _phase_events(workdir, "validation")
  val_accuracy = {epoch: value for phase in ("frozen", "finetune")
                  for epoch, value in _scalars(validation[phase], "epoch_accuracy").items()}
  val_loss = _scalars(validation["finetune"], "epoch_loss")
  assert on_disk["val_accuracy"] == pytest.approx(val_accuracy[3])
  assert on_disk["val_loss"] == pytest.approx(val_loss[3], rel=1e-6)
  assert on_disk["phases"]["frozen"]["val_accuracy"] == pytest.approx(val_accuracy[2])
  assert on_disk["phases"]["finetune"]["val_accuracy"] == pytest.approx(val_accuracy[3])
  # Each phase's steady rate, as its throughput chart and the HParams dashboard show it.
  hparams_events = _events(workdir / "tensorboard" / summaries.HPARAMS_DIR)
  assert on_disk["phases"]["frozen"]["steady_images_per_sec"] == pytest.approx(
      _scalars(hparams_events, "frozen_images_per_sec")[3], rel=1e-6)
  # The one fine-tune epoch compiled at each of its two steps (a full and a partial batch): no steady rate.
  assert on_disk["phases"]["finetune"]["steady_images_per_sec"] is None
  assert "finetune_images_per_sec" not in _tags(hparams_events)
  assert all(on_disk["phases"][phase]["compile_seconds"] > 0 for phase in ("frozen", "finetune"))


def test_report_files_decode_and_agree_with_the_metrics(run):
  _, workdir, metrics, _ = run
  report = workdir / "report"
  for name in ("curves.png", "confusion_matrix.png"):
    image = _decoded((report / name).read_bytes())
    assert image.format == "PNG" and min(image.size) >= 200
  lines = (report / "classification_report.txt").read_text().splitlines()
  rows = {line.split()[0]: line.split()[1:] for line in lines if line.split() and line.split()[0] in CLASSES}
  # One validation image per class (5 images, validation_split 0.2).
  assert {name: int(values[3]) for name, values in rows.items()} == {name: 1 for name in CLASSES}
  accuracy = next(line.split() for line in lines if line.strip().startswith("accuracy"))
  assert float(accuracy[1]) == pytest.approx(metrics["val_accuracy"], abs=5e-5) and accuracy[2] == "3"


def test_progress_names_the_phase_of_every_epoch(run):
  _, _, _, printed = run
  for header in ("Epoch 1/3 (frozen phase)", "Epoch 2/3 (frozen phase)", "Epoch 3/3 (finetune phase)"):
    assert header in printed
  assert "accuracy:" in printed and "loss:" in printed
  # Not a terminal: no escapes or redraws, one progress line per epoch after its header.
  assert not {"\x1b", "\r", "\b"} & set(printed)
  lines = printed.splitlines()
  headers = [index for index, line in enumerate(lines) if line.startswith("Epoch ")]
  assert all("accuracy:" in lines[index + 1] for index in headers) and len(lines) == 2 * len(headers)


def test_a_quiet_continued_run_prints_nothing_and_extends_the_epoch_axis(run, tmp_path):
  config, workdir, _, _ = run
  continued = tmp_path / "run"
  shutil.copytree(workdir, continued)
  _, printed = _train(config.replace(finetune_epochs=2, verbosity=-1), continued)
  assert printed == ""
  assert sorted(_scalars(_events(continued / "tensorboard" / "finetune" / "validation"), "epoch_accuracy")) == [3, 4]
  run_events = _events(continued / "tensorboard")
  assert sorted(_images(run_events, "images/confusion_matrix")) == [1, 2, 3, 4]
  # The augmented images belong to the start of the run: a continued run does not log them again.
  assert len(run_events.Tensors("images/augmented_training")) == 1
  assert json.loads((continued / "report" / "metrics.json").read_text())["epochs"] == 4


def test_per_class_metrics_follow_their_definitions():
  # Rows are true classes, columns predictions; class 2 is never predicted.
  confusion = np.array([[3, 1, 0], [0, 2, 0], [1, 1, 0]])
  metrics = report_files.per_class_metrics(confusion)
  np.testing.assert_allclose(metrics["precision"], [3 / 4, 2 / 4, 0.0])
  np.testing.assert_allclose(metrics["recall"], [3 / 4, 2 / 2, 0 / 2])
  np.testing.assert_allclose(metrics["f1"], [3 / 4, 2 * 0.5 * 1.0 / 1.5, 0.0])
  np.testing.assert_array_equal(metrics["support"], [4, 2, 2])
  report = report_files.classification_report(confusion, ["a", "b", "c"])
  accuracy = next(line.split() for line in report.splitlines() if line.strip().startswith("accuracy"))
  assert accuracy[1:] == [f"{5 / 8:.4f}", "8"]


def _report_row(report: str, name: str) -> str:
  return next(line for line in report.splitlines() if line.split() and line.split()[0] == name)


def test_classification_report_notes_undefined_ratios_and_shows_shares_beside_counts():
  # Class c is never predicted; class d has no example (and is never predicted either).
  confusion = np.array([[3, 1, 0, 0], [0, 2, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
  report = report_files.classification_report(confusion, ["a", "b", "c", "d"])
  assert "never predicted" not in _report_row(report, "a") + _report_row(report, "b")
  assert "never predicted" in _report_row(report, "c") and "absent" not in _report_row(report, "c")
  assert "never predicted" in _report_row(report, "d") and "absent" in _report_row(report, "d")
  assert "precision is undefined" in report and "recall is undefined" in report
  # The matrix: class ids head the columns, rows name the class; each count with its share of the true class.
  matrix = report[report.index("Confusion matrix"):].splitlines()
  assert matrix[1].split() == ["#0", "#1", "#2", "#3"]
  assert matrix[2].split() == ["#0", "a", "3", "(75.0%)", "1", "(25.0%)", "0", "(0.0%)", "0", "(0.0%)"]
  assert matrix[4].split()[:6] == ["#2", "c", "1", "(50.0%)", "1", "(50.0%)"]


def test_a_report_with_every_class_predicted_has_no_notes():
  report = report_files.classification_report(np.array([[2, 1], [0, 3]]), ["a", "b"])
  assert "never predicted" not in report and "undefined" not in report


def _drawn_with_missing_glyphs(figure) -> list[str]:
  """The warnings matplotlib gives for characters the figure's fonts have no glyph for (drawn as empty boxes)."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    figure.savefig(io.BytesIO(), format="png")
  return [str(warning.message) for warning in caught if "missing from font" in str(warning.message)]


# Cat in French and Chinese; dog in Russian and Chinese.
NON_LATIN = ["chat", "\u732b", "\u0441\u043e\u0431\u0430\u043a\u0430 \u72ac"]


def test_non_latin_class_names_draw_without_empty_boxes_whatever_fonts_are_installed():
  images = np.zeros((3, 8, 8, 3))
  for figure in (report_files.confusion_matrix_figure(np.eye(3, dtype=np.int64), NON_LATIN, "t"),
                 report_files.image_grid_figure(images, [0, 1, 2], NON_LATIN)):
    assert _drawn_with_missing_glyphs(figure) == []
  labels = class_labels.figure_labels(NON_LATIN)
  assert labels.texts[0] == "chat"
  for index in (1, 2):  # Drawn by name where some font has the glyphs, else by class id with a legend.
    assert labels.texts[index] in (NON_LATIN[index], f"#{index}")
    assert (labels.texts[index] == f"#{index}") == (f"#{index} = {NON_LATIN[index]}" in labels.legend())


def test_a_name_no_installed_font_draws_shows_as_its_class_id_with_a_legend(monkeypatch):
  # A fresh machine: only matplotlib's own fonts (DejaVu Sans has Cyrillic, no CJK).
  default = class_labels.rcParams["font.sans-serif"][0]
  monkeypatch.setattr(class_labels, "_charmaps", lambda: {default: frozenset(range(0x3000))})
  monkeypatch.setattr(class_labels, "_add_fonts_missing_from_the_cache", lambda: False)
  labels = class_labels.figure_labels(NON_LATIN)
  assert labels.texts == ("chat", "#1", "#2") and labels.by_id == (1, 2)
  assert "\u732b" in labels.legend() and "#1" in labels.note() and "#2" in labels.note()
  report = report_files.classification_report(np.eye(3, dtype=np.int64), NON_LATIN)
  assert "#1 \u732b " in report and "#2 \u0441\u043e\u0431\u0430\u043a\u0430 \u72ac " in report
  figure = report_files.confusion_matrix_figure(np.eye(3, dtype=np.int64), NON_LATIN, "t")
  assert labels.note() in [text.get_text() for text in figure.texts]


def test_a_font_with_the_glyphs_draws_the_name(monkeypatch):
  default = class_labels.rcParams["font.sans-serif"][0]
  monkeypatch.setattr(class_labels, "_charmaps", lambda: {default: frozenset(range(0x3000)),
                                                       "Some CJK": frozenset({0x732B, 0x72AC})})
  labels = class_labels.figure_labels(NON_LATIN)
  assert labels.texts == tuple(NON_LATIN) and labels.by_id == () and labels.fonts == (default, "Some CJK")


def test_long_class_names_end_in_an_ellipsis_on_figures():
  name = "a_very_long_class_name_for_blue_things"
  short = class_labels.figure_labels([name]).texts[0]
  assert short.endswith("\u2026") and len(short) <= class_labels.MAX_LABEL_CHARS and name.startswith(short[:-1])
  assert class_labels.figure_labels(["red"]).texts == ("red",)
  report = report_files.classification_report(np.eye(1, dtype=np.int64), [name])
  assert name in report


def test_validation_confusion_matrix_sums_over_replicas():
  """Under a two-replica MirroredStrategy (two logical CPUs, so in a fresh process), the confusion matrix of
  `run_epoch` counts every example once and matches the model's own predictions."""
  script = textwrap.dedent("""
      import numpy as np, tensorflow as tf
      cpu = tf.config.list_physical_devices("CPU")[0]
      tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
      from trainer.loop import steps
      from trainer.runtime import runtime
      from trainer.config import Config
      config = runtime.resolve(Config().replace(backbone="mobilenet", alpha=0.25, weights="none", image_size=32,
                                              head_units=4, augment="none"))
      strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
      trainer = steps.Trainer(config, 3, strategy)
      rng = np.random.default_rng(0)
      images = rng.uniform(0, 255, (14, 32, 32, 3)).astype(np.float32)
      labels = rng.integers(0, 3, 14).astype(np.int32)
      # (images, labels, weights, ids) batches, as the training loop distributes them.
      examples = (images, labels, np.ones(14, np.float32), np.arange(14, dtype=np.int32))
      batches = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices(examples).batch(4))
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


def test_a_font_installed_after_matplotlibs_cache_was_built_draws_the_name(monkeypatch):
  """matplotlib lists fonts once, in its cache: a font installed later is found among the system's fonts."""
  from matplotlib import font_manager
  default = class_labels.rcParams["font.sans-serif"][0]
  default_codes = class_labels._codes_of(font_manager.findfont(default))
  # A font with a letter no other font has stands for the CJK font installed after the cache.
  charmaps = class_labels._charmaps()
  font, code = next((font, code) for font in font_manager.fontManager.ttflist if font.name in charmaps
                    and font.name != default
                    for code in sorted(class_labels._codes_of(font.fname) - default_codes) if chr(code).isalpha()
                    and not any(code in codes for name, codes in charmaps.items() if name != font.name))
  stale = copy.copy(font_manager.fontManager)
  stale.ttflist = [entry for entry in font_manager.fontManager.ttflist if entry.name != font.name]
  monkeypatch.setattr(font_manager, "fontManager", stale)
  monkeypatch.setattr(font_manager, "findSystemFonts", lambda *args, **kwargs: [font.fname])
  class_labels._add_fonts_missing_from_the_cache.cache_clear()
  try:
    labels = class_labels.figure_labels([chr(code)])
  finally:
    class_labels._add_fonts_missing_from_the_cache.cache_clear()
  assert labels.texts == (chr(code),) and labels.by_id == () and font.name in labels.fonts


def test_the_legend_of_names_drawn_by_id_says_how_to_fix_it_in_one_line(monkeypatch):
  default = class_labels.rcParams["font.sans-serif"][0]
  monkeypatch.setattr(class_labels, "_charmaps", lambda: {default: frozenset(range(0x3000))})
  monkeypatch.setattr(class_labels, "_add_fonts_missing_from_the_cache", lambda: False)
  labels = class_labels.figure_labels(NON_LATIN)
  for text in (labels.note(), labels.legend()):
    assert "\n" not in text and "install" in text.lower()


def test_the_steady_rate_leaves_out_every_step_that_compiled(random_mobilenet_025_weights):
  """Batches of 4, 4, 4 and a partial 2: the first step and the partial one trace the step (here a trace takes
  1.5 s more); the steady rate is that of the two steps between. Compared with the epoch's own rate rather than a
  number of images a second: a loaded machine (CI, a shared VM) slows every step, not the comparison."""
  config = runtime.resolve(Config().replace(backbone="mobilenet", alpha=0.25, weights="none", image_size=32,
                                          head_units=4, augment="none"))
  trainer = steps.Trainer(config, 3, tf.distribute.get_strategy())
  real_step = trainer._eval_step
  trace_seconds = 1.5

  @tf.function
  def slow_to_trace(*batch):
    time.sleep(trace_seconds)  # Python: runs while tracing only.
    return real_step(*batch)
  trainer._eval_step = slow_to_trace
  rng = np.random.default_rng(0)
  examples = (rng.uniform(0, 255, (14, 32, 32, 3)).astype(np.float32), rng.integers(0, 3, 14).astype(np.int32),
              np.ones(14, np.float32), np.arange(14, dtype=np.int32))
  metrics = trainer.run_epoch(tf.data.Dataset.from_tensor_slices(examples).batch(4), training=False, steps=4,
                              progress=False)
  assert metrics["examples"] == 14
  assert metrics["compile_seconds"] >= 2 * trace_seconds
  # Counting the traces, the rate would be the epoch's (14 images over both traces and every step).
  assert metrics["steady_images_per_sec"] > 1.5 * metrics["examples"] / metrics["seconds"]
  assert metrics["seconds"] - metrics["compile_seconds"] < metrics["compile_seconds"]


def test_a_report_figure_is_written_whole_or_not_at_all(tmp_path):
  """A chief lost while drawing left a truncated PNG that the page then showed: the previous figure stays."""
  path = tmp_path / "report" / "curves.png"
  report_files.write_png(report_files.curves_figure([]), str(path))
  before = path.read_bytes()

  class KilledWhileDrawing(Figure):
    def savefig(self, target, **kwargs):
      target.write(before[:20])
      raise OSError("killed")
  with pytest.raises(OSError, match="killed"):
    report_files.write_png(KilledWhileDrawing(), str(path))
  assert path.read_bytes() == before and os.listdir(path.parent) == ["curves.png"]
