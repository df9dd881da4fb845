"""How well a trained run classifies: the evaluation behind `python -m trainer.evaluate` (see its help).

Evaluates the latest checkpoint on the run's validation split or a held-out test set, and writes to
WORKDIR/report/: eval_metrics.json, eval_classification_report.txt and eval_confusion_matrix.png.
"""

import os

import numpy as np
import tensorflow as tf

from trainer.config import SOURCE_FLAGS
from trainer.errors import UserInputError
from trainer.input import data, data_checks, images, sources, tfds_source
from trainer.loop import restore
from trainer.reporting import report_files
from trainer.runtime import workdir as workdir_lib

METRICS_FILE = "eval_metrics.json"
REPORT_FILE = "eval_classification_report.txt"
CONFUSION_FILE = "eval_confusion_matrix.png"


def evaluate(workdir: str, overrides: dict | None = None) -> dict:
  """Evaluates the latest checkpoint of `workdir`, writes the report files and returns the metrics."""
  overrides = overrides or {}
  for name in ("batch_size", "top_k"):
    if overrides.get(name, 1) < 1:
      raise UserInputError(f"--{name}={overrides[name]}: must be at least 1.")
  trained = restore.restore(workdir, overrides)
  config, classes = trained.config, trained.classes
  run = workdir_lib.RunDir(workdir)
  metrics_path = os.path.join(run.report, METRICS_FILE)
  given = sources.chosen(config.data) if any(name in overrides for name in SOURCE_FLAGS) else None
  source_classes, examples, skipped, described = _evaluation_data(config.data, given, run, metrics_path)
  unknown = sorted(set(source_classes) - set(classes))
  if unknown:
    raise UserInputError(f"The evaluation data has classes the run was not trained on: {unknown}. The run knows "
                         f"{list(classes)}; rename or remove those class folders.")
  # Labels of the evaluation source, renumbered to the run's class order (the source may lack some classes).
  to_run_label = tf.constant([classes.index(name) for name in source_classes], tf.int32)
  labels, probabilities = [], []
  for batch, source_labels in data.batches(examples, config.data.batch_size):
    labels.append(tf.gather(to_run_label, source_labels).numpy())
    probabilities.append(trained.model(batch, training=False).numpy())
  labels, probabilities = np.concatenate(labels), np.concatenate(probabilities)

  metrics = {"workdir": workdir, "checkpoint": trained.checkpoint, "data": described,
             **classification_metrics(labels, probabilities, classes, config.export.top_k),
             "skipped_files": [{"path": path, "reason": why} for path, why in sorted(skipped.items())]}
  confusion = np.array(metrics["confusion_matrix"])
  workdir_lib.write_json(metrics_path, metrics)
  report_files.write_classification_report(confusion, classes, os.path.join(run.report, REPORT_FILE))
  report_files.write_confusion_matrix_png(confusion, classes, os.path.join(run.report, CONFUSION_FILE),
                                       title=f"Evaluation on {metrics['data']}")
  return metrics


def _evaluation_data(config, given: str | None, run: workdir_lib.RunDir,
                     metrics_path: str) -> tuple[tuple[str, ...], tf.data.Dataset, dict[str, str], str]:
  """(classes, (float32 image, label) examples, skipped files -> why, description) of the source flag `given`, or
  of the run's validation split for None. Never the run's own training examples."""
  trained_on = run.load_config().data
  if given in ("data_dir", "csv"):
    return _test_files(config, metrics_path, trained_on)
  if given == "tfds":
    return _tfds_test_split(config, trained_on.tfds)
  if given == "tfrecord" and os.path.abspath(config.tfrecord) == os.path.abspath(trained_on.tfrecord or "-"):
    raise UserInputError(f"--tfrecord={config.tfrecord} holds the records the run trained on: leave out the data "
                         "source to evaluate the run's validation split, or give a test set.")
  inputs = data.load(config, config.image_size, os.path.join(run.root, "cache"))
  examples = inputs.val.images.concatenate(inputs.train.images) if given else inputs.val.images
  described = f"--{given}={getattr(config, given)}" if given else "the run's validation split"
  return inputs.classes, examples, inputs.skipped, described


def _training_files_among(paths, trained_on) -> list[str]:
  """The files among `paths` that the run trained on (by real path), when its file source can still be read."""
  if sources.chosen(trained_on) not in ("data_dir", "csv"):
    return []
  try:
    trained = set(map(os.path.realpath, sources.find_files(trained_on).train.paths))
  except UserInputError:  # The training data moved or changed; nothing to compare.
    return []
  return sorted(path for path in paths if os.path.realpath(path) in trained)


def _tfds_test_split(config, trained_on: str) -> tuple[tuple[str, ...], tf.data.Dataset, dict[str, str], str]:
  """(classes, (float32 image, label) examples, no skipped files, description) of a TFDS dataset's held-out
  split (`trained_on`: the run's --tfds)."""
  classes, split, encoded = tfds_source.tfds_test_split(config)
  if split == "train" and config.tfds == trained_on:
    raise UserInputError(f"--tfds={config.tfds} has only a train split, and the run trained on it: leave out the "
                         "data source to evaluate the run's validation split, or give a test set.")
  size = config.image_size
  examples = encoded.map(lambda image, label: (tf.cast(images.load(image, size), tf.float32),
                                               tf.cast(label, tf.int32)), num_parallel_calls=tf.data.AUTOTUNE)
  return classes, examples, {}, f"--tfds={config.tfds} (its {split} split)"


def _test_files(config, metrics_path: str,
                trained_on) -> tuple[tuple[str, ...], tf.data.Dataset, dict[str, str], str]:
  """(classes, (float32 image, label) examples, skipped files -> why, description) of a test folder or CSV, which
  must hold none of the run's training images (`trained_on`: the run's data config)."""
  test = sources.find_test_files(config)
  seen = _training_files_among(test.files.paths, trained_on)
  if seen:
    raise UserInputError(f"{test.description}: {len(seen)} of its {len(test.files)} images are training images of "
                         f"the run (e.g. {seen[0]}): accuracy on them says nothing about new images. Leave out "
                         "the data source to evaluate the run's validation split, or give images the run did not "
                         "train on.")
  scan = data_checks.scan(test.files.paths, config.max_image_pixels)
  skipped = {**test.skipped, **scan.unreadable}
  data_checks.report_unreadable(skipped, config.strict_data, listed_in=metrics_path)
  usable = test.files.without(scan.unreadable)
  if not usable:
    raise UserInputError(f"{test.description}: none of its {len(test.files)} image file(s) can be used (all listed "
                         f"with the reason in {metrics_path}). Fix or replace them.")
  size = config.image_size
  examples = tf.data.Dataset.from_tensor_slices((list(usable.paths), tf.constant(usable.labels, tf.int32))).map(
      lambda path, label: (tf.cast(images.load(tf.io.read_file(path), size), tf.float32), label),
      num_parallel_calls=tf.data.AUTOTUNE)
  return test.classes, examples, skipped, test.description


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
  per_class = report_files.per_class_metrics(confusion)
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


def summary(metrics: dict, report_dir: str) -> str:
  """The one line a person reads last: accuracy (and top-k), on how many images of what, what was skipped."""
  skipped = len(metrics["skipped_files"])
  return (f"accuracy {metrics['accuracy']:.4f} (top-{metrics['top_k']} {metrics['top_k_accuracy']:.4f}) on "
          f"{metrics['examples']} images of {metrics['data']}"
          + (f"; {skipped} file(s) skipped, listed in {os.path.join(report_dir, METRICS_FILE)}" if skipped else "")
          + f"; report in {report_dir}")
