"""Evaluation of a trained run: the metrics are right, and the report files describe the data evaluated."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import write_image
from trainer import evaluate
from trainer.errors import UserInputError


def test_metrics_of_known_predictions():
  labels = np.array([0, 0, 0, 1, 1, 2])
  probabilities = np.array([[.8, .1, .1], [.4, .5, .1], [.3, .3, .4], [.2, .7, .1], [.5, .3, .2], [.1, .2, .7]])

  metrics = evaluate.classification_metrics(labels, probabilities, ("a", "b", "c"), top_k=2)

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

  metrics = evaluate.classification_metrics(labels, probabilities, ("a", "b", "c"), top_k=2)

  assert metrics["top_k_accuracy"] == pytest.approx(0.5)


def test_evaluates_the_runs_validation_split_into_the_report(trained_workdir):
  metrics = evaluate.evaluate(str(trained_workdir))

  run_facts = json.loads((trained_workdir / "config.json").read_text())["run"]
  written = json.loads((trained_workdir / "report" / evaluate.METRICS_FILE).read_text())
  assert written == json.loads(json.dumps(metrics))
  confusion = np.array(metrics["confusion_matrix"])
  assert confusion.sum() == metrics["examples"] == run_facts["val_examples"]
  assert metrics["accuracy"] == pytest.approx(np.trace(confusion) / confusion.sum())
  assert [metrics["per_class"][name]["support"] for name in run_facts["classes"]] == confusion.sum(axis=1).tolist()
  report = (trained_workdir / "report" / evaluate.REPORT_FILE).read_text()
  assert all(name in report for name in run_facts["classes"])
  with Image.open(trained_workdir / "report" / evaluate.CONFUSION_FILE) as png:
    assert png.format == "PNG"


def test_a_test_folder_with_some_of_the_classes_is_evaluated_whole(trained_workdir, tmp_path):
  for name, color in (("red", (220, 40, 40)), ("blue", (40, 60, 220))):
    for i in range(3):
      write_image(tmp_path / "test" / name / f"{i}.png", color, size=(50, 30))

  metrics = evaluate.evaluate(str(trained_workdir), {"data_dir": str(tmp_path / "test")})

  assert metrics["examples"] == 6
  assert metrics["per_class"]["green"]["support"] == 0
  assert metrics["per_class"]["red"]["support"] == metrics["per_class"]["blue"]["support"] == 3
  assert metrics["data"] == f"--data_dir={tmp_path / 'test'}"


def test_classes_the_run_does_not_know_are_refused(trained_workdir, tmp_path):
  for name in ("red", "purple"):
    for i in range(2):
      write_image(tmp_path / "test" / name / f"{i}.jpg", (200, 40, 200))

  with pytest.raises(UserInputError, match="purple"):
    evaluate.evaluate(str(trained_workdir), {"data_dir": str(tmp_path / "test")})
