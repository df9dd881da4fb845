"""A run's WORKDIR/report/ files (metrics.json's summary, curves, confusion matrix, classification report) and
the figures they and TensorBoard draw.

Everything here takes plain Python and numpy values (the epoch records of the training history, a confusion matrix
of counts with true classes as rows), so that evaluation can draw the same figures for any model. Figures are
drawn on `matplotlib.figure.Figure` objects, which render with the Agg backend and leave pyplot's global state
(and an interactive backend) alone.
"""

import io
import os
from typing import Sequence

import numpy as np
import tensorflow as tf
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from trainer.modeling.model import FINETUNE, FROZEN
from trainer.reporting import class_labels
from trainer.runtime import workdir as workdir_lib

# Confusion matrices with more classes than this are drawn without a count in every cell (it would be illegible).
_MAX_ANNOTATED_CLASSES = 25

# TensorBoard's image card shows an image at most about 400 x 210 pixels (a wider one at full width when expanded):
# a grid of two rows of four tiles, with titles of GRID_LABEL_CHARS, fills it and reads there.
GRID_COLUMNS, GRID_IMAGES, GRID_LABEL_CHARS = 4, 8, 13

# The confusion matrix of TensorBoard's image card: its size in inches at CARD_DPI, about the card's pixels.
CARD_INCHES, CARD_DPI = (4.4, 2.8), 90

# The top-losses grid (report/top_losses.png and TensorBoard) has rows of this many images.
TOP_LOSS_COLUMNS = 6

# report/ file of the last validation's confusion counts, as JSON.
CONFUSION_FILE = "confusion_matrix.json"


def steady_images_per_sec(records: Sequence[dict]) -> float | None:
  """Training images per second over the epochs of `records` (of one phase) with a steady rate (see
  `Trainer.run_epoch`): all their images over the time they take at each epoch's steady rate. None if no epoch had
  one (an epoch of one full and one partial batch that both compiled)."""
  steady = [record for record in records if record.get("steady_images_per_sec")]
  images = [record["images_per_sec"] * record["train_seconds"] for record in steady]
  seconds = sum(count / record["steady_images_per_sec"] for count, record in zip(images, steady))
  return sum(images) / seconds if seconds else None


# What `write_reports` writes in the report folder: a finished run rerun makes them again if one is missing.
REPORT_FILES = ("curves.png", "confusion_matrix.png", "classification_report.txt", CONFUSION_FILE)


def write_reports(report_dir: str, history: Sequence[dict], confusion: np.ndarray, classes: Sequence[str]) -> None:
  """curves.png from the training history; confusion_matrix.png, classification_report.txt and the counts
  (CONFUSION_FILE) from the last validation."""
  curves, confusion_png, report, counts = (os.path.join(report_dir, name) for name in REPORT_FILES)
  os.makedirs(report_dir, exist_ok=True)
  write_png(curves_figure(history), curves)
  write_confusion_matrix_png(confusion, classes, confusion_png,
                             title=f"Validation after epoch {history[-1]['epoch']}" if history else "Validation")
  write_classification_report(confusion, classes, report)
  # The counts themselves, for what is drawn from the report later (report_page's per-class table).
  workdir_lib.write_json(counts, {"classes": list(classes), "counts": np.asarray(confusion).astype(np.int64).tolist()})


def write_confusion_matrix_png(confusion: np.ndarray, classes: Sequence[str], path: str,
                               title: str = "Confusion matrix") -> None:
  write_png(confusion_matrix_figure(confusion, classes, title), path)


def write_classification_report(confusion: np.ndarray, classes: Sequence[str], path: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.write(classification_report(confusion, classes))


def write_png(figure: Figure, path: str) -> None:
  """Atomic (workdir.write_bytes): a chief lost mid-report leaves the previous figure or none, never half of one."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png")
  workdir_lib.write_bytes(path, buffer.getvalue())


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


_NEVER_PREDICTED = "never predicted"
_ABSENT = "absent"
_NOTES = {_NEVER_PREDICTED: "no image was classified as the class, so its precision is undefined",
          _ABSENT: "the data has no image of the class, so its recall is undefined"}


def classification_report(confusion: np.ndarray, classes: Sequence[str]) -> str:
  """Per-class precision, recall, F1 and support, then accuracy and the macro and weighted averages, in the layout
  of scikit-learn's `classification_report`; a note on each class whose precision or recall is undefined; then the
  confusion matrix with each cell's share of its true class."""
  confusion = np.asarray(confusion)
  metrics = per_class_metrics(confusion)
  support = metrics["support"]
  total = int(support.sum())
  width = max(len("weighted avg"), *(len(name) for name in classes))
  lines = [f"{'':>{width}}  precision    recall  f1-score   support", ""]
  noted = set()
  for index, name in enumerate(classes):
    notes = [note for note, applies in ((_NEVER_PREDICTED, confusion[:, index].sum() == 0),
                                        (_ABSENT, support[index] == 0)) if applies]
    noted.update(notes)
    lines.append((f"{name:>{width}}  {metrics['precision'][index]:9.4f} {metrics['recall'][index]:9.4f} "
                  f"{metrics['f1'][index]:9.4f} {support[index]:9d}  {', '.join(notes)}").rstrip())
  accuracy = np.trace(confusion) / total if total else 0.0
  weights = support / total if total else np.zeros(len(support))
  lines += ["", f"{'accuracy':>{width}}  {'':9} {'':9} {accuracy:9.4f} {total:9d}"]
  for label, average in (("macro avg", np.mean), ("weighted avg", lambda v: np.sum(v * weights))):
    lines.append(f"{label:>{width}}  {average(metrics['precision']):9.4f} {average(metrics['recall']):9.4f} "
                 f"{average(metrics['f1']):9.4f} {total:9d}")
  if noted:
    lines.append("")
    lines += [f"{note}: {_NOTES[note]};\n  it shows (and is averaged) as 0, as scikit-learn does."
              for note in _NOTES if note in noted]
  return "\n".join(lines + [""] + _confusion_matrix_text(confusion, classes)) + "\n"


def _confusion_matrix_text(confusion: np.ndarray, classes: Sequence[str]) -> list[str]:
  """The confusion matrix with class ids as column heads, or (too many classes for text) the ids of the classes
  the figure names by id."""
  if len(classes) > _MAX_ANNOTATED_CLASSES:
    legend = [f"#{index} {classes[index]}" for index in class_labels.figure_labels(classes).by_id]
    return ["Confusion matrix: in confusion_matrix.png (too many classes for text)."] + (
        ["Classes it shows by id:"] + legend if legend else [])
  rows = confusion.sum(axis=1, keepdims=True)
  shares = np.divide(confusion, rows, out=np.zeros(confusion.shape), where=rows > 0)
  cells = [[f"{int(count)} ({share:.1%})" for count, share in zip(*row)] for row in zip(confusion, shares)]
  heads = [f"#{index} {name}" for index, name in enumerate(classes)]
  head_width = max(len(head) for head in heads)
  cell_width = max(len(cell) for row in cells for cell in row)
  lines = ["Confusion matrix (rows: true class, columns: predicted class id; a count and its share of the row):",
           " " * head_width + "".join(f"  {f'#{index}':>{cell_width}}" for index in range(len(classes)))]
  lines += [f"{head:<{head_width}}" + "".join(f"  {cell:>{cell_width}}" for cell in row)
            for head, row in zip(heads, cells)]
  return lines


def confusion_matrix_figure(confusion: np.ndarray, classes: Sequence[str], title: str) -> Figure:
  """A count and its share of the true class (the row) in each cell; colour by that share, so rare classes read as
  clearly."""
  confusion = np.asarray(confusion)
  labels = class_labels.figure_labels(classes)
  rows = confusion.sum(axis=1, keepdims=True)
  shares = np.divide(confusion, rows, out=np.zeros(confusion.shape), where=rows > 0)
  annotated = len(classes) <= _MAX_ANNOTATED_CLASSES
  # Cells big enough for a count and a share, or (many classes) just for a small class name on each axis.
  size = 4 + 0.5 * len(classes) if annotated else min(4 + 0.16 * len(classes), 24)
  figure = Figure(figsize=(size + 1.5, size), dpi=80, layout="constrained")
  axes = figure.add_subplot()
  image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
  figure.colorbar(image, ax=axes, label="share of the true class")
  ticks = np.arange(len(classes))
  font_size = 10 if annotated else 6
  slanted = len(classes) > 4
  axes.set_xticks(ticks, labels=labels.texts, fontsize=font_size, fontfamily=labels.fonts,
                  rotation=45 if slanted else 0, ha="right" if slanted else "center")
  axes.set_yticks(ticks, labels=labels.texts, fontsize=font_size, fontfamily=labels.fonts)
  axes.set_xlabel("predicted")
  axes.set_ylabel("true")
  axes.set_title(title)
  if annotated:
    cell_font = 10 if len(classes) <= 12 else 7
    for (row, column), count in np.ndenumerate(confusion):
      text = f"{int(count)}\n{shares[row, column]:.0%}" if rows[row, 0] else str(int(count))
      axes.text(column, row, text, ha="center", va="center", fontsize=cell_font, linespacing=1.1,
                color="white" if shares[row, column] > 0.5 else "black")
  if labels.note():
    figure.supxlabel(labels.note(), fontsize=8)
  return figure


def confusion_matrix_card_figure(confusion: np.ndarray, classes: Sequence[str], title: str) -> Figure:
  """The confusion matrix sized for TensorBoard's image card (about 400 x 210 pixels, images scaled down to fit):
  drawn at that height, so that its text is not shrunk; no colour bar; each cell's count, and its share of the
  true class where there is room. Many classes leave only the colours (report/confusion_matrix.png has them all)."""
  confusion = np.asarray(confusion)
  labels = class_labels.figure_labels(classes, GRID_LABEL_CHARS)
  rows = confusion.sum(axis=1, keepdims=True)
  shares = np.divide(confusion, rows, out=np.zeros(confusion.shape), where=rows > 0)
  count = len(classes)
  figure = Figure(figsize=(CARD_INCHES[0], CARD_INCHES[1] + (0.2 if labels.note() else 0)), dpi=CARD_DPI,
                  layout="constrained")
  axes = figure.add_subplot()
  axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
  ticks = np.arange(count)
  tick_font = 9 if count <= 8 else 7 if count <= 16 else 5
  shown = ticks if count <= 30 else ticks[::-(-count // 30)]
  axes.set_xticks(shown, labels=[labels.texts[i] for i in shown], fontsize=tick_font, fontfamily=labels.fonts,
                  rotation=30 if count > 3 else 0, ha="right" if count > 3 else "center")
  axes.set_yticks(shown, labels=[labels.texts[i] for i in shown], fontsize=tick_font, fontfamily=labels.fonts)
  axes.set_xlabel("predicted", fontsize=8)
  axes.set_ylabel("true", fontsize=8)
  axes.set_title(title, fontsize=9)
  if count <= 10:
    for (row, column), value in np.ndenumerate(confusion):
      text = f"{int(value)} ({shares[row, column]:.0%})" if count <= 4 and rows[row, 0] else str(int(value))
      axes.text(column, row, text, ha="center", va="center", fontsize=9 if count <= 6 else 7,
                color="white" if shares[row, column] > 0.5 else "black")
  if labels.note():
    figure.supxlabel(labels.note(), fontsize=6)
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


def image_grid_figure(images: np.ndarray, class_ids: Sequence[int], classes: Sequence[str],
                      columns: int = GRID_COLUMNS) -> Figure:
  """Images in 0..255 ([N, H, W, 3], float or integer) in a grid, each titled with its class name."""
  labels = class_labels.figure_labels(classes, GRID_LABEL_CHARS)
  rows = max(1, -(-len(images) // columns))
  figure = Figure(figsize=(1.6 * columns, 1.95 * rows + (0.25 if labels.note() else 0)), dpi=100,
                  layout="constrained")
  for index, (image, class_id) in enumerate(zip(images, class_ids)):
    axes = figure.add_subplot(rows, columns, index + 1)
    axes.imshow(np.clip(np.asarray(image), 0, 255).astype(np.uint8))
    axes.set_title(labels.texts[int(class_id)], fontsize=15, fontfamily=labels.fonts)
    axes.axis("off")
  if labels.note():
    figure.supxlabel(labels.note(), fontsize=10)
  return figure


def top_losses_figure(images: np.ndarray, labels: Sequence[int], predicted: Sequence[int],
                      probabilities: Sequence[float], classes: Sequence[str],
                      columns: int = TOP_LOSS_COLUMNS) -> Figure:
  """fastai's `plot_top_losses` layout: each image ([N, H, W, 3] in 0..255) titled with its true class and, below,
  the predicted class with its probability, in red where the prediction is wrong."""
  labels_of = class_labels.figure_labels(classes, GRID_LABEL_CHARS)
  columns = max(1, min(columns, len(images)))
  rows = max(1, -(-len(images) // columns))
  figure = Figure(figsize=(1.7 * columns, 2.2 * rows + (0.25 if labels_of.note() else 0)), dpi=100,
                  layout="constrained")
  for index, (image, label, guess, probability) in enumerate(zip(images, labels, predicted, probabilities)):
    axes = figure.add_subplot(rows, columns, index + 1)
    axes.imshow(np.clip(np.asarray(image), 0, 255).astype(np.uint8))
    axes.set_title(f"{labels_of.texts[int(label)]}\n→ {labels_of.texts[int(guess)]} {probability:.2f}", fontsize=11,
                   fontfamily=labels_of.fonts, color="black" if int(label) == int(guess) else "#b00020")
    axes.axis("off")
  if labels_of.note():
    figure.supxlabel(labels_of.note(), fontsize=9)
  return figure


def png_tensor(figure: Figure) -> tf.Tensor:
  """A figure as the [1, H, W, 4] uint8 batch that `tf.summary.image` takes."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png")
  return tf.expand_dims(tf.io.decode_png(buffer.getvalue(), channels=4), 0)


def summarize(history: list[dict], classes: list[str], export_path: str | None, phase_names: list[str]) -> dict:
  """metrics.json: the last validation, and per phase its epochs, seconds, images/s over whole epochs, the steady
  images/s (without the steps that compiled: a phase on cached features and a fine-tune phase differ by orders of
  magnitude, so each has its own) and the seconds its compiling steps took."""
  phases = {}
  for phase in phase_names:
    records = [r for r in history if r["phase"] == phase]
    train_seconds = sum(r["train_seconds"] for r in records)
    examples = sum(r["images_per_sec"] * r["train_seconds"] for r in records)
    phases[phase] = {"epochs": len(records),
                     "val_accuracy": records[-1]["val_accuracy"] if records else None,
                     "seconds": sum(r["seconds"] for r in records),
                     "images_per_sec": examples / train_seconds if train_seconds else None,
                     "steady_images_per_sec": steady_images_per_sec(records),
                     "compile_seconds": sum(r.get("compile_seconds") or 0.0 for r in records)}
  return {"classes": classes, "val_accuracy": history[-1]["val_accuracy"] if history else None,
          "val_loss": history[-1]["val_loss"] if history else None,
          "epochs": len(history), "phases": phases, "export_path": export_path}
