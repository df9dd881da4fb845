"""Seeing a run: its TensorBoard summaries while it trains, and the plots and tables of WORKDIR/report/ after.

Everything here takes plain Python and numpy values (the epoch records of the training history, a confusion matrix
of counts with true classes as rows), so that evaluation can draw the same figures for any model. Figures are
drawn on `matplotlib.figure.Figure` objects, which render with the Agg backend and leave pyplot's global state
(and an interactive backend) alone.
"""

import dataclasses
import functools
import io
import json
import logging
import math
import os
import socket
import time
from typing import Sequence

import numpy as np
import tensorflow as tf
from matplotlib import font_manager, ft2font, rcParams
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from tensorboard.compat.proto import event_pb2
from tensorboard.plugins.hparams import api as hp

from trainer.config import Config
from trainer.model import FINETUNE, FROZEN, SCRATCH

# The model phases as a scalar, so the phase boundary shows as a step on TensorBoard's epoch axis.
PHASE_VALUES = {FROZEN: 0, FINETUNE: 1, SCRATCH: 2}

# Confusion matrices with more classes than this are drawn without a count in every cell (it would be illegible).
_MAX_ANNOTATED_CLASSES = 25

# Figures cut longer class names with an ellipsis (the report text keeps them whole).
MAX_LABEL_CHARS = 18

# TensorBoard's image card shows an image at most about 400 x 210 pixels (a wider one at full width when expanded):
# a grid of two rows of four tiles, with titles of GRID_LABEL_CHARS, fills it and reads there.
GRID_COLUMNS, GRID_IMAGES, GRID_LABEL_CHARS = 4, 8, 13

# The top-losses grid (report/top_losses.png and TensorBoard) has rows of this many images.
TOP_LOSS_COLUMNS = 6

# report/ file of the last validation's confusion counts, as JSON.
CONFUSION_FILE = "confusion_matrix.json"

# Config fields that change neither what a run learns nor how fast, left out of the HParams.
_NOT_HPARAMS = frozenset({"verbosity", "cache_dir", "tpu", "top_k", "tflite", "tflite_quantization"})

# The metrics of the HParams dashboard, logged beside the hparams in their own folder. The dashboard looks a
# metric up in the hparams' folder joined with the metric's group, and with --logdir at a run's own tensorboard/
# that join gives "./validation", which is no run (a single run's metric columns stayed empty); a folder of its own
# also keeps the dashboard from listing every scalar of train/ and validation/ as a metric. No hparams_config
# either: without it TensorBoard sees which settings differ between the runs and shows those first.
HPARAMS_DIR = "hparams"
HPARAMS_METRICS = ("hparams/val_accuracy", "hparams/val_loss", "hparams/train_accuracy", "hparams/train_loss",
                   "hparams/images_per_sec")

# Fonts whose glyphs are placeholders (a box naming the Unicode block), not letters.
_PLACEHOLDER_FONTS = ("Last Resort",)

# Drawing with a fallback font of one weight only (WenQuanYi Zen Hei is 500) makes matplotlib warn "Failed to find
# font weight normal ..., now using 500" on every figure: the nearest weight is what a label wants.
logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)


class TensorBoardLog:
  """The summaries of one run under WORKDIR/tensorboard.

  `train/` and `validation/` hold the per-epoch scalars under the same tags (so TensorBoard draws train and
  validation on one chart), with the 1-based epoch number as step, continuous across the phases; each phase's loss
  and accuracy are also under `PHASE/` tags, so the charts of a phase start and end at its epochs. The folder
  itself holds what belongs to the run as a whole: its config as text and a Markdown note where each phase starts;
  `hparams/` its HParams and their metrics.
  """

  def __init__(self, log_dir: str | None, classes: Sequence[str], next_epoch: int = 1):
    """`log_dir` None logs nothing (a worker that is not the chief of a multi-worker run). The HParams trial is
    named after the folder holding `log_dir` (the workdir). next_epoch: the first epoch this process logs; what an
    earlier process logged from it on (an epoch trained past its last checkpoint before a kill, or after a
    checkpoint that was found corrupt) is purged, so that no epoch shows twice."""
    self.classes = list(classes)
    self._labels = figure_labels(self.classes)
    if log_dir is None:
      self.name = ""
      self._run = self._train = self._validation = self._hparams = tf.summary.create_noop_writer()
    else:
      self.name = os.path.basename(os.path.dirname(os.path.abspath(log_dir)))
      folders = [log_dir] + [os.path.join(log_dir, name) for name in ("train", "validation", HPARAMS_DIR)]
      for folder in folders:
        purge_from(folder, next_epoch)  # Before the writers make their files: it must sort between.
      self._run, self._train, self._validation, self._hparams = (tf.summary.create_file_writer(folder)
                                                                 for folder in folders)

  def log_run(self, config: Config, facts: dict) -> None:
    """The config (and the run's resolved facts: precision, replicas, classes) as text, and the HParams."""
    with self._hparams.as_default(step=0):
      hp.hparams(hparams_of(config, facts), trial_id=self.name)
    self._hparams.flush()
    with self._run.as_default(step=0):
      text = json.dumps({**config.to_dict(), "run": facts}, indent=2, default=str)
      # Indented by four spaces: TensorBoard renders text summaries as Markdown, and this keeps the JSON verbatim.
      tf.summary.text("config", "\n".join("    " + line for line in text.splitlines()))
    self._run.flush()

  def log_training_images(self, images: np.ndarray, labels: np.ndarray) -> None:
    """The first GRID_IMAGES training images after augmentation (what the model sees) in a grid, at step 0."""
    figure = image_grid_figure(images[:GRID_IMAGES], labels[:GRID_IMAGES], self.classes)
    with self._train.as_default(step=0):
      tf.summary.image("augmented_training_images", _png_tensor(figure),
                       description="The first training images after augmentation, before the backbone's "
                                   "preprocessing. " + self._labels.legend())
    self._train.flush()

  def log_epoch(self, history: Sequence[dict], confusion: np.ndarray) -> None:
    """The scalars of the last epoch record of `history` (see `trainer.train`), the validation confusion matrix as
    an image, and the run's metrics so far for the HParams dashboard."""
    record = history[-1]
    step, phase = record["epoch"], record["phase"]
    with self._train.as_default(step=step):
      _log_loss_and_accuracy(phase, record["loss"], record["accuracy"])
      _log_learning_rate(record["learning_rate"])
      tf.summary.scalar("epoch_images_per_sec", record["images_per_sec"],
                        description="Training images per second over the whole epoch (input, augmentation and "
                                    "train step), its first step included.")
      if record.get("steady_images_per_sec") is not None:
        tf.summary.scalar("epoch_steady_images_per_sec", record["steady_images_per_sec"],
                          description="Training images per second without the epoch's first step, which compiles "
                                      "the step in the first epoch of a process or phase.")
      if record.get("first_step_seconds") is not None:
        tf.summary.scalar("epoch_first_step_seconds", record["first_step_seconds"],
                          description="Seconds of the epoch's first train step: compilation (first epoch of a "
                                      "process or phase) and the first batch.")
      tf.summary.scalar("epoch_phase", PHASE_VALUES[phase], description="0: frozen, 1: fine-tune, 2: from scratch.")
    with self._validation.as_default(step=step):
      _log_loss_and_accuracy(phase, record["val_loss"], record["val_accuracy"])
      figure = confusion_matrix_figure(confusion, self.classes, f"Validation after epoch {step} ({phase})")
      tf.summary.image("confusion_matrix", _png_tensor(figure), description=self._labels.legend())
    with self._hparams.as_default(step=step):
      for tag, value in zip(HPARAMS_METRICS, hparams_metrics(history)):
        tf.summary.scalar(tag, value, description="The run's metric in the HParams dashboard.")
    for writer in (self._train, self._validation, self._hparams):
      writer.flush()

  def log_top_losses(self, figure: Figure, step: int, description: str) -> None:
    """The top-losses grid (`top_losses_figure`) as an image of the validation run at `step` (the last epoch)."""
    with self._validation.as_default(step=step):
      tf.summary.image("top_losses", _png_tensor(figure), description=description)
    self._validation.flush()

  def log_phase_start(self, epoch: int, phase: str, config: Config) -> None:
    """A Markdown note at the first epoch of a phase (the 1-based `epoch`), beside the step of `epoch_phase`."""
    if phase == FROZEN:
      what = f"Only the head trains, learning rate {config.train.frozen_lr:g}."
    elif phase == SCRATCH:
      what = f"Every layer trains from random weights, learning rate {config.train.frozen_lr:g}."
    else:
      what = (f"The backbone from layer `{config.model.unfreeze_from}` up trains too, learning rate "
              f"{config.train.finetune_lr:g}.")
    with self._run.as_default(step=epoch):
      tf.summary.text("phase", f"**Epoch {epoch}: the {phase} phase starts.** {what} The charts under "
                               f"`{phase}/` hold this phase's epochs only.")
    self._run.flush()

  def close(self) -> None:
    for writer in (self._run, self._train, self._validation, self._hparams):
      writer.close()


def purge_from(folder: str, step: int) -> None:
  """Makes TensorBoard drop the events of `folder` at `step` and after that earlier event files hold.

  TensorBoard reads a run's event files in name order and, at a SessionLog START event (what TF1 wrote when a
  training restarted), purges the events it has read with a step at or past the event's. This writes one such
  event in a file named to sort after every earlier file (their timestamps are older) and before the ones this
  process writes next (their timestamps are not older than now). Nothing is written where nothing was logged."""
  if not os.path.isdir(folder) or not any(name.startswith("events.out.tfevents.") for name in os.listdir(folder)):
    return
  now = time.time()
  path = os.path.join(folder, f"events.out.tfevents.{int(now) - 1:010d}.{socket.gethostname()}.purge")
  start = event_pb2.Event(wall_time=now, step=step, session_log=event_pb2.SessionLog(
      status=event_pb2.SessionLog.START)).SerializeToString()
  with tf.io.TFRecordWriter(path) as writer:  # Event files are TFRecord files of Event protos.
    writer.write(event_pb2.Event(wall_time=now, file_version="brain.Event:2").SerializeToString())
    # TensorBoard takes a run's first START for the session's start, and purges at the ones after it (TF2's
    # writers write none): the second one here is the restart.
    writer.write(start)
    writer.write(start)


def _log_loss_and_accuracy(phase: str, loss: float, accuracy: float) -> None:
  for name, value in (("epoch_loss", loss), ("epoch_accuracy", accuracy)):
    tf.summary.scalar(name, value)
    tf.summary.scalar(f"{phase}/{name}", value)


def _log_learning_rate(learning_rate: float) -> None:
  tf.summary.scalar("epoch_learning_rate", learning_rate)
  if learning_rate > 0:
    tf.summary.scalar("epoch_learning_rate_log10", math.log10(learning_rate),
                      description="log10 of the learning rate (-3 is 1e-3, -5 is 1e-5): on a linear axis a "
                                  "fine-tune rate reads as 0.")


def hparams_of(config: Config, facts: dict) -> dict:
  """Every setting that can make runs differ in what they learn or how fast, by its flag name, and the run's
  resolved precision and replicas, for TensorBoard's HParams dashboard."""
  values = {name: value for section in config.to_dict().values() for name, value in section.items()
            if name not in _NOT_HPARAMS}
  return {**values, "precision": facts["precision"], "num_replicas": facts["num_replicas"]}


def hparams_metrics(history: Sequence[dict]) -> tuple[float, ...]:
  """The values of HPARAMS_METRICS: the last epoch's validation and train metrics, and the run's images/s."""
  last = history[-1]
  return last["val_accuracy"], last["val_loss"], last["accuracy"], last["loss"], mean_images_per_sec(history)


def mean_images_per_sec(history: Sequence[dict]) -> float:
  """Training images per second over all the run's epochs, at each epoch's steady rate where its record has
  `steady_images_per_sec` (without the first step, which compiles): all the images over the time they take at
  those rates."""
  images = [record["images_per_sec"] * record["train_seconds"] for record in history]
  seconds = sum(count / (record.get("steady_images_per_sec") or record["images_per_sec"])
                for count, record in zip(images, history))
  return sum(images) / seconds if seconds else 0.0


@dataclasses.dataclass(frozen=True)
class Labels:
  """Class names as a figure can draw them: `texts[i]` is class i's name, cut to MAX_LABEL_CHARS, or `#i` (its
  class id, as serving's class_ids) for the classes `by_id`, whose names have a character no installed font has;
  `fonts` are the font families that draw every text (glyph by glyph, the first that has it)."""
  classes: tuple[str, ...]
  texts: tuple[str, ...]
  fonts: tuple[str, ...]
  by_id: tuple[int, ...]

  def note(self) -> str:
    """The line a figure shows under classes it names by id ('' if none)."""
    if not self.by_id:
      return ""
    ids = ", ".join(f"#{index}" for index in self.by_id)
    if len(self.by_id) == 1:
      return f"{ids}: the class id of a name no installed font draws (classification_report.txt names it)"
    return f"{ids}: class ids of names no installed font draws (classification_report.txt names them)"

  def legend(self) -> str:
    """The names of the classes shown by id, as Markdown for a TensorBoard description ('' if none)."""
    if not self.by_id:
      return ""
    return "Classes shown by id: " + ", ".join(f"#{index} = {self.classes[index]}" for index in self.by_id) + "."


def figure_labels(classes: Sequence[str], max_chars: int = MAX_LABEL_CHARS) -> Labels:
  default = rcParams["font.sans-serif"][0]
  texts, fonts, by_id = [], [default], []
  for index, name in enumerate(classes):
    short = shorten(name, max_chars)
    families = _families_drawing(short, default)
    if families is None:
      texts.append(f"#{index}")
      by_id.append(index)
    else:
      texts.append(short)
      fonts += [family for family in families if family not in fonts]
  return Labels(tuple(classes), tuple(texts), tuple(fonts), tuple(by_id))


def shorten(text: str, max_chars: int) -> str:
  return text if len(text) <= max_chars else text[:max_chars - 1] + "…"


def _families_drawing(text: str, default: str) -> list[str] | None:
  """Font families that together have a glyph for every character of `text` (besides `default`, which has most),
  or None if no installed font has some character."""
  missing = {ord(char) for char in text} - _codes_of(font_manager.findfont(default))
  charmaps = _charmaps() if missing else {}
  families = []
  for code in missing:
    family = next((family for family, codes in charmaps.items() if code in codes), None)
    if family is None:
      return None
    families.append(family)
  return sorted(set(families))


@functools.cache
def _charmaps() -> dict[str, frozenset[int]]:
  """The code points of each font family matplotlib finds (its own and the system's), by family name: read only
  for a name the default font cannot draw (reading every font takes a while on a machine with many)."""
  charmaps = {}
  for font in font_manager.fontManager.ttflist:
    if not font.name.startswith(_PLACEHOLDER_FONTS):
      charmaps[font.name] = charmaps.get(font.name, frozenset()) | _codes_of(font.fname)
  return charmaps


@functools.cache
def _codes_of(font_file: str) -> frozenset[int]:
  try:
    return frozenset(ft2font.FT2Font(font_file).get_charmap())
  except (OSError, RuntimeError):  # A font file matplotlib listed but FreeType cannot read.
    return frozenset()


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
  with open(counts, "w", encoding="utf-8") as f:
    json.dump({"classes": list(classes), "counts": np.asarray(confusion).astype(np.int64).tolist()}, f,
              ensure_ascii=False)


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
    legend = [f"#{index} {classes[index]}" for index in figure_labels(classes).by_id]
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
  labels = figure_labels(classes)
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
  labels = figure_labels(classes, GRID_LABEL_CHARS)
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
  labels_of = figure_labels(classes, GRID_LABEL_CHARS)
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


def _png_tensor(figure: Figure) -> tf.Tensor:
  """A figure as the [1, H, W, 4] uint8 batch that `tf.summary.image` takes."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png")
  return tf.expand_dims(tf.io.decode_png(buffer.getvalue(), channels=4), 0)
