import dataclasses
import os
import types

import numpy as np
import tensorflow as tf
from conftest import tiny_run, write_color_dataset

from export import end_of_run
from trainer.loop import phase_choice, restore, train
from trainer.modeling import model as model_lib
from trainer.runtime import workdir as workdir_lib


def test_a_fine_tune_phase_that_ends_worse_leaves_the_frozen_phases_weights_as_the_model(
    tmp_path, random_mobilenet_025_weights):
  """A fine-tune rate far too high wrecks what the frozen phase learned; the run's model, its metrics, its latest
  checkpoint and its export must all be the frozen phase's, with augmentation and dropout on."""
  # 3 validation images per class (1 was too few: a head at 0.87 on the training images once scored chance there),
  # and frozen epochs on cached features, which take milliseconds: enough for the head to separate the colours.
  write_color_dataset(tmp_path / "data", 10)
  config = tiny_run(random_mobilenet_025_weights, data_dir=str(tmp_path / "data"), validation_split=0.3,
                    frozen_epochs=10, frozen_lr=3e-2, finetune_lr=50.0, finetune_schedule="constant",
                    unfreeze_from="all")
  workdir = str(tmp_path / "run")
  metrics = train.train_and_evaluate(config, workdir, exporter=end_of_run.SavedModelExport())
  history = workdir_lib.RunDir(workdir).load_history()
  frozen_end, finetune_end = history[-2]["val_accuracy"], history[-1]["val_accuracy"]
  assert finetune_end < frozen_end, history  # Else the test no longer makes the case it is about.
  assert [os.path.basename(path) for path in tf.train.get_checkpoint_state(
      os.path.join(workdir, "checkpoints")).all_model_checkpoint_paths] == ["ckpt-10", "ckpt-11"]  # The epochs' own.
  assert metrics["phase_choice"] == {"frozen_val_accuracy": frozen_end, "finetune_val_accuracy": finetune_end,
                                     "kept": "frozen"}
  assert abs(metrics["val_accuracy"] - frozen_end) < 1e-6
  # The latest checkpoint (which evaluation and a rerun read) and the export hold the frozen phase's last weights.
  trained = restore.restore(workdir)
  frozen = model_lib.build_classifier(dataclasses.replace(trained.config.model, weights="none"), 3,
                                      trained.config.data.image_size, trained.config.data.seed)
  snapshot = os.path.join(workdir, "checkpoints", "frozen_phase_end", "weights")
  tf.train.Checkpoint(model=frozen).read(snapshot).expect_partial()
  assert len(frozen.weights) == len(trained.model.weights)
  assert all(np.array_equal(a, b) for a, b in zip(frozen.get_weights(), trained.model.get_weights()))
  batch = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  served = tf.saved_model.load(metrics["export_path"]).signatures["serving_image_tensor"](images=tf.constant(batch))
  expected = frozen(batch.astype(np.float32), training=False).numpy()
  assert np.max(np.abs(served["probabilities"].numpy() - expected)) <= 1e-4


def _run_with(history: list[dict], keep: bool):
  return types.SimpleNamespace(history=history, config=tiny_run("none", keep_better_phase=keep))


def test_the_fine_tuned_weights_stay_when_they_validate_as_well_or_when_the_flag_is_off():
  history = [{"phase": "frozen", "val_accuracy": 0.9}, {"phase": "finetune", "val_accuracy": 0.9}]
  metrics = {"accuracy": 0.9}
  assert phase_choice.keep_better_phase(_run_with(history, True), metrics, None) == (
      metrics, {"frozen_val_accuracy": 0.9, "finetune_val_accuracy": 0.9, "kept": "finetune"})
  worse = [history[0], {"phase": "finetune", "val_accuracy": 0.5}]
  assert phase_choice.keep_better_phase(_run_with(worse, False), metrics, None) == (metrics, None)
