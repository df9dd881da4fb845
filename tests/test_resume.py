"""Interrupted runs: SIGKILL loses at most the epoch in progress, SIGTERM saves mid-epoch and exits for a retry;
a rerun of the same command ends where an uninterrupted run ends, with the defaults' augmentation, dropout and
input order (their random streams follow (seed, epoch, step), see trainer.modeling.randomness). Another configuration is
refused."""

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
  workdir = tmp_path_factory.mktemp("uninterrupted")
  trainer_process.run(trainer_process.tiny_flags(color_folder, random_mobilenet_025_weights, workdir=workdir, **EPOCHS))
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
    color_folder, random_mobilenet_025_weights, tmp_path, uninterrupted):
  workdir = tmp_path / "killed"
  flags = trainer_process.tiny_flags(color_folder, random_mobilenet_025_weights, workdir=workdir, verbosity=0, **EPOCHS)
  process = trainer_process.start(flags)
  before_kill = _wait_for_epochs(process, workdir, 2)  # Epoch 2 is the first fine-tune epoch.
  process.send_signal(signal.SIGKILL)
  process.wait()

  output = trainer_process.run(flags)
  resumed = trainer_process.history(workdir)
  assert "Resumed from" in output
  completed = int(output.split("Resumed from ")[1].split(": ")[1].split(" epoch(s) done")[0])
  assert completed >= 1  # At least the frozen epoch and, unless killed between history and checkpoint, epoch 2.
  assert resumed[:completed] == before_kill[:completed]  # Completed epochs kept, not redone.
  _assert_same_end(resumed, uninterrupted)


def test_sigterm_saves_mid_epoch_and_exits_for_a_retry(color_folder, random_mobilenet_025_weights, tmp_path,
                                                       uninterrupted):
  workdir = tmp_path / "terminated"
  flags = trainer_process.tiny_flags(color_folder, random_mobilenet_025_weights, workdir=workdir, verbosity=0, **EPOCHS)
  process = trainer_process.start(flags)
  _wait_for_epochs(process, workdir, 1)
  process.send_signal(signal.SIGTERM)
  output = process.communicate(timeout=trainer_process.TIMEOUT_SECONDS)[0]
  assert process.returncode == exit_codes.PREEMPTED, output[-4000:]
  assert "Stopped by SIGTERM: saved a checkpoint" in output

  output = trainer_process.run(flags)
  assert "Resumed from" in output
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


def _signal_at_step(signum: int, at_step: int):
  """A stand-in for the progress bar that sends this process `signum` when the epoch's step `at_step` is done."""
  class Bar:
    def __init__(self, steps, progress):
      pass

    def update(self, step, values):
      if step == at_step:
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
