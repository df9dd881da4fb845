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

from trainer import workdir as workdir_lib
from trainer.config import Config
from trainer.model import FINETUNE, FROZEN, SCRATCH

# The phases in training order; each has its runs PHASE/train and PHASE/validation (see TensorBoardLog).
PHASES = (FROZEN, FINETUNE, SCRATCH)
PHASE_RUNS = ("train", "validation")

# Learning rates are charted in this unit, named in the tag (TensorBoard's tables print 4 decimals).
LEARNING_RATE_UNIT, LEARNING_RATE_UNIT_SUFFIX = 1e-6, "_x1e-6"

# Confusion matrices with more classes than this are drawn without a count in every cell (it would be illegible).
_MAX_ANNOTATED_CLASSES = 25

# Figures cut longer class names with an ellipsis (the report text keeps them whole).
MAX_LABEL_CHARS = 18

# TensorBoard's image card shows an image at most about 400 x 210 pixels (a wider one at full width when expanded):
# a grid of two rows of four tiles, with titles of GRID_LABEL_CHARS, fills it and reads there.
GRID_COLUMNS, GRID_IMAGES, GRID_LABEL_CHARS = 4, 8, 13

# The confusion matrix of TensorBoard's image card: its size in inches at CARD_DPI, about the card's pixels.
CARD_INCHES, CARD_DPI = (4.4, 2.8), 90

# The top-losses grid (report/top_losses.png and TensorBoard) has rows of this many images.
TOP_LOSS_COLUMNS = 6

# report/ file of the last validation's confusion counts, as JSON.
CONFUSION_FILE = "confusion_matrix.json"

# Config fields that change neither what a run learns nor how fast, left out of the HParams; and how a --tune search
# searched, which a run's own values (head_units, frozen_lr, dropout) and `tune` already say: the dashboard shows
# the first 5 settings that differ between its rows, and "max_trials 20" of a run that never searched is noise.
_NOT_HPARAMS = frozenset({"verbosity", "cache_dir", "tpu", "top_k", "tflite", "tflite_quantization", "tuner",
                          "max_trials", "tune_epochs", "tune_folds", "tune_only"})

# The metrics of the HParams dashboard, logged beside the hparams in their own folder. The dashboard looks a
# metric up in the hparams' folder joined with the metric's group, and with --logdir at a run's own tensorboard/
# that join gives "./validation", which is no run (a single run's metric columns stayed empty); a folder of its own
# also keeps the dashboard from listing every scalar of the phase runs as a metric. No hparams_config (nor in
# tuning's trials): the first one TensorBoard finds in a logdir sets the columns of every workdir in it (the other
# runs' metrics disappeared); without one it shows first the settings that differ between the runs. The tags have
# no folder prefix: they are the dashboard's column names.
HPARAMS_DIR = "hparams"
HPARAMS_METRIC_DESCRIPTIONS = {
    "val_accuracy": "The last epoch's validation accuracy.", "val_loss": "The last epoch's validation loss.",
    "train_accuracy": "The last epoch's training accuracy.", "train_loss": "The last epoch's training loss.",
    **{f"{phase}_images_per_sec": f"The {phase} phase's steady training images per second (without compiling "
                                  "steps and each epoch's first)." for phase in PHASES}}

# What to do about a class name no installed font draws, said in one line (figures, TensorBoard descriptions).
FONT_FIX = "Install a font with its characters (e.g. apt-get install fonts-noto-cjk) and rerun."

# Fonts whose glyphs are placeholders (a box naming the Unicode block), not letters.
_PLACEHOLDER_FONTS = ("Last Resort",)

# Drawing with a fallback font of one weight only (WenQuanYi Zen Hei is 500) makes matplotlib warn "Failed to find
# font weight normal ..., now using 500" on every figure: the nearest weight is what a label wants.
logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)


class TensorBoardLog:
  """The summaries of one run under WORKDIR/tensorboard.

  Each phase is a pair of runs, `PHASE/train` and `PHASE/validation`, holding the per-epoch scalars under the same
  tags, with the 1-based epoch number as step, continuous across the phases: a loss or accuracy chart draws the
  frozen and the fine-tune epochs as lines of their own colours (the phase boundary is where one ends and the next
  starts), and TensorBoard smooths each phase apart. Learning rate and throughput differ by orders of magnitude
  between the phases, so each phase has its own chart of them (`learning_rate/PHASE...`, `throughput/PHASE...`):
  one chart with both would draw the smaller as 0, or clip it as an outlier. The folder itself holds what belongs to
  the run as a whole: its config and a Markdown note where each phase starts, as text, and the images (under
  `images/`, which sorts after `epoch_*`, so that TensorBoard opens loss and accuracy first); `hparams/` holds its
  HParams and their metrics.
  """

  def __init__(self, log_dir: str | None, classes: Sequence[str], next_epoch: int = 1):
    """`log_dir` None logs nothing (a worker that is not the chief of a multi-worker run). The HParams trial is
    named after the folder holding `log_dir` (the workdir). next_epoch: the first epoch this process logs; what an
    earlier process logged from it on (an epoch trained past its last checkpoint before a kill, or after a
    checkpoint that was found corrupt) is purged, so that no epoch shows twice."""
    self.classes = list(classes)
    self._labels = figure_labels(self.classes)
    self._log_dir = log_dir
    self._phase_writers: dict[str, tuple] = {}
    if log_dir is None:
      self.name = ""
      self._run = self._hparams = tf.summary.create_noop_writer()
    else:
      self.name = os.path.basename(os.path.dirname(os.path.abspath(log_dir)))
      for folder in [log_dir, os.path.join(log_dir, HPARAMS_DIR)] + [
          os.path.join(log_dir, phase, split) for phase in PHASES for split in PHASE_RUNS]:
        purge_from(folder, next_epoch)  # Before the writers make their files: it must sort between.
      self._run, self._hparams = (tf.summary.create_file_writer(folder)
                                  for folder in (log_dir, os.path.join(log_dir, HPARAMS_DIR)))

  def _writers_of(self, phase: str) -> tuple:
    """The (train, validation) writers of `phase`, made at its first epoch: a run without the phase has no runs
    of it."""
    if phase not in self._phase_writers:
      if self._log_dir is None:
        self._phase_writers[phase] = (self._run, self._run)
      else:
        self._phase_writers[phase] = tuple(tf.summary.create_file_writer(os.path.join(self._log_dir, phase, split))
                                           for split in PHASE_RUNS)
    return self._phase_writers[phase]

  def log_run(self, config: Config, facts: dict) -> None:
    """The config (and the run's resolved facts: precision, replicas, classes) as text, and the HParams."""
    with self._hparams.as_default(step=0):
      hp.hparams(hparams_of(config, facts), trial_id=self.name)
    self._hparams.flush()
    with self._run.as_default(step=0):
      # ensure_ascii=False: class names and paths in any script read as written, not as \\u escapes.
      text = json.dumps({**config.to_dict(), "run": facts}, indent=2, default=str, ensure_ascii=False)
      # Indented by four spaces: TensorBoard renders text summaries as Markdown, and this keeps the JSON verbatim.
      tf.summary.text("config", "\n".join("    " + line for line in text.splitlines()))
    self._run.flush()

  def log_training_images(self, images: np.ndarray, labels: np.ndarray) -> None:
    """The first GRID_IMAGES training images after augmentation (what the model sees) in a grid, at step 0."""
    figure = image_grid_figure(images[:GRID_IMAGES], labels[:GRID_IMAGES], self.classes)
    with self._run.as_default(step=0):
      tf.summary.image("images/augmented_training", _png_tensor(figure),
                       description="The first training images after augmentation, before the backbone's "
                                   "preprocessing. " + self._labels.legend())
    self._run.flush()

  def log_epoch(self, history: Sequence[dict], confusion: np.ndarray) -> None:
    """The scalars of the last epoch record of `history` (see `trainer.train`) in its phase's runs, the validation
    confusion matrix as an image, and the run's metrics so far for the HParams dashboard."""
    record = history[-1]
    step, phase = record["epoch"], record["phase"]
    train, validation = self._writers_of(phase)
    with train.as_default(step=step):
      _log_loss_and_accuracy(record["loss"], record["accuracy"])
      _log_learning_rate(phase, record["learning_rate"])
      _log_throughput(phase, record)
    with validation.as_default(step=step):
      _log_loss_and_accuracy(record["val_loss"], record["val_accuracy"])
    with self._run.as_default(step=step):
      figure = confusion_matrix_card_figure(confusion, self.classes, f"Validation, epoch {step} ({phase})")
      tf.summary.image("images/confusion_matrix", _png_tensor(figure),
                       description="Validation after the epoch (the step): counts, and each cell's share of its "
                                   "true class as its colour; report/confusion_matrix.png has every share written "
                                   "out. " + self._labels.legend())
    with self._hparams.as_default(step=step):
      for tag, value in hparams_metrics(history).items():
        tf.summary.scalar(tag, value, description=HPARAMS_METRIC_DESCRIPTIONS[tag])
    for writer in (train, validation, self._run, self._hparams):
      writer.flush()

  def log_top_losses(self, figure: Figure, step: int, description: str) -> None:
    """The top-losses grid (`top_losses_figure`) as an image of the run at `step` (the last epoch)."""
    with self._run.as_default(step=step):
      tf.summary.image("images/top_losses", _png_tensor(figure), description=description)
    self._run.flush()

  def log_phase_start(self, epoch: int, phase: str, config: Config) -> None:
    """A Markdown note at the first epoch of a phase (the 1-based `epoch`)."""
    if phase == FROZEN:
      what = f"Only the head trains, learning rate {config.train.frozen_lr:g}."
    elif phase == SCRATCH:
      what = f"Every layer trains from random weights, learning rate {config.train.frozen_lr:g}."
    else:
      what = (f"The backbone from layer `{config.model.unfreeze_from}` up trains too, learning rate "
              f"{config.train.finetune_lr:g}.")
    with self._run.as_default(step=epoch):
      tf.summary.text("phase", f"**Epoch {epoch}: the {phase} phase starts.** {what} Its epochs are the runs "
                               f"`{phase}/train` and `{phase}/validation` on the loss and accuracy charts.")
    self._run.flush()

  def close(self) -> None:
    for writer in {id(writer): writer for pair in self._phase_writers.values() for writer in pair}.values():
      writer.close()
    for writer in (self._run, self._hparams):
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


def _log_loss_and_accuracy(loss: float, accuracy: float) -> None:
  for name, value in (("epoch_loss", loss), ("epoch_accuracy", accuracy)):
    tf.summary.scalar(name, value, description="Per epoch; each phase's epochs are runs of their own (PHASE/train, "
                                               "PHASE/validation), so the phase boundary shows where they meet.")


def _log_learning_rate(phase: str, learning_rate: float) -> None:
  # In millionths: TensorBoard's tables print 4 decimals (5e-5 read "0.0001", 2e-5 "0").
  tf.summary.scalar(f"learning_rate/{phase}{LEARNING_RATE_UNIT_SUFFIX}", learning_rate / LEARNING_RATE_UNIT,
                    description=f"The {phase} phase's learning rate at the start of the epoch, in units of "
                                f"{LEARNING_RATE_UNIT:g} (1000 is 1e-3, 50 is 5e-5).")


def _log_throughput(phase: str, record: dict) -> None:
  """The phase's training images/s: steady (without the steps that compiled) when the record has it, and over the
  whole epoch; and the seconds of the steps that compiled."""
  if record.get("steady_images_per_sec") is not None:
    tf.summary.scalar(f"throughput/{phase}_steady_images_per_sec", record["steady_images_per_sec"],
                      description="Training images per second without the epoch's first step (it starts the "
                                  "input pipeline) and the steps that traced or compiled the step function (one of "
                                  "each new batch shape, such as a partial last batch).")
  tf.summary.scalar(f"throughput/{phase}_epoch_images_per_sec", record["images_per_sec"],
                    description="Training images per second over the whole epoch, compiling steps included.")
  if record.get("compile_seconds") is not None:
    tf.summary.scalar(f"throughput/{phase}_compile_seconds", record["compile_seconds"],
                      description="Seconds of the epoch's steps that traced or compiled the step function.")


def hparams_of(config: Config, facts: dict) -> dict:
  """Every setting that can make runs differ in what they learn or how fast, by its flag name, and the run's
  resolved precision and replicas, for TensorBoard's HParams dashboard."""
  values = {name: value for section in config.to_dict().values() for name, value in section.items()
            if name not in _NOT_HPARAMS}
  return {**values, "precision": facts["precision"], "num_replicas": facts["num_replicas"]}


def hparams_metrics(history: Sequence[dict]) -> dict[str, float]:
  """The HParams metrics by tag: the last epoch's validation and train metrics, and each phase's steady images/s
  (a phase on cached features runs orders of magnitude faster than fine-tuning: one figure for both says neither)."""
  last = history[-1]
  rates = {f"{phase}_images_per_sec": rate for phase, rate in steady_images_per_sec_by_phase(history).items()
           if rate is not None}
  return {"val_accuracy": last["val_accuracy"], "val_loss": last["val_loss"], "train_accuracy": last["accuracy"],
          "train_loss": last["loss"], **rates}


def steady_images_per_sec_by_phase(history: Sequence[dict]) -> dict[str, float | None]:
  """Each phase's steady training images/s, by phase in training order (see `steady_images_per_sec`)."""
  return {phase: steady_images_per_sec([record for record in history if record["phase"] == phase])
          for phase in PHASES if any(record["phase"] == phase for record in history)}


def steady_images_per_sec(records: Sequence[dict]) -> float | None:
  """Training images per second over the epochs of `records` (of one phase) with a steady rate (see
  `Trainer.run_epoch`): all their images over the time they take at each epoch's steady rate. None if no epoch had
  one (an epoch of one full and one partial batch that both compiled)."""
  steady = [record for record in records if record.get("steady_images_per_sec")]
  images = [record["images_per_sec"] * record["train_seconds"] for record in steady]
  seconds = sum(count / record["steady_images_per_sec"] for count, record in zip(images, steady))
  return sum(images) / seconds if seconds else None


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
    """The line a figure shows under classes it names by id ('' if none), with the fix in a few words."""
    if not self.by_id:
      return ""
    ids = ", ".join(f"#{index}" for index in self.by_id)
    what = ("the class id of a name" if len(self.by_id) == 1 else "class ids of names") + " no installed font draws"
    return f"{ids}: {what} (classification_report.txt names them). {FONT_FIX}"

  def legend(self) -> str:
    """The names of the classes shown by id, as Markdown for a TensorBoard description ('' if none)."""
    if not self.by_id:
      return ""
    return ("Classes shown by id: " + ", ".join(f"#{index} = {self.classes[index]}" for index in self.by_id)
            + ". " + FONT_FIX)


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
  or None if no installed font has some character, even after adding the fonts installed since matplotlib's font
  cache was built."""
  missing = {ord(char) for char in text} - _codes_of(font_manager.findfont(default))
  families = _families_with(missing, _charmaps()) if missing else []
  if families is None and _add_fonts_missing_from_the_cache():
    families = _families_with(missing, _charmaps())
  return families


def _families_with(codes: set[int], charmaps: dict[str, frozenset[int]]) -> list[str] | None:
  families = []
  for code in codes:
    family = next((family for family, font_codes in charmaps.items() if code in font_codes), None)
    if family is None:
      return None
    families.append(family)
  return sorted(set(families))


def _charmaps() -> dict[str, frozenset[int]]:
  """The code points of each font family matplotlib knows (its own and the system's), by family name: read only
  for a name the default font cannot draw (reading every font takes a while on a machine with many)."""
  return _charmaps_of(len(font_manager.fontManager.ttflist))


@functools.cache
def _charmaps_of(font_count: int) -> dict[str, frozenset[int]]:
  """`_charmaps` while matplotlib knows `font_count` fonts (read again once fonts are added)."""
  del font_count  # The cache key: the fonts are read from the font manager itself.
  charmaps = {}
  for font in font_manager.fontManager.ttflist:
    if not font.name.startswith(_PLACEHOLDER_FONTS):
      charmaps[font.name] = charmaps.get(font.name, frozenset()) | _codes_of(font.fname)
  return charmaps


@functools.cache
def _add_fonts_missing_from_the_cache() -> bool:
  """Adds to matplotlib's font manager the system's fonts that its cache (~/.cache/matplotlib, built once) does not
  list: a font installed after the cache was built is otherwise never seen. Whether any was added; once a process."""
  known = {font.fname for font in font_manager.fontManager.ttflist}
  added = False
  for path in font_manager.findSystemFonts():
    if path not in known:
      try:
        font_manager.fontManager.addfont(path)
        added = True
      except (OSError, RuntimeError, ValueError):  # A file FreeType cannot read.
        continue
  return added


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
  workdir_lib.write_json(counts, {"classes": list(classes), "counts": np.asarray(confusion).astype(np.int64).tolist()})


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


def confusion_matrix_card_figure(confusion: np.ndarray, classes: Sequence[str], title: str) -> Figure:
  """The confusion matrix sized for TensorBoard's image card (about 400 x 210 pixels, images scaled down to fit):
  drawn at that height, so that its text is not shrunk; no colour bar; each cell's count, and its share of the
  true class where there is room. Many classes leave only the colours (report/confusion_matrix.png has them all)."""
  confusion = np.asarray(confusion)
  labels = figure_labels(classes, GRID_LABEL_CHARS)
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
