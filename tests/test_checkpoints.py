"""A corrupt newest checkpoint falls back to the newest readable one (kept aside for inspection), unfinished saves
are removed, and a full disk ends a save in one line that leaves the run resumable."""

import glob
import logging
import os
import shutil
import subprocess
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.errors import UserInputError
from trainer.loop import checkpoints, restore
from trainer.runtime.workdir import RunDir


class TinyRun:
  """A tiny Keras model and an epoch counter in a tf.train.Checkpoint, as the trainer keeps them."""

  def __init__(self, units: int = 3):
    self.model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(units)])
    self.epoch = tf.Variable(0)
    self.checkpoint = tf.train.Checkpoint(model=self.model, epoch=self.epoch)

  def set_epoch(self, epoch: int) -> None:
    """Weights that tell the epoch apart, so a restore shows which checkpoint it read."""
    self.epoch.assign(epoch)
    self.model.set_weights([np.full(w.shape, float(epoch), np.float32) for w in self.model.get_weights()])

  def restored_epoch(self) -> int:
    kernel = self.model.get_weights()[0]
    assert np.all(kernel == int(self.epoch)), "weights and counter come from different checkpoints"
    return int(self.epoch)


def _saved_run(directory, epochs: int = 3) -> TinyRun:
  run = TinyRun()
  manager = tf.train.CheckpointManager(run.checkpoint, str(directory), max_to_keep=3)
  for epoch in range(1, epochs + 1):
    run.set_epoch(epoch)
    manager.save()
  return run


def _truncate(path: str) -> None:
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _write(path: str, text: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


CORRUPTIONS = {
    "truncated data file": lambda d: _truncate(glob.glob(f"{d}/ckpt-3.data-*")[0]),
    "truncated index": lambda d: _truncate(f"{d}/ckpt-3.index"),
    "empty index": lambda d: open(f"{d}/ckpt-3.index", "w").close(),
    "missing data file": lambda d: os.remove(glob.glob(f"{d}/ckpt-3.data-*")[0]),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_corrupt_newest_checkpoint_falls_back_and_is_kept_aside(corruption, tmp_path, caplog):
  directory = tmp_path / "checkpoints"
  _saved_run(directory)
  CORRUPTIONS[corruption](directory)
  # What the trainer did before: CheckpointManager restores what the state file names, and fails.
  with pytest.raises((tf.errors.OpError, IndexError)):
    fresh = TinyRun()
    fresh.checkpoint.restore(tf.train.CheckpointManager(fresh.checkpoint, str(directory), 3).latest_checkpoint)

  run = TinyRun()
  with caplog.at_level(logging.WARNING):
    manager = checkpoints.restore_latest(run.checkpoint, str(directory), max_to_keep=3)

  assert run.restored_epoch() == 2
  assert manager.latest_checkpoint == str(directory / "ckpt-2")
  [line] = [r.getMessage() for r in caplog.records if "ckpt-3" in r.getMessage()]
  [aside] = glob.glob(str(directory / "corrupt" / "ckpt-3-*"))
  assert aside in line and "unreadable" in line
  assert os.listdir(aside) and not glob.glob(str(directory / "ckpt-3.*"))
  # The run goes on: the next save is readable and is what the next start restores.
  run.set_epoch(3)
  manager.save()
  again = TinyRun()
  again_manager = checkpoints.restore_latest(again.checkpoint, str(directory), max_to_keep=2)
  assert again.restored_epoch() == 3
  again.set_epoch(4)
  again_manager.save()  # max_to_keep holds after a fallback (three checkpoints stayed).
  assert sorted(glob.glob(str(directory / "ckpt-*.index"))) == [str(directory / f"ckpt-{n}.index") for n in (3, 4)]


@pytest.mark.parametrize("state", ["", "garbled {{ not a state", 'model_checkpoint_path: "ckpt-9"\n'])
def test_a_bad_state_file_resumes_from_the_newest_checkpoint_on_disk(state, tmp_path, caplog):
  directory = tmp_path / "checkpoints"
  _saved_run(directory)
  _write(str(directory / checkpoints.STATE_FILE), state)

  run = TinyRun()
  with caplog.at_level(logging.WARNING):
    manager = checkpoints.restore_latest(run.checkpoint, str(directory), max_to_keep=3)

  # A garbled state file used to be ignored: the run started again from epoch 1 without a word.
  assert run.restored_epoch() == 3
  assert manager.latest_checkpoint == str(directory / "ckpt-3")
  [aside] = glob.glob(str(directory / "corrupt" / "checkpoint-*"))
  assert any(aside in r.getMessage() for r in caplog.records)
  assert open(os.path.join(aside, checkpoints.STATE_FILE), encoding="utf-8").read() == state


def test_no_readable_checkpoint_starts_again_and_says_so(tmp_path, caplog):
  directory = tmp_path / "checkpoints"
  _saved_run(directory, epochs=1)
  _truncate(str(directory / "ckpt-1.index"))

  run = TinyRun()
  with caplog.at_level(logging.WARNING):
    manager = checkpoints.restore_latest(run.checkpoint, str(directory), max_to_keep=3)

  assert manager.latest_checkpoint is None and int(run.epoch) == 0
  assert any("nothing to resume from" in r.getMessage() for r in caplog.records)


def test_a_reader_skips_a_corrupt_checkpoint_without_moving_it(tmp_path):
  directory = tmp_path / "checkpoints"
  _saved_run(directory)
  _truncate(str(directory / "ckpt-3.index"))

  assert checkpoints.newest_readable(str(directory)) == str(directory / "ckpt-2")
  assert os.path.exists(directory / "ckpt-3.index") and not os.path.exists(directory / "corrupt")


def test_a_worker_restores_what_the_chief_repairs_to(tmp_path):
  directory = tmp_path / "checkpoints"
  _saved_run(directory)
  _truncate(str(directory / "ckpt-3.index"))
  chief = threading.Timer(0.5, checkpoints.restore_latest, (TinyRun().checkpoint, str(directory), 3))
  chief.start()

  worker = TinyRun()
  manager = checkpoints.restore_latest(worker.checkpoint, str(directory), max_to_keep=3, repair=False)
  chief.join()

  # The worker's manager read the state file after the chief's repair: what the preemption handler restores.
  assert manager.latest_checkpoint == str(directory / "ckpt-2") and worker.restored_epoch() == 2


def test_unfinished_saves_are_removed_at_start(tmp_path):
  directory = tmp_path / "checkpoints"
  _saved_run(directory, epochs=1)
  (directory / "ckpt-2_temp").mkdir()
  (directory / "ckpt-2_temp" / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"\0" * 100)

  run = TinyRun()
  checkpoints.restore_latest(run.checkpoint, str(directory), max_to_keep=3)

  assert run.restored_epoch() == 1
  assert sorted(os.listdir(directory)) == ["checkpoint", "ckpt-1.data-00000-of-00001", "ckpt-1.index"]


@pytest.fixture
def small_disk(tmp_path):
  """A 512 KB tmpfs: a real full disk (needs root, as CI and the developers' machines run)."""
  mount_point = tmp_path / "disk"
  mount_point.mkdir()
  if os.geteuid() != 0 or shutil.which("mount") is None:
    pytest.skip("mounting a small tmpfs needs root")
  result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
  if result.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
  yield mount_point
  subprocess.run(["umount", str(mount_point)], check=True)


def test_a_full_disk_ends_the_save_in_one_line_and_the_run_resumes(small_disk):
  directory = small_disk / "checkpoints"
  run = TinyRun(units=20_000)  # 4 x 20000 float32 weights: 400 KB a checkpoint, one fits on the disk.
  manager = tf.train.CheckpointManager(run.checkpoint, str(directory), max_to_keep=2)
  run.set_epoch(1)
  checkpoints.save(manager)
  run.set_epoch(2)

  with pytest.raises(UserInputError) as raised:
    checkpoints.save(manager)

  message = str(raised.value)
  assert "\n" not in message and str(directory) in message and "full" in message
  assert "needs about 0.4 MB" in message and "ckpt-1" in message
  assert not glob.glob(str(directory / "*_temp"))
  resumed = TinyRun(units=20_000)
  checkpoints.restore_latest(resumed.checkpoint, str(directory), max_to_keep=2)
  assert resumed.restored_epoch() == 1


def test_a_run_whose_newest_checkpoint_is_corrupt_resumes_from_the_one_before(tiny_config, color_folder, tmp_path,
                                                                              caplog):
  from trainer.loop import train  # Imported here: the other tests need no model.
  config = tiny_config.replace(data_dir=str(color_folder), frozen_epochs=2, finetune_epochs=0)
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir))
  first = RunDir(str(workdir)).load_history()
  _truncate(glob.glob(str(workdir / "checkpoints" / "ckpt-2.data-*"))[0])
  # Export and evaluation read the run too: they skip the corrupt checkpoint and leave it where it is.
  assert restore.restore(str(workdir)).checkpoint == str(workdir / "checkpoints" / "ckpt-1")

  with caplog.at_level(logging.WARNING):
    metrics = train.train_and_evaluate(config, str(workdir))

  assert metrics["epochs"] == 2 and np.isfinite(metrics["val_loss"])
  assert glob.glob(str(workdir / "checkpoints" / "corrupt" / "ckpt-2-*" / "ckpt-2.data-*"))
  assert any("ckpt-2 is unreadable" in r.getMessage() for r in caplog.records)
  history = RunDir(str(workdir)).load_history()
  assert history[0] == first[0] and history[1]["seconds"] != first[1]["seconds"]  # Epoch 1 kept, epoch 2 rerun.
  assert checkpoints.newest_readable(str(workdir / "checkpoints")).endswith("ckpt-2")
