"""Evaluation of a trained run: the metrics are right, and the report files describe the data evaluated."""

import json
import re

import numpy as np
import pytest
from conftest import CLASS_COLORS, write_image
from PIL import Image

from trainer import evaluate
from trainer.command import flags as trainer_flags
from trainer.command import usage
from trainer.config import Config
from trainer.errors import UserInputError
from trainer.loop import evaluation


def test_metrics_of_known_predictions():
  labels = np.array([0, 0, 0, 1, 1, 2])
  probabilities = np.array([[.8, .1, .1], [.4, .5, .1], [.3, .3, .4], [.2, .7, .1], [.5, .3, .2], [.1, .2, .7]])

  metrics = evaluation.classification_metrics(labels, probabilities, ("a", "b", "c"), top_k=2)

  assert metrics["confusion_matrix"] == [[1, 1, 1], [1, 1, 0], [0, 0, 1]]
  assert metrics["accuracy"] == pytest.approx(3 / 6)
  # The true class is among the two best everywhere; in the third example it ties for second place.
  assert metrics["top_k_accuracy"] == pytest.approx(6 / 6)
  assert metrics["per_class"]["a"] == pytest.approx({"precision": 0.5, "recall": 1 / 3, "f1": 0.4, "support": 3})
  assert metrics["per_class"]["c"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
  assert metrics["macro_avg"]["recall"] == pytest.approx((1 / 3 + 1 / 2 + 1) / 3)
  assert metrics["loss"] == pytest.approx(-np.mean(np.log([.8, .4, .3, .7, .3, .7])))


def test_top_k_accuracy_counts_only_the_k_best():
  labels = np.array([2, 2])
  probabilities = np.array([[.5, .3, .2], [.2, .3, .5]])

  metrics = evaluation.classification_metrics(labels, probabilities, ("a", "b", "c"), top_k=2)

  assert metrics["top_k_accuracy"] == pytest.approx(0.5)


def test_evaluates_the_runs_validation_split_into_the_report(trained_workdir):
  metrics = evaluation.evaluate(str(trained_workdir))

  run_facts = json.loads((trained_workdir / "config.json").read_text())["run"]
  written = json.loads((trained_workdir / "report" / evaluation.METRICS_FILE).read_text())
  assert written == json.loads(json.dumps(metrics))
  confusion = np.array(metrics["confusion_matrix"])
  assert confusion.sum() == metrics["examples"] == run_facts["val_examples"]
  assert metrics["accuracy"] == pytest.approx(np.trace(confusion) / confusion.sum())
  assert [metrics["per_class"][name]["support"] for name in run_facts["classes"]] == confusion.sum(axis=1).tolist()
  report = (trained_workdir / "report" / evaluation.REPORT_FILE).read_text()
  assert all(name in report for name in run_facts["classes"])
  with Image.open(trained_workdir / "report" / evaluation.CONFUSION_FILE) as png:
    assert png.format == "PNG"


def test_a_test_folder_with_some_of_the_classes_is_evaluated_whole(trained_workdir, tmp_path):
  for name, color in (("red", (220, 40, 40)), ("blue", (40, 60, 220))):
    for i in range(3):
      write_image(tmp_path / "test" / name / f"{i}.png", color, size=(50, 30))

  metrics = evaluation.evaluate(str(trained_workdir), {"data_dir": str(tmp_path / "test")})

  assert metrics["examples"] == 6
  assert metrics["per_class"]["green"]["support"] == 0
  assert metrics["per_class"]["red"]["support"] == metrics["per_class"]["blue"]["support"] == 3
  assert metrics["data"] == f"--data_dir={tmp_path / 'test'}"


def test_classes_the_run_does_not_know_are_refused(trained_workdir, tmp_path):
  for name in ("red", "purple"):
    for i in range(2):
      write_image(tmp_path / "test" / name / f"{i}.jpg", (200, 40, 200))

  with pytest.raises(UserInputError, match="purple"):
    evaluation.evaluate(str(trained_workdir), {"data_dir": str(tmp_path / "test")})


def _write_classes(root, names, per_class=3):
  for name in names:
    for i in range(per_class):
      write_image(root / name / f"{i}.png", CLASS_COLORS[name], size=(50, 30))


def test_a_folder_with_train_and_val_is_evaluated_on_val_only_and_says_so(trained_workdir, tmp_path):
  _write_classes(tmp_path / "d" / "train", CLASS_COLORS, per_class=4)
  _write_classes(tmp_path / "d" / "val", ("red", "blue"), per_class=2)

  metrics = evaluation.evaluate(str(trained_workdir), {"data_dir": str(tmp_path / "d")})

  assert metrics["examples"] == 4 and metrics["per_class"]["green"]["support"] == 0
  assert "val/ folder only; train/ not evaluated" in metrics["data"]
  assert "val/ folder only" in evaluation.summary(metrics, "report")


def test_a_single_class_test_folder_is_evaluated(trained_workdir, tmp_path):
  _write_classes(tmp_path / "test", ("green",))

  metrics = evaluation.evaluate(str(trained_workdir), {"data_dir": str(tmp_path / "test")})

  assert metrics["examples"] == metrics["per_class"]["green"]["support"] == 3


def test_skipped_test_files_are_listed_where_the_warning_says(trained_workdir, tmp_path, caplog):
  _write_classes(tmp_path / "test", ("red", "blue"))
  (tmp_path / "test" / "red" / "scan.tif").write_bytes(b"II*\0")
  (tmp_path / "test" / "blue" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")

  metrics = evaluation.evaluate(str(trained_workdir), {"data_dir": str(tmp_path / "test")})

  metrics_file = trained_workdir / "report" / evaluation.METRICS_FILE
  listed = json.loads(metrics_file.read_text())["skipped_files"]
  assert sorted(entry["path"].rsplit("/", 1)[-1] for entry in listed) == ["scan.tif", "truncated.jpg"]
  assert all(entry["reason"] for entry in listed) and metrics["examples"] == 6
  warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Skipping 2 ")]
  assert len(warnings) == 1 and str(metrics_file) in warnings[0]
  assert f"2 file(s) skipped, listed in {metrics_file}" in evaluation.summary(metrics, str(metrics_file.parent))


def test_the_command_prints_accuracy_and_ends_mistakes_in_one_line(trained_workdir, tmp_path, capsys):
  _write_classes(tmp_path / "test", ("red", "blue"))
  _write_classes(tmp_path / "only_train" / "train", ("red", "blue"))

  def run(*args):
    trainer_flags.FLAGS(["evaluate", f"--workdir={trained_workdir}", *args])
    try:
      evaluate.main(["evaluate"])
    finally:
      trainer_flags.FLAGS.unparse_flags()
    return capsys.readouterr()

  printed = run(f"--data_dir={tmp_path / 'test'}").out.splitlines()[-1]
  written = json.loads((trained_workdir / "report" / evaluation.METRICS_FILE).read_text())
  assert printed.startswith(f"accuracy {written['accuracy']:.4f} (top-{written['top_k']} ")
  assert " on 6 images of --data_dir=" in printed
  for args, message in (([f"--data_dir={tmp_path / 'only_train'}"], "holds only train/"),
                        (["--image_size=64"], "--image_size: not used by trainer.evaluate"),
                        (["--batch_size=0"], "--batch_size=0: must be at least 1")):
    with pytest.raises(SystemExit) as exit_:
      run(*args)
    errors = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and len(errors) == 1 and message in errors[0]


def test_help_lists_only_the_flags_evaluation_reads(capsys):
  with pytest.raises(SystemExit) as exit_:
    usage.parse(["evaluate", "--help"], evaluate.__doc__, evaluate.HELP_GROUPS)

  listed = re.findall(r"^  --(?:\[no\])?(\w+):", capsys.readouterr().out, re.MULTILINE)
  assert exit_.value.code == 0
  assert {"workdir", "data_dir", "csv", "top_k"} <= set(listed) and "frozen_epochs" not in listed


def _tiny_tfds(data_dir, splits):
  """A TFDS dataset of the run's classes built locally (downloads fail offline): 2 solid images per class."""
  import tensorflow_datasets as tfds

  class RunColors(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    name = "run_colors_" + "_".join(splits)

    def _info(self):
      features = tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(None, None, 3)),
                                             "label": tfds.features.ClassLabel(names=sorted(CLASS_COLORS))})
      return tfds.core.DatasetInfo(builder=self, features=features, supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(split) for split in splits}

    def _generate_examples(self, split):
      for i, name in enumerate(sorted(CLASS_COLORS) * 2):
        yield f"{split}{i}", {"image": np.full((20, 24, 3), CLASS_COLORS[name], np.uint8),
                              "label": sorted(CLASS_COLORS).index(name)}

  RunColors(data_dir=str(data_dir)).download_and_prepare()
  return RunColors.name


def test_a_tfds_dataset_is_evaluated_on_its_test_split_and_says_so(trained_workdir, tmp_path):
  name = _tiny_tfds(tmp_path, ("train", "test"))

  metrics = evaluation.evaluate(str(trained_workdir), {"tfds": name, "tfds_data_dir": str(tmp_path)})

  assert metrics["examples"] == 6 and metrics["data"] == f"--tfds={name} (its test split)"
  assert all(metrics["per_class"][c]["support"] == 2 for c in CLASS_COLORS)


def test_the_train_split_of_the_runs_own_tfds_dataset_is_refused(tmp_path):
  name = _tiny_tfds(tmp_path, ("train",))
  config = Config().replace(tfds=name, tfds_data_dir=str(tmp_path)).data

  with pytest.raises(UserInputError, match="has only a train split, and the run trained on it"):
    evaluation._tfds_test_split(config, trained_on=name)
  assert evaluation._tfds_test_split(config, trained_on="another")[3] == f"--tfds={name} (its train split)"


def test_the_runs_own_training_images_are_refused_as_a_test_set(trained_workdir):
  with pytest.raises(UserInputError, match=r"of its 18 images are training images of the run .* validation split"):
    evaluation.evaluate(str(trained_workdir), {"data_dir": str(trained_workdir.parent / "data")})
