"""python -m trainer.evaluate --workdir=DIR [--data_dir=TEST_DIR] [--top_k=K]: how well a trained run classifies.

Without a data source, the run's own validation split is evaluated; with one (--data_dir, --csv or --tfds), every
image of that source (its train and validation splits together: a held-out test set). Its class names must be
classes of the run. Writes to WORKDIR/report/: eval_metrics.json (accuracy, top-k accuracy, loss, per-class
precision/recall/F1/support, their averages and the confusion matrix), eval_classification_report.txt and
eval_confusion_matrix.png, and prints the classification report.
"""

import os

import numpy as np
import tensorflow as tf
from absl import app

from trainer import data, reporting, restore, sources
from trainer import flags as trainer_flags
from trainer import workdir as workdir_lib
from trainer.errors import UserInputError, exit_on_user_error

METRICS_FILE = "eval_metrics.json"
REPORT_FILE = "eval_classification_report.txt"
CONFUSION_FILE = "eval_confusion_matrix.png"

_OVERRIDABLE = restore.DATA_SOURCE_FIELDS + ("batch_size", "top_k")


def evaluate(workdir: str, overrides: dict | None = None) -> dict:
  """Evaluates the latest checkpoint of `workdir`, writes the report files and returns the metrics."""
  overrides = overrides or {}
  trained = restore.restore(workdir, overrides)
  config, classes = trained.config, trained.classes
  inputs = data.load(config.data, config.data.image_size, os.path.join(workdir, "cache"))
  unknown = sorted(set(inputs.classes) - set(classes))
  if unknown:
    raise UserInputError(f"The evaluation data has classes the run was not trained on: {unknown}. The run knows "
                         f"{list(classes)}; rename or remove those class folders.")
  given_source = any(name in overrides for name in restore.DATA_SOURCE_FIELDS)
  examples = inputs.val.images.concatenate(inputs.train.images) if given_source else inputs.val.images
  # Labels of the evaluation source, renumbered to the run's class order (the source may lack some classes).
  to_run_label = tf.constant([classes.index(name) for name in inputs.classes], tf.int32)
  labels, probabilities = [], []
  for images, source_labels in data.batches(examples, config.data.batch_size):
    labels.append(tf.gather(to_run_label, source_labels).numpy())
    probabilities.append(trained.model(images, training=False).numpy())
  labels, probabilities = np.concatenate(labels), np.concatenate(probabilities)

  metrics = {"workdir": workdir, "checkpoint": trained.checkpoint,
             "data": _describe_source(config.data) if given_source else "the run's validation split",
             **classification_metrics(labels, probabilities, classes, config.export.top_k)}
  run = workdir_lib.RunDir(workdir)
  confusion = np.array(metrics["confusion_matrix"])
  workdir_lib.write_json(os.path.join(run.report, METRICS_FILE), metrics)
  reporting.write_classification_report(confusion, classes, os.path.join(run.report, REPORT_FILE))
  reporting.write_confusion_matrix_png(confusion, classes, os.path.join(run.report, CONFUSION_FILE),
                                       title=f"Evaluation on {metrics['data']}")
  return metrics


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray, classes: tuple[str, ...],
                           top_k: int) -> dict:
  """Accuracy, top-k accuracy, loss, per-class precision/recall/F1/support and the confusion matrix (rows: true
  class, columns: predicted) of predicted `probabilities` [N, C] against integer `labels` [N]."""
  num_classes = len(classes)
  k = min(top_k, num_classes)
  predicted = np.argmax(probabilities, axis=1)
  confusion = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(confusion, (labels, predicted), 1)
  # Rank of the true class: the number of classes scored higher (ties count in the label's favour).
  true_scores = probabilities[np.arange(len(labels)), labels]
  rank = np.sum(probabilities > true_scores[:, None], axis=1)
  per_class = reporting.per_class_metrics(confusion)
  support = per_class["support"]
  weights = support / max(1, support.sum())
  averages = {name: {metric: float(average(per_class[metric])) for metric in ("precision", "recall", "f1")}
              for name, average in (("macro_avg", np.mean), ("weighted_avg", lambda v: np.sum(v * weights)))}
  return {"examples": int(len(labels)),
          "accuracy": float(np.mean(predicted == labels)),
          "top_k": k, "top_k_accuracy": float(np.mean(rank < k)),
          "loss": float(np.mean(-np.log(np.maximum(true_scores, 1e-7)))),
          "per_class": {name: {"precision": float(per_class["precision"][i]), "recall": float(per_class["recall"][i]),
                               "f1": float(per_class["f1"][i]), "support": int(support[i])}
                        for i, name in enumerate(classes)},
          **averages,
          "classes": list(classes), "confusion_matrix": confusion.tolist()}


def _describe_source(config) -> str:
  name = sources.chosen(config)
  return f"--{name}={getattr(config, name)}"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  given = trainer_flags.FLAGS
  with exit_on_user_error():
    metrics = evaluate(given.workdir, restore.flag_overrides(given, _OVERRIDABLE))
  report = os.path.join(workdir_lib.RunDir(given.workdir).report, REPORT_FILE)
  with open(report, encoding="utf-8") as f:
    print(f.read(), end="")
  print(f"top-{metrics['top_k']} accuracy {metrics['top_k_accuracy']:.4f} on {metrics['examples']} images of "
        f"{metrics['data']}; report in {os.path.dirname(report)}")


def run_script():
  app.run(main)


if __name__ == "__main__":
  run_script()
