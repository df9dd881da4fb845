"""Keeping the frozen phase's weights when fine-tuning ends worse (--keep_better_phase).

Fine-tuning the top of an ImageNet backbone on a small photo set can end below the frozen phase it started from
(hymenoptera, 1 seed in 3: BUILD_NOTES.md). The weights the frozen phase ended with are written once, before the
first fine-tune step; when the run's last validation is below the frozen phase's last one, they become the run's
final model: restored, validated again, and saved in place of the last epoch's checkpoint, so that the report, the
export, a rerun and `trainer.evaluate` all see the model that was kept. The choice is made on the validation split,
like any choice of a checkpoint by validation accuracy: one of two, so the split's accuracy is only slightly
optimistic.
"""

import os
from typing import TYPE_CHECKING

import tensorflow as tf
from absl import logging

from trainer.loop import checkpoints
from trainer.modeling import model as model_lib
from trainer.runtime import workdir as workdir_lib

if TYPE_CHECKING:
  from trainer.loop.train import Run

_NAME = "frozen_phase_end"


def _prefix(folder: str) -> str:
  """Beside the run's checkpoints (as checkpoints/corrupt/ is): a checkpoint of the model alone, not one the
  CheckpointManager counts or removes."""
  return os.path.join(workdir_lib.RunDir(folder).checkpoints, _NAME, "weights")


def save_frozen_phase_end(run: "Run", epoch: int) -> None:
  """At the start of the first fine-tune epoch (0-based `epoch`), before its first step, the weights are the frozen
  phase's last: also in a run resumed there, whose checkpoint holds them. Every worker writes (a checkpoint of
  distributed variables is written by all); the chief's copy, in the workdir, is the one read."""
  config, trainer = run.config, run.trainer
  if (not config.train.keep_better_phase or int(trainer.epoch_step) or epoch == 0
      or model_lib.phase_of_epoch(epoch, config) != model_lib.FINETUNE
      or model_lib.phase_of_epoch(epoch - 1, config) != model_lib.FROZEN):
    return
  # runtime.write_dir is the workdir on the chief, a temporary folder (removed at the end) on the others.
  tf.train.Checkpoint(model=trainer.model).write(_prefix(run.runtime.write_dir))


def keep_better_phase(run: "Run", val_metrics: dict, validate) -> tuple[dict, dict | None]:
  """(the final validation's metrics, the choice for metrics.json or None). With the fine-tune phase's last
  validation below the frozen phase's, the frozen phase's weights are restored, validated with `validate(run)` and
  saved in place of the last epoch's checkpoint (under its name, which an export is made for). Every worker
  decides alike: their histories hold the same global metrics."""
  frozen = [record for record in run.history if record["phase"] == model_lib.FROZEN]
  finetune = [record for record in run.history if record["phase"] == model_lib.FINETUNE]
  if not (run.config.train.keep_better_phase and frozen and finetune):
    return val_metrics, None
  choice = {"frozen_val_accuracy": frozen[-1]["val_accuracy"], "finetune_val_accuracy": finetune[-1]["val_accuracy"],
            "kept": model_lib.FINETUNE}
  if choice["finetune_val_accuracy"] >= choice["frozen_val_accuracy"]:
    return val_metrics, choice
  prefix = _prefix(run.workdir)
  if not tf.io.gfile.exists(prefix + ".index"):
    logging.warning("Fine-tuning ended at val_accuracy %.4f, below the frozen phase's %.4f, but the frozen phase's "
                    "weights were not saved (%s is missing): the fine-tuned weights are kept.",
                    choice["finetune_val_accuracy"], choice["frozen_val_accuracy"], prefix)
    return val_metrics, choice
  run.trainer.train_on_features(None)
  tf.train.Checkpoint(model=run.trainer.model).read(prefix).assert_existing_objects_matched().expect_partial()
  val_metrics = validate(run)
  checkpoints.save(run.own_manager, replace_latest=True)
  logging.warning("Fine-tuning ended at val_accuracy %.4f, below the frozen phase's %.4f: the run keeps the frozen "
                  "phase's weights (val_accuracy %.4f; --keep_better_phase=false keeps the fine-tuned ones).",
                  choice["finetune_val_accuracy"], choice["frozen_val_accuracy"], val_metrics["accuracy"])
  return val_metrics, {**choice, "kept": model_lib.FROZEN}
