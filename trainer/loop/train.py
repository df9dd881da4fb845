"""The training loop: the run's phases (frozen then fine-tune, or one from scratch), checkpointed every epoch.
`train_and_evaluate` reads in three parts, as Flax's train.py does: `setup` (from the runtime the command built: this
worker's data, the model, the checkpoint restored, the run's identity checked), `train_epochs` (the loop) and the end of
the run (trainer.loop.finish: report and export). The compiled steps are trainer.loop.steps; the frozen phase's cached
features trainer.loop.frozen_features.

One loop for every tf.distribute strategy (Keras 3 `model.fit` fails under MultiWorkerMirroredStrategy,
keras-team/keras#20585). Each worker reads its own share of the data (`data.Shard`) through
`distribute_datasets_from_function`; padding examples of weight 0 keep the workers in step and out of the
numbers.
"""

import dataclasses
import math
import os
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from trainer.config import Config
from trainer.input import data
from trainer.loop import checkpoints, example_log, finish, frozen_features, phase_choice
from trainer.loop import steps as steps_lib
from trainer.modeling import augment
from trainer.modeling import model as model_lib
from trainer.reporting import report_files, summaries
from trainer.runtime import distribute
from trainer.runtime import runtime as runtime_lib
from trainer.runtime import workdir as workdir_lib


def phase_of_epoch(epoch: int, config: Config) -> str:
  """Phase of the 0-based epoch index (see model_lib.phases)."""
  return model_lib.phase_of_epoch(epoch, config)


@dataclasses.dataclass
class Run:
  """Everything `setup` builds for the loop and the finish of one run in one process."""
  runtime: runtime_lib.Runtime
  workdir: str
  inputs: data.InputData
  run_dir: workdir_lib.RunDir
  trainer: steps_lib.Trainer
  manager: tf.train.CheckpointManager
  own_manager: tf.train.CheckpointManager
  history: list
  tensorboard: summaries.TensorBoardLog

  # The runtime's parts, by the names the loop uses.
  config = property(lambda self: self.runtime.config)
  strategy = property(lambda self: self.runtime.strategy)
  plan = property(lambda self: self.runtime.plan)
  shard = property(lambda self: self.runtime.shard)
  chief = property(lambda self: self.runtime.chief)
  policy = property(lambda self: self.runtime.policy)
  examples_per_step = property(lambda self: self.runtime.examples_per_step)

  @property
  def total_epochs(self) -> int:
    return sum(epochs for _, epochs in model_lib.phases(self.config))


def train_and_evaluate(config: Config | runtime_lib.Runtime, workdir: str, inputs: data.InputData | None = None,
                       exporter: finish.Exporter | None = None) -> dict:
  """Trains every phase (resuming from the workdir's last checkpoint), reports, exports with `exporter` (the
  command's end-of-run action, export.end_of_run.SavedModelExport; None exports nothing), and returns the metrics.

  config: the runtime the command built (trainer.runtime.runtime.build), or a config to build it from here. inputs: this
  worker's data as `load_inputs` gave it to the caller (a --tune search), so that the files are decoded once."""
  # A lost peer ends a multi-worker run in one line and a code schedulers retry (distribute.exit_on_peer_loss).
  with distribute.exit_on_peer_loss():
    run = setup(config, workdir, inputs)
    finished = finish.finished_export(run, exporter)
    if finished:
      return finished
    # A run resumed after its last epoch has not validated in this process; the report needs the final model's.
    val_metrics = train_epochs(run) or validate(run)
    val_metrics, choice = phase_choice.keep_better_phase(run, val_metrics, validate)
    return finish.finalize(run, val_metrics, exporter, choice)


def load_inputs(runtime: runtime_lib.Runtime, workdir: str) -> data.InputData:
  """This worker's share of the data, padded so that every step of every worker is whole: no replica waits for,
  or lacks, a batch."""
  # A resumed run keeps the epoch order it started with, wherever its decoded images live now.
  run_dir = workdir_lib.RunDir(workdir)
  order = run_dir.load_run_facts().get("epoch_order", "") if run_dir.has_checkpoints() else ""
  data_config = runtime.config.data
  return data.load(data_config, data_config.image_size, os.path.join(workdir, "cache"), runtime.shard,
                   runtime.pad_multiple, order)


def setup(runtime: runtime_lib.Runtime | Config, workdir: str, inputs: data.InputData | None = None) -> Run:
  """This worker's data, the model, and the run's checkpoint restored. runtime: the one the command built, or a
  config to build it from here (trainer.runtime.runtime.build: the strategy, precision, batch plan, share, chief)."""
  if not isinstance(runtime, runtime_lib.Runtime):
    runtime = runtime_lib.build(runtime, workdir)
  config, strategy, plan, shard, chief = runtime.config, runtime.strategy, runtime.plan, runtime.shard, runtime.chief
  run_dir = workdir_lib.RunDir(workdir)
  # Before any file is read or anything is built: checkpoints of another model would fail to restore.
  run_dir.check_config(config)
  # tf.data's seeded shuffles derive their permutation from the global seed too: set here, a run's epochs are the
  # same whatever ran before it in the process (a model built from scratch, say, sets the global seed).
  keras.utils.set_random_seed(config.data.seed)
  if config.data.deterministic:
    tf.config.experimental.enable_op_determinism()
  inputs = inputs or load_inputs(runtime, workdir)
  class_weights = data.class_weights(config.train.class_weight, inputs.train.all_labels, len(inputs.classes))
  run_dir.check_run_facts(inputs.classes, runtime.policy)
  data_changes = run_dir.check_data(workdir_lib.RunDir(runtime.write_dir), inputs.manifest,
                                    inputs.data_identity, config.data.accept_changed_data)
  logging.info("Classes %s; %d training and %d validation images%s.", list(inputs.classes),
               len(inputs.train.all_labels), len(inputs.val.all_labels),
               f" (this worker: {len(inputs.train)} and {len(inputs.val)})" if shard.count > 1 else "")
  model_lib.announce_plan(config, plan.per_replica_batch_size)

  trainer = steps_lib.Trainer(config, len(inputs.classes), strategy, plan.lr_scale, class_weights,
                    _steps_of(inputs.train, runtime.examples_per_step))
  manager = checkpoints.restore_latest(trainer.checkpoint, run_dir.checkpoints, max_to_keep=2, repair=chief)
  own_manager = manager
  if not chief:  # Two workers writing one checkpoint file collide: a non-chief saves to its own folder.
    own_checkpoints = workdir_lib.RunDir(runtime.write_dir).checkpoints
    own_manager = tf.train.CheckpointManager(trainer.checkpoint, own_checkpoints, max_to_keep=1)
  if manager.latest_checkpoint:
    logging.info("Resumed from %s: %d epoch(s) done%s.", manager.latest_checkpoint, int(trainer.epoch),
                 f", and {int(trainer.epoch_step)} step(s) of epoch {int(trainer.epoch) + 1}"
                 if int(trainer.epoch_step) else "")
  run_dir.check_phase_change(config, int(trainer.epoch) + (int(trainer.epoch_step) > 0))
  if chief:
    run_dir.save_config(config, {
        "classes": list(inputs.classes), "train_examples": len(inputs.train.all_labels),
        "val_examples": len(inputs.val.all_labels), "class_weights": class_weights,
        "skipped_files": len(inputs.skipped), "strategy": type(strategy).__name__, "dtype_policy": runtime.policy,
        "workers": shard.count, "cache": {"train": dataclasses.asdict(inputs.train.cache),
                                          "val": dataclasses.asdict(inputs.val.cache)},
        **dataclasses.asdict(plan), "frozen_lr": config.train.frozen_lr * plan.lr_scale,
        "finetune_lr": config.train.finetune_lr * plan.lr_scale, "phases": dict(model_lib.phases(config)),
        "data_identity": inputs.data_identity, "data_changes": data_changes, "epoch_order": inputs.train.order})
  else:
    run_dir.check_config(config)
  history = run_dir.load_history()[:int(trainer.epoch)]
  example_log.log_share(config.runtime.example_log, shard.index, decoded=inputs.train.padded_length,
                        examples=len(inputs.train), of=len(inputs.train.all_labels))
  tensorboard = summaries.TensorBoardLog(run_dir.tensorboard if chief else None, inputs.classes,
                                         next_epoch=int(trainer.epoch) + 1)
  return Run(runtime, workdir, inputs, run_dir, trainer, manager, own_manager, history, tensorboard)


def train_epochs(run: Run) -> dict | None:
  """The epochs left to train; returns the last validation's metrics (None when no epoch ran here)."""
  with distribute.CtrlCAsSigterm() as stops:
    return _train_epochs(run, stops)


def _train_epochs(run: Run, stops: distribute.CtrlCAsSigterm) -> dict | None:
  config, trainer = run.config, run.trainer
  preemption = distribute.preemption_handler(run.strategy, run.manager,
                                             save_fn=lambda: checkpoints.save(run.own_manager),
                                             exit_fn=lambda: distribute.exit_after_checkpoint(
                                                 int(trainer.epoch), int(trainer.epoch_step), stops.ctrl_c))
  progress = config.runtime.verbosity >= 0
  run.tensorboard.log_run(config, {"precision": run.policy, "num_replicas": run.strategy.num_replicas_in_sync,
                                   "classes": list(run.inputs.classes), "run_name": os.path.basename(
                                       os.path.normpath(run.workdir))})
  if int(trainer.epoch) == 0 and int(trainer.epoch_step) == 0:
    run.tensorboard.log_training_images(*augment.first_batch(config, run.inputs.train.images,
                                                             report_files.GRID_IMAGES))
  val_metrics = feature_cache = None
  if config.train.drop_suspects:
    feature_cache = frozen_features.of_run(run)  # The suspects are known before any epoch trains without them.
  else:
    frozen_features.say_if_not_audited(config)
  dropped = feature_cache.dropped if feature_cache else frozenset()
  for epoch in range(int(trainer.epoch), run.total_epochs):
    phase = phase_of_epoch(epoch, config)
    if phase != trainer.phase:
      trainer.set_phase(phase)
    if epoch == 0 or phase_of_epoch(epoch - 1, config) != phase:
      run.tensorboard.log_phase_start(epoch + 1, phase, config)
    if progress:
      print(f"Epoch {epoch + 1}/{run.total_epochs} ({phase} phase)", flush=True)
    start = time.perf_counter()
    on_features = config.train.cache_features and phase == model_lib.FROZEN
    if on_features and feature_cache is None:
      feature_cache = frozen_features.of_run(run)  # Computed once in this process (its time counts in this epoch).
    if (trainer.network is not trainer.model) != on_features:
      trainer.train_on_features(feature_cache.head if on_features else None)
    phase_choice.save_frozen_phase_end(run, epoch)
    done_steps = int(trainer.epoch_step)
    learning_rate = trainer.epoch_start_rate(phase)
    train_metrics = trainer.run_epoch(_train_batches(run, epoch, feature_cache if on_features else None, done_steps,
                                                     dropped),
                                      training=True, steps=_steps(run, run.inputs.train) - done_steps,
                                      progress=progress, preemption=preemption)
    val_metrics = trainer.run_epoch(_val_batches(run, feature_cache if on_features else None), training=False,
                                    steps=_steps(run, run.inputs.val), progress=False)
    example_log.log_epoch(config.runtime.example_log, run.shard.index, epoch + 1, train_metrics["ids"])
    record = {"epoch": epoch + 1, "phase": phase,
              "loss": train_metrics["loss"], "accuracy": train_metrics["accuracy"],
              "val_loss": val_metrics["loss"], "val_accuracy": val_metrics["accuracy"],
              # With the seconds of the epoch's steps done before a resume.
              "seconds": time.perf_counter() - start + train_metrics["earlier_seconds"],
              "train_seconds": train_metrics["seconds"],
              "images_per_sec": train_metrics["examples"] / max(train_metrics["seconds"], 1e-9),
              "compile_seconds": train_metrics["compile_seconds"],
              "steady_images_per_sec": train_metrics["steady_images_per_sec"],
              "learning_rate": learning_rate}
    run.history.append(record)
    run.tensorboard.log_epoch(run.history, val_metrics["confusion_matrix"])
    if run.chief:
      # History first: a run killed between the two files drops the record past the checkpoint on resume.
      run.run_dir.save_history(run.history)
    trainer.epoch.assign(epoch + 1)
    trainer.epoch_step.assign(0)
    trainer.epoch_sums.assign(tf.zeros([4], tf.float64))
    checkpoints.save(run.own_manager)
    logging.info("epoch %d/%d %s: loss %.4f accuracy %.4f val_loss %.4f val_accuracy %.4f (%.1fs, %.1f img/s)",
                 epoch + 1, run.total_epochs, phase, record["loss"], record["accuracy"], record["val_loss"],
                 record["val_accuracy"], record["seconds"], record["images_per_sec"])
  if distribute.end_preemption_handling(preemption):  # SIGTERM or Ctrl-C after the last step.
    distribute.exit_after_checkpoint(int(trainer.epoch), 0, stops.ctrl_c)
  return val_metrics


def validate(run: Run) -> dict:
  """The whole classifier on this worker's validation share (every worker takes part)."""
  run.trainer.train_on_features(None)
  return run.trainer.run_epoch(_val_batches(run, None), training=False, steps=_steps(run, run.inputs.val),
                               progress=False)


def _steps(run: Run, examples: data.Examples) -> int:
  return _steps_of(examples, run.examples_per_step)


def _steps_of(examples: data.Examples, examples_per_step: int) -> int:
  """Steps of an epoch over this worker's padded share."""
  return math.ceil(examples.padded_length / examples_per_step)


def _distributed(run: Run, dataset_of_share) -> tf.distribute.DistributedDataset:
  """Batches of this worker's share at the per-replica size, each worker reading only its own share."""
  def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
    if (context.input_pipeline_id, context.num_input_pipelines) != (run.shard.index, run.shard.count):
      raise RuntimeError(f"input pipeline {context.input_pipeline_id}/{context.num_input_pipelines} is not this "
                         f"worker's share {run.shard}")
    return dataset_of_share().batch(run.plan.per_replica_batch_size).prefetch(tf.data.AUTOTUNE)
  return run.strategy.distribute_datasets_from_function(dataset_fn)


def _train_batches(run: Run, epoch: int, feature_cache, done_steps: int, dropped: frozenset[int] = frozenset()):
  """Epoch `epoch`'s batches, shuffled with seed + epoch, so a run stopped mid-epoch replays them and skips the
  steps it had done. `dropped`: ids of training examples that weigh 0 (--drop_suspects)."""
  seed = run.config.data.seed + epoch
  if feature_cache is None:
    def share():
      return _without(run.inputs.train.epoch(seed), dropped, len(run.inputs.train.all_labels)).skip(
          done_steps * run.examples_per_step)
  else:
    def share():
      return feature_cache.train_share(epoch, seed).skip(done_steps * run.examples_per_step)
  return _distributed(run, share)


def _without(examples: tf.data.Dataset, dropped: frozenset[int], count: int) -> tf.data.Dataset:
  """(image, label, weight, id) elements, those of the `dropped` ids (of `count` in the split) with weight 0: they
  keep their place, so every worker still runs the same steps, and count in no loss or metric."""
  if not dropped:
    return examples
  is_dropped = tf.constant(np.isin(np.arange(count), sorted(dropped)))

  @tf.autograph.experimental.do_not_convert  # Plain TensorFlow ops: nothing for AutoGraph to rewrite.
  def weigh(image, label, weight, index):
    # A stand-in's id is -1 - id and its weight already 0.
    return image, label, tf.where(tf.gather(is_dropped, tf.maximum(index, 0)), 0.0, weight), index
  return examples.map(weigh)


def _val_batches(run: Run, feature_cache):
  return _distributed(run, (lambda: run.inputs.val.epoch(None)) if feature_cache is None
                      else feature_cache.val_share)
