"""A run's checkpoints when something went wrong: a corrupt newest checkpoint, a full disk, a killed save.

tf.train.CheckpointManager trusts its `checkpoint` state file and restores what it names: a truncated newest
checkpoint ends the run although the one before is intact, an empty state file raises "Invalid checkpoint state",
and a garbled one is ignored, so the run silently starts again from epoch 1. Here the checkpoint files on disk are
the truth: the newest one that reads back whole (every tensor, with its checksum) is restored, and the unreadable
ones are moved to checkpoints/corrupt/ for inspection.
"""

import datetime
import glob
import os
import re
import shutil
import time

import tensorflow as tf
from absl import logging
from google.protobuf import text_format
from tensorflow.python.training.checkpoint_state_pb2 import CheckpointState

from trainer import errors
from trainer.errors import UserInputError

CORRUPT_DIR = "corrupt"
STATE_FILE = "checkpoint"
# CheckpointManager's default checkpoint_name: checkpoints are <directory>/ckpt-<number>.{index,data-*}.
_INDEX = re.compile(r"ckpt-(\d+)\.index")
# A sharded save writes <prefix>_temp/ and renames its files into place; a killed or failed save leaves it.
_UNFINISHED_SAVE = "ckpt-*_temp"
# How long a worker waits for the chief to repair the state file: repairing takes the chief a few file moves.
REPAIR_WAIT_SECONDS = 60


def restore_latest(checkpoint: tf.train.Checkpoint, directory: str, max_to_keep: int,
                   repair: bool = True) -> tf.train.CheckpointManager:
  """Restores the newest readable checkpoint of `directory` into `checkpoint`; returns the manager of
  `directory`, whose latest_checkpoint is that one (None when nothing restored).

  repair: this process writes `directory` (the chief): it first removes unfinished saves, moves unreadable
  checkpoints and a bad state file to `directory`/corrupt/, and rewrites the state file to name the checkpoint
  restored. Another process only reads, skipping what is unreadable, and waits (up to REPAIR_WAIT_SECONDS) for
  the state file to name the same checkpoint: TensorFlow's preemption handler restores what the manager read there.
  """
  if repair:
    prefix = _repair(directory)
  else:
    prefix = newest_readable(directory)
    _wait_for_state(directory, prefix)
  manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=max_to_keep)
  if prefix:
    restore_matching(checkpoint, prefix)
  return manager


def restore_matching(checkpoint: tf.train.Checkpoint, prefix: str) -> None:
  """checkpoint.restore(prefix), every object of `checkpoint` found there with its shape; a checkpoint of another
  model (its config.json edited, or a checkpoint copied from another run) ends in one line naming it.
  Values of the checkpoint that `checkpoint` does not hold are fine (export restores the model only of a training
  checkpoint, which also holds the optimizers)."""
  try:
    status = checkpoint.restore(prefix)
    status.assert_existing_objects_matched()
    # Values saved but not restored into an object (Keras' own bookkeeping, or the optimizers for an export) are
    # expected: without this, TensorFlow lists them as "unrestored values" when the status is collected, after a
    # finished run's last line.
    status.expect_partial()
  except (ValueError, AssertionError, tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserInputError(f"Checkpoint {prefix} does not fit the model its workdir's config.json describes "
                         f"({first_line[:200]}): the run's settings were changed after it was trained. Restore "
                         "config.json, or train in a new --workdir.") from None


def _repair(directory: str) -> str | None:
  remove_unfinished_saves(directory)
  state = _valid_state_or_move_aside(directory)  # Read before any checkpoint it names moves.
  prefix = newest_readable(directory, move_aside=True)
  _point_state_at(directory, prefix, state)
  return prefix


def newest_readable(directory: str, move_aside: bool = False) -> str | None:
  """The prefix of the newest checkpoint in `directory` whose files read back whole, None if there is none.
  Each unreadable newer one is logged in one line (and moved to corrupt/ with `move_aside`)."""
  found = _on_disk(directory)
  for _, prefix in found:
    problem = _unreadable(prefix)
    if problem is None:
      return prefix
    if move_aside:
      files = glob.glob(glob.escape(prefix) + ".*")
      done = f"moved it to {_move_aside(directory, os.path.basename(prefix), files)}"
    else:
      done = "skipped it"
    logging.warning("Checkpoint %s is unreadable (%s): %s, falling back to the one before.", prefix, problem, done)
  if found:
    logging.warning("No checkpoint in %s is readable: there is nothing to resume from.", directory)
  return None


def _wait_for_state(directory: str, prefix: str | None) -> None:
  deadline = time.monotonic() + REPAIR_WAIT_SECONDS
  while _named_latest(_read_state(directory), directory) != prefix and time.monotonic() < deadline:
    time.sleep(0.1)


def remove_unfinished_saves(directory: str) -> None:
  """Removes the temporary folders of saves that never finished (killed, or the disk was full)."""
  for path in glob.glob(os.path.join(glob.escape(directory), _UNFINISHED_SAVE)):
    shutil.rmtree(path, ignore_errors=True)


def save(manager: tf.train.CheckpointManager, replace_latest: bool = False) -> str:
  """manager.save(); a full disk ends in one line naming the folder and the space a checkpoint needs, and
  leaves the previous checkpoint as the one a rerun resumes from. replace_latest: save under the latest
  checkpoint's number (the same epoch's checkpoint with other weights), so that it keeps its name."""
  latest = manager.latest_checkpoint
  number = int(latest.rsplit("-", 1)[1]) if replace_latest and latest else None
  try:
    return manager.save(checkpoint_number=number)
  except tf.errors.ResourceExhaustedError as e:
    if not any(reason in str(e) for reason in errors.DISK_FULL):
      raise
    directory = manager.directory
    remove_unfinished_saves(directory)
    free = _megabytes(shutil.disk_usage(directory).free)
    latest = manager.latest_checkpoint
    needed = (f"about {_megabytes(_size(latest))} (the size of the last one)" if latest
              else "more than that")
    resume = f"it resumes from {latest}" if latest else "it starts again"
    raise UserInputError(f"The disk holding {directory} is full: {free} free, and a checkpoint needs {needed}. "
                         f"Free space there and run the same command again: {resume}.") from None


def _unreadable(prefix: str) -> str | None:
  """Why the checkpoint at `prefix` cannot be read back, None when every tensor reads (checksums included)."""
  try:
    reader = tf.train.load_checkpoint(prefix)
    for name in reader.get_variable_to_shape_map():
      reader.get_tensor(name)
  except (tf.errors.OpError, IndexError) as e:  # A truncated data file raises IndexError.
    return (str(e).strip() or type(e).__name__).splitlines()[0]
  return None


def _valid_state_or_move_aside(directory: str) -> CheckpointState | None:
  """The parsed state file; one that cannot be parsed or names no existing checkpoint is moved aside (None)."""
  state_file = os.path.join(directory, STATE_FILE)
  if not os.path.isfile(state_file):
    return None
  state = _read_state(directory)
  if state is None or not os.path.isfile(_named_latest(state, directory) + ".index"):
    logging.warning("The checkpoint state file %s is invalid: moved it to %s.", state_file,
                    _move_aside(directory, STATE_FILE, [state_file]))
    return None
  return state


def _point_state_at(directory: str, prefix: str | None, state: CheckpointState | None) -> None:
  """Makes the state file name `prefix` as the latest checkpoint (and the older ones on disk as kept)."""
  state_file = os.path.join(directory, STATE_FILE)
  if prefix is None:
    if os.path.exists(state_file):
      os.remove(state_file)
    return
  if _named_latest(state, directory) == prefix:
    return
  latest = int(prefix.rsplit("-", 1)[1])
  kept = [path for number, path in reversed(_on_disk(directory)) if number <= latest]
  # With their times: CheckpointManager deletes past max_to_keep only the checkpoints newer than the state's
  # last_preserved_timestamp, and a state without times preserved them all (three stayed after a fallback).
  text = text_format.MessageToString(CheckpointState(
      model_checkpoint_path=os.path.basename(prefix), all_model_checkpoint_paths=map(os.path.basename, kept),
      all_model_checkpoint_timestamps=[os.path.getmtime(f"{path}.index") for path in kept],
      last_preserved_timestamp=0.0))
  partial = f"{state_file}.partial"
  with open(partial, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(partial, state_file)


def _read_state(directory: str) -> CheckpointState | None:
  """The parsed state file, None when it is missing, cannot be parsed or names no checkpoint."""
  state = CheckpointState()
  try:
    with open(os.path.join(directory, STATE_FILE), encoding="utf-8") as f:
      text_format.Parse(f.read(), state)
  except (OSError, text_format.ParseError, UnicodeDecodeError):
    return None
  return state if state.model_checkpoint_path else None


def _named_latest(state: CheckpointState | None, directory: str) -> str | None:
  """The prefix in `directory` of the checkpoint `state` names (by its name: a workdir may have been moved)."""
  return os.path.join(directory, os.path.basename(state.model_checkpoint_path)) if state else None


def _on_disk(directory: str) -> list[tuple[int, str]]:
  """(number, prefix) of every checkpoint with an index file in `directory`, newest first."""
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return sorted(((int(match.group(1)), os.path.join(directory, f"ckpt-{match.group(1)}"))
                 for match in map(_INDEX.fullmatch, names) if match), reverse=True)


def _move_aside(directory: str, name: str, paths: list[str]) -> str:
  """Moves `paths` into a new folder `directory`/corrupt/<name>-<time>/; returns that folder."""
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%f")
  destination = os.path.join(directory, CORRUPT_DIR, f"{name}-{stamp}")
  os.makedirs(destination)
  for path in paths:
    os.replace(path, os.path.join(destination, os.path.basename(path)))
  return destination


def _size(prefix: str) -> int:
  return sum(os.path.getsize(path) for path in glob.glob(glob.escape(prefix) + ".*"))


def _megabytes(count: int) -> str:
  return f"{count / 1e6:.1f} MB"
