"""Seeing a run: its TensorBoard summaries while it trains, and the plots and tables of WORKDIR/report/ after.

Everything here takes plain Python and numpy values (an epoch record of the training history, a confusion matrix
of counts with true classes as rows), so that evaluation can draw the same figures for any model. Figures are
drawn on `matplotlib.figure.Figure` objects, which render with the Agg backend and leave pyplot's global state
(and an interactive backend) alone.
"""

import io
import json
import os
from typing import Sequence

import numpy as np
import tensorflow as tf
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from tensorboard.plugins.hparams import api as hp

from trainer.config import Config
from trainer.model import FINETUNE, FROZEN

# The model phases as a scalar, so the phase boundary shows as a step on TensorBoard's epoch axis.
PHASE_VALUES = {FROZEN: 0, FINETUNE: 1}

# Confusion matrices with more classes than this are drawn without a count in every cell (it would be illegible).
_MAX_ANNOTATED_CLASSES = 25


class TensorBoardLog:
  """The summaries of one run under WORKDIR/tensorboard.

  `train/` and `validation/` hold the per-epoch scalars under the same tags (so TensorBoard draws train and
  validation on one chart), with the 1-based epoch number as step, continuous across both phases. The folder itself
  holds what belongs to the run as a whole: its config as text and its HParams, whose metrics are the validation
  and train scalars (the HParams dashboard shows their last value).
  """

  def __init__(self, log_dir: str | None, classes: Sequence[str]):
    """`log_dir` None logs nothing (a worker that is not the chief of a multi-worker run)."""
    self.classes = list(classes)
    if log_dir is None:
      self._run = self._train = self._validation = tf.summary.create_noop_writer()
    else:
      self._run = tf.summary.create_file_writer(log_dir)
      self._train = tf.summary.create_file_writer(os.path.join(log_dir, "train"))
      self._validation = tf.summary.create_file_writer(os.path.join(log_dir, "validation"))

  def log_run(self, config: Config, facts: dict) -> None:
    """The config (and the run's resolved facts: precision, replicas, classes) as text, and the HParams."""
    values = hparams_of(config, facts)
    with self._run.as_default(step=0):
      hp.hparams_config(hparams=[hp.HParam(name) for name in values], metrics=_HPARAMS_METRICS)
      hp.hparams(values)
      text = json.dumps({**config.to_dict(), "run": facts}, indent=2, default=str)
      # Indented by four spaces: TensorBoard renders text summaries as Markdown, and this keeps the JSON verbatim.
      tf.summary.text("config", "\n".join("    " + line for line in text.splitlines()))
    self._run.flush()

  def log_training_images(self, images: np.ndarray, labels: np.ndarray) -> None:
    """A grid of training images after augmentation (what the model sees), as one image at step 0."""
    figure = image_grid_figure(images, [self.classes[label] for label in labels])
    with self._train.as_default(step=0):
      tf.summary.image("augmented_training_images", _png_tensor(figure),
                       description="The first training batch after augmentation, before the backbone's "
                                   "preprocessing.")
    self._train.flush()

  def log_epoch(self, record: dict, confusion: np.ndarray) -> None:
    """The scalars of one epoch record (see `trainer.train`), and the validation confusion matrix as an image."""
    step = record["epoch"]
    with self._train.as_default(step=step):
      tf.summary.scalar("epoch_loss", record["loss"])
      tf.summary.scalar("epoch_accuracy", record["accuracy"])
      tf.summary.scalar("epoch_learning_rate", record["learning_rate"])
      tf.summary.scalar("epoch_images_per_sec", record["images_per_sec"],
                        description="Training images per second (input, augmentation and train step).")
      tf.summary.scalar("epoch_phase", PHASE_VALUES[record["phase"]], description="0: frozen, 1: fine-tune.")
    with self._validation.as_default(step=step):
      tf.summary.scalar("epoch_loss", record["val_loss"])
      tf.summary.scalar("epoch_accuracy", record["val_accuracy"])
      figure = confusion_matrix_figure(confusion, self.classes, f"Validation after epoch {step} ({record['phase']})")
      tf.summary.image("confusion_matrix", _png_tensor(figure))
    self._train.flush()
    self._validation.flush()

  def log_phase_start(self, epoch: int, phase: str, config: Config) -> None:
    """A text marker at the first epoch of a phase (the 1-based `epoch`), beside the step of `epoch_phase`."""
    if phase == FROZEN:
      what = f"Only the head trains, learning rate {config.train.frozen_lr:g}."
    else:
      what = (f"The backbone from layer {config.model.unfreeze_from} up trains too, learning rate "
              f"{config.train.finetune_lr:g}.")
    with self._run.as_default(step=epoch):
      tf.summary.text("phase", f"Epoch {epoch}: the {phase} phase starts. {what}")
    self._run.flush()

  def close(self) -> None:
    for writer in (self._run, self._train, self._validation):
      writer.close()


_HPARAMS_METRICS = [
    hp.Metric("epoch_accuracy", group="validation", display_name="val accuracy"),
    hp.Metric("epoch_loss", group="validation", display_name="val loss"),
    hp.Metric("epoch_accuracy", group="train", display_name="train accuracy"),
    hp.Metric("epoch_loss", group="train", display_name="train loss"),
    hp.Metric("epoch_images_per_sec", group="train", display_name="images/sec"),
]


def hparams_of(config: Config, facts: dict) -> dict:
  """The settings that make runs differ in what they learn, for TensorBoard's HParams dashboard."""
  return {"backbone": config.model.backbone, "alpha": config.model.alpha, "image_size": config.data.image_size,
          "batch_size": config.data.batch_size, "head_units": config.model.head_units,
          "dropout": config.model.dropout, "unfreeze_from": config.model.unfreeze_from,
          "frozen_epochs": config.train.frozen_epochs, "finetune_epochs": config.train.finetune_epochs,
          "frozen_lr": config.train.frozen_lr, "finetune_lr": config.train.finetune_lr,
          "augment": config.train.augment, "strategy": config.runtime.strategy,
          "precision": facts["precision"], "num_replicas": facts["num_replicas"]}


def write_reports(report_dir: str, history: Sequence[dict], confusion: np.ndarray, classes: Sequence[str]) -> None:
  """curves.png from the training history; confusion_matrix.png and classification_report.txt from the last
  validation."""
  os.makedirs(report_dir, exist_ok=True)
  write_png(curves_figure(history), os.path.join(report_dir, "curves.png"))
  write_confusion_matrix_png(confusion, classes, os.path.join(report_dir, "confusion_matrix.png"),
                             title=f"Validation after epoch {history[-1]['epoch']}" if history else "Validation")
  write_classification_report(confusion, classes, os.path.join(report_dir, "classification_report.txt"))


def write_confusion_matrix_png(confusion: np.ndarray, classes: Sequence[str], path: str,
                               title: str = "Confusion matrix") -> None:
  write_png(confusion_matrix_figure(confusion, classes, title), path)


def write_classification_report(confusion: np.ndarray, classes: Sequence[str], path: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.write(classification_report(confusion, classes))


def write_png(figure: Figure, path: str) -> None:
  figure.savefig(path, format="png")


def per_class_metrics(confusion: np.ndarray) -> dict[str, np.ndarray]:
  """Precision, recall, F1 and support per class of a confusion matrix (rows: true class; columns: predicted).

  A class never predicted (or never present) gets 0 where its ratio is undefined, as scikit-learn reports it.
  """
  confusion = np.asarray(confusion, np.float64)
  true_positives = np.diag(confusion)
  predicted, support = confusion.sum(axis=0), confusion.sum(axis=1)
  precision = np.divide(true_positives, predicted, out=np.zeros_like(true_positives), where=predicted > 0)
  recall = np.divide(true_positives, support, out=np.zeros_like(true_positives), where=support > 0)
  both = precision + recall
  f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(both), where=both > 0)
  return {"precision": precision, "recall": recall, "f1": f1, "support": support.astype(np.int64)}


def classification_report(confusion: np.ndarray, classes: Sequence[str]) -> str:
  """Per-class precision, recall, F1 and support, then accuracy and the macro and weighted averages, in the layout
  of scikit-learn's `classification_report`."""
  metrics = per_class_metrics(confusion)
  support = metrics["support"]
  total = int(support.sum())
  width = max(len("weighted avg"), *(len(name) for name in classes))
  lines = [f"{'':>{width}}  precision    recall  f1-score   support", ""]
  for index, name in enumerate(classes):
    lines.append(f"{name:>{width}}  {metrics['precision'][index]:9.4f} {metrics['recall'][index]:9.4f} "
                 f"{metrics['f1'][index]:9.4f} {support[index]:9d}")
  accuracy = np.trace(np.asarray(confusion)) / total if total else 0.0
  weights = support / total if total else np.zeros(len(support))
  lines += ["", f"{'accuracy':>{width}}  {'':9} {'':9} {accuracy:9.4f} {total:9d}"]
  for label, average in (("macro avg", np.mean), ("weighted avg", lambda v: np.sum(v * weights))):
    lines.append(f"{label:>{width}}  {average(metrics['precision']):9.4f} {average(metrics['recall']):9.4f} "
                 f"{average(metrics['f1']):9.4f} {total:9d}")
  return "\n".join(lines) + "\n"


def confusion_matrix_figure(confusion: np.ndarray, classes: Sequence[str], title: str) -> Figure:
  """Counts in the cells; colour by the share of the true class (the row), so rare classes read as clearly."""
  confusion = np.asarray(confusion)
  rows = confusion.sum(axis=1, keepdims=True)
  shares = np.divide(confusion, rows, out=np.zeros(confusion.shape), where=rows > 0)
  annotated = len(classes) <= _MAX_ANNOTATED_CLASSES
  # Cells big enough for a count, or (many classes) just for a small class name on each axis.
  size = 4 + 0.45 * len(classes) if annotated else min(4 + 0.16 * len(classes), 24)
  figure = Figure(figsize=(size + 1.5, size), dpi=80, layout="constrained")
  axes = figure.add_subplot()
  image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
  figure.colorbar(image, ax=axes, label="share of the true class")
  ticks = np.arange(len(classes))
  font_size = 10 if annotated else 6
  axes.set_xticks(ticks, labels=classes, fontsize=font_size, rotation=45 if len(classes) > 4 else 0,
                  ha="right" if len(classes) > 4 else "center")
  axes.set_yticks(ticks, labels=classes, fontsize=font_size)
  axes.set_xlabel("predicted")
  axes.set_ylabel("true")
  axes.set_title(title)
  if annotated:
    for (row, column), count in np.ndenumerate(confusion):
      axes.text(column, row, str(int(count)), ha="center", va="center",
                color="white" if shares[row, column] > 0.5 else "black")
  return figure


def curves_figure(history: Sequence[dict]) -> Figure:
  """Accuracy and loss per epoch, train against validation, both phases, with the start of fine-tuning marked."""
  epochs = [record["epoch"] for record in history]
  figure = Figure(figsize=(8, 8), dpi=80, layout="constrained")
  finetune_epochs = [record["epoch"] for record in history if record["phase"] == FINETUNE]
  frozen_epochs = [record["epoch"] for record in history if record["phase"] == FROZEN]
  for index, (metric, label) in enumerate((("accuracy", "Accuracy"), ("loss", "Loss"))):
    axes = figure.add_subplot(2, 1, index + 1)
    axes.plot(epochs, [record[metric] for record in history], "o-", label=f"training {metric}")
    axes.plot(epochs, [record[f"val_{metric}"] for record in history], "o-", label=f"validation {metric}")
    if finetune_epochs and frozen_epochs:
      axes.axvline(min(finetune_epochs) - 0.5, color="gray", linestyle="--", label="start fine-tuning")
    axes.set_ylabel(label)
    axes.set_title(f"Training and validation {metric}")
    axes.legend(loc="best")
    axes.grid(alpha=0.3)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
  axes.set_xlabel("epoch")
  return figure


def image_grid_figure(images: np.ndarray, titles: Sequence[str], columns: int = 4) -> Figure:
  """Images in 0..255 ([N, H, W, 3], float or integer) in a grid, each titled (with its class name)."""
  rows = max(1, -(-len(images) // columns))
  figure = Figure(figsize=(2.2 * columns, 2.4 * rows), dpi=80, layout="constrained")
  for index, (image, title) in enumerate(zip(images, titles)):
    axes = figure.add_subplot(rows, columns, index + 1)
    axes.imshow(np.clip(np.asarray(image), 0, 255).astype(np.uint8))
    axes.set_title(title, fontsize=9)
    axes.axis("off")
  return figure


def _png_tensor(figure: Figure) -> tf.Tensor:
  """A figure as the [1, H, W, 4] uint8 batch that `tf.summary.image` takes."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png")
  return tf.expand_dims(tf.io.decode_png(buffer.getvalue(), channels=4), 0)
