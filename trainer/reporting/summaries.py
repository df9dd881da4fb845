"""A run's TensorBoard summaries while it trains (WORKDIR/tensorboard): per phase its train and validation runs,
learning rate, throughput, the first augmented batch, the confusion matrix, the top losses, and the HParams.

Everything here takes plain Python and numpy values (the epoch records of the training history, a confusion matrix
of counts with true classes as rows); the figures are trainer.reporting.report_files'.
"""

import json
import os
import socket
import time
from typing import Sequence

import numpy as np
import tensorflow as tf
from matplotlib.figure import Figure
from tensorboard.compat.proto import event_pb2
from tensorboard.plugins.hparams import api as hp

from trainer.config import Config
from trainer.modeling.model import FINETUNE, FROZEN, SCRATCH
from trainer.reporting import class_labels, report_files

# The phases in training order; each has its runs PHASE/train and PHASE/validation (see TensorBoardLog).
PHASES = (FROZEN, FINETUNE, SCRATCH)
PHASE_RUNS = ("train", "validation")

# Learning rates are charted in this unit, named in the tag (TensorBoard's tables print 4 decimals).
LEARNING_RATE_UNIT, LEARNING_RATE_UNIT_SUFFIX = 1e-6, "_x1e-6"

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
    self._labels = class_labels.figure_labels(self.classes)
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
    """The first few training images after augmentation (what the model sees) in a grid, at step 0."""
    shown = report_files.GRID_IMAGES
    figure = report_files.image_grid_figure(images[:shown], labels[:shown], self.classes)
    with self._run.as_default(step=0):
      tf.summary.image("images/augmented_training", report_files.png_tensor(figure),
                       description="The first training images after augmentation, before the backbone's "
                                   "preprocessing. " + self._labels.legend())
    self._run.flush()

  def log_epoch(self, history: Sequence[dict], confusion: np.ndarray) -> None:
    """The scalars of the last epoch record of `history` (see `trainer.loop.train`) in its phase's runs, the validation
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
      figure = report_files.confusion_matrix_card_figure(confusion, self.classes, f"Validation, epoch {step} ({phase})")
      tf.summary.image("images/confusion_matrix", report_files.png_tensor(figure),
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
      tf.summary.image("images/top_losses", report_files.png_tensor(figure), description=description)
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
  return {phase: report_files.steady_images_per_sec([record for record in history if record["phase"] == phase])
          for phase in PHASES if any(record["phase"] == phase for record in history)}
