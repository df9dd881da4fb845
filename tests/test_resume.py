"""Interrupted runs: SIGKILL loses at most the epoch in progress, SIGTERM saves mid-epoch and exits for a retry;
a rerun of the same command ends where an uninterrupted run ends, with the defaults' augmentation, dropout and
input order (their random streams follow (seed, epoch, step), see trainer.modeling.randomness). Another configuration is
refused."""

import logging
import re
import signal
import time

import pytest
import trainer_process
from conftest import CLASS_COLORS, tiny_run, write_image

from trainer import exit_codes
from trainer.config import Config
from trainer.errors import UserInputError
from trainer.reporting import progress
from trainer.runtime.workdir import RunDir

EPOCHS = {"frozen_epochs": 1, "finetune_epochs": 3}


def _wait_for_epochs(process, workdir, count: int) -> list[dict]:
  deadline = time.monotonic() + trainer_process.TIMEOUT_SECONDS
  while time.monotonic() < deadline:
    records = trainer_process.history(workdir)
    if len(records) >= count:
      return records
    assert process.poll() is None, process.communicate()[0][-4000:]
    time.sleep(0.02)
  process.kill()
  pytest.fail(f"no {count} epochs within {trainer_process.TIMEOUT_SECONDS}s")


@pytest.fixture(scope="module")
def color_folder(tmp_path_factory):
  """The conftest fixture's images, once for the module: both interruptions compare with one uninterrupted run."""
  root = tmp_path_factory.mktemp("colors")
  for name, color in CLASS_COLORS.items():
    for i in range(6):
      write_image(root / name / f"{name}_{i}.jpg", color)
  return root


@pytest.fixture(scope="module")
def uninterrupted(color_folder, random_mobilenet_025_weights, tmp_path_factory):
  """The run the interrupted ones must end as, trained here: the same function the command calls (a child process
  costs a TensorFlow start; the killed run below is one, as SIGKILL needs)."""
  from trainer.loop import train
  workdir = tmp_path_factory.mktemp("uninterrupted")
  train.train_and_evaluate(tiny_run(random_mobilenet_025_weights, data_dir=str(color_folder), **EPOCHS), str(workdir))
  return trainer_process.history(workdir)


def _assert_same_end(resumed: list[dict], uninterrupted: list[dict]) -> None:
  assert [(r["epoch"], r["phase"]) for r in resumed] == [(1, "frozen"), (2, "finetune"), (3, "finetune"),
                                                         (4, "finetune")]
  # Data order, augmentation, dropout, optimizer state and weights all resume: the same end up to float
  # summation (tolerance 1e-4), and the resumed epoch reports all of its steps.
  for record, expected in zip(resumed, uninterrupted):
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
      assert record[key] == pytest.approx(expected[key], abs=1e-4), (key, record, expected)


def test_sigkill_in_the_finetune_phase_then_rerun_finishes_the_requested_epochs(
    color_folder, random_mobilenet_025_weights, tmp_path, uninterrupted, caplog):
  workdir = tmp_path / "killed"
  flags = trainer_process.tiny_flags(color_folder, random_mobilenet_025_weights, workdir=workdir, verbosity=0, **EPOCHS)
  process = trainer_process.start(flags)
  before_kill = _wait_for_epochs(process, workdir, 2)  # Epoch 2 is the first fine-tune epoch.
  process.send_signal(signal.SIGKILL)
  process.wait()

  from trainer.loop import train
  caplog.set_level(logging.INFO, logger="absl")  # Another test may have left absl at --verbosity=-1.
  train.train_and_evaluate(tiny_run(random_mobilenet_025_weights, data_dir=str(color_folder), **EPOCHS),
                           str(workdir))
  resumed = trainer_process.history(workdir)
  output = caplog.text
  assert "Resumed from" in output
  completed = int(output.split("Resumed from ")[1].split(": ")[1].split(" epoch(s) done")[0])
  assert completed >= 1  # At least the frozen epoch and, unless killed between history and checkpoint, epoch 2.
  assert resumed[:completed] == before_kill[:completed]  # Completed epochs kept, not redone.
  _assert_same_end(resumed, uninterrupted)


def test_sigterm_saves_mid_epoch_and_exits_for_a_retry(color_folder, random_mobilenet_025_weights, tmp_path,
                                                       uninterrupted, monkeypatch, caplog):
  """A real SIGTERM to this process at step 2 of the first fine-tune epoch (what a scheduler's preemption sends),
  handled by PreemptionCheckpointHandler as in the command."""
  from trainer.loop import train
  caplog.set_level(logging.INFO, logger="absl")  # Another test may have left absl at --verbosity=-1.
  config = tiny_run(random_mobilenet_025_weights, data_dir=str(color_folder), verbosity=0, **EPOCHS)
  workdir = tmp_path / "terminated"
  run = train.setup(config, str(workdir))
  monkeypatch.setattr(progress, "bar", _signal_at_step(signal.SIGTERM, 2, training_epoch=2))
  with pytest.raises(SystemExit) as exit_:
    train.train_epochs(run)
  run.tensorboard.close()
  assert exit_.value.code == exit_codes.PREEMPTED
  assert re.search(r"Stopped by SIGTERM: saved a checkpoint after [23] step\(s\) of epoch 2\.", caplog.text)
  monkeypatch.undo()

  train.train_and_evaluate(config, str(workdir))
  assert "Resumed from" in caplog.text
  _assert_same_end(trainer_process.history(workdir), uninterrupted)


def test_a_different_configuration_is_refused_in_a_workdir_with_checkpoints(tmp_path):
  run = RunDir(str(tmp_path))
  config = Config().replace(data_dir="photos", seed=1)
  run.save_config(config, {})
  run.save_config(config.replace(seed=2), {})  # No checkpoints yet: nothing to protect.
  (tmp_path / "checkpoints").mkdir()
  (tmp_path / "checkpoints" / "ckpt-1.index").write_bytes(b"")
  with pytest.raises(UserInputError, match="--seed: 2 -> 3"):
    run.save_config(config.replace(seed=3), {})
  # More epochs, another strategy or other logs continue the same run.
  run.save_config(config.replace(seed=2, finetune_epochs=9, strategy="mirrored", verbosity=1), {})
  assert run.load_config().train.finetune_epochs == 9


def _signal_at_step(signum: int, at_step: int, training_epoch: int | None = None):
  """A stand-in for the progress bar that sends this process `signum` when an epoch's step `at_step` is done: in
  every epoch, or only in the `training_epoch`-th training pass (the one bar of each that shows progress)."""
  shown = []

  class Bar:
    def __init__(self, steps, progress):
      if progress:
        shown.append(self)
      self.signals = training_epoch is None or (progress and len(shown) == training_epoch)

    def update(self, step, values):
      if step == at_step and self.signals:
        signal.raise_signal(signum)
  return Bar


def test_ctrl_c_saves_mid_epoch_and_exits_130_in_one_line(color_folder, random_mobilenet_025_weights, tmp_path,
                                                          monkeypatch):
  """Ctrl-C ended in a KeyboardInterrupt traceback and lost the epoch's steps: it now saves as SIGTERM does."""
  from trainer.loop import train
  config = tiny_run(random_mobilenet_025_weights, data_dir=str(color_folder), frozen_epochs=0, finetune_epochs=2,
                    batch_size=2)
  run = train.setup(config, str(tmp_path / "run"))
  monkeypatch.setattr(progress, "bar", _signal_at_step(signal.SIGINT, 2))
  with pytest.raises(SystemExit) as exit_:
    train.train_epochs(run)
  run.tensorboard.close()
  assert exit_.value.code == exit_codes.INTERRUPTED
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C is Python's own again.
  monkeypatch.undo()
  resumed = train.setup(config, str(tmp_path / "run"))
  assert int(resumed.trainer.epoch) == 0 and int(resumed.trainer.epoch_step) >= 2  # The steps done were saved.
  # The resumed epoch records the rate it started at (the cosine schedule's first), not the rate at the resume.
  train.train_epochs(resumed)
  resumed.tensorboard.close()
  assert [record["learning_rate"] for record in resumed.history][0] == pytest.approx(config.train.finetune_lr)


def test_sigterm_after_the_last_step_exits_for_a_retry_instead_of_being_swallowed(
    color_folder, random_mobilenet_025_weights, tmp_path, monkeypatch):
  """No step was left to act on a SIGTERM that came with the last one: the run went on to its export, past a
  scheduler's grace period. The last epoch's checkpoint is saved; the run exits 143, and a rerun finishes."""
  from trainer.loop import train
  config = tiny_run(random_mobilenet_025_weights, data_dir=str(color_folder), finetune_epochs=0, batch_size=4)
  run = train.setup(config, str(tmp_path / "run"))
  monkeypatch.setattr(progress, "bar", _signal_at_step(signal.SIGTERM, train._steps(run, run.inputs.train)))
  with pytest.raises(SystemExit) as exit_:
    train.train_epochs(run)
  run.tensorboard.close()
  assert exit_.value.code == exit_codes.PREEMPTED
  monkeypatch.undo()
  resumed = train.setup(config, str(tmp_path / "run"))
  assert int(resumed.trainer.epoch) == 1 and int(resumed.trainer.epoch_step) == 0  # The epoch's checkpoint.
