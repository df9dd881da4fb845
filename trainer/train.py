"""The training loop: the run's phases (frozen then fine-tune, or one from scratch), checkpointed every epoch,
then the export. `train_and_evaluate` reads in three parts, as Flax's train.py does: `setup` (strategy, data,
model, restore), `train_epochs` (the loop) and `finalize` (export and report).

One loop for every tf.distribute strategy (Keras 3 `model.fit` fails under MultiWorkerMirroredStrategy,
keras-team/keras#20585). Each worker reads its own share of the data (`data.Shard`) through
`distribute_datasets_from_function`; padding examples of weight 0 keep the workers in step and out of the
numbers. Augmentation runs inside the train step on the replica's device, with seeds derived from
(seed, epoch, step, replica) (`trainer.randomness`), so a resumed run continues the random streams it left.
"""

import dataclasses
import math
import os
import time
import weakref

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from export import saved_model
from trainer import augment, checkpoints, data, distribute, example_log, features, label_audit, randomness
from trainer import report_page, reporting
from trainer import runtime as runtime_lib
from trainer import progress as progress_lib
from trainer import model as model_lib
from trainer import workdir as workdir_lib
from trainer.config import Config
from trainer.errors import UserInputError


def phase_of_epoch(epoch: int, config: Config) -> str:
  """Phase of the 0-based epoch index (see model_lib.phases)."""
  return model_lib.phase_of_epoch(epoch, config)


class Trainer:
  """Owns the model, its optimizers and the compiled steps of one run under one strategy."""

  def __init__(self, config: Config, num_classes: int, strategy: tf.distribute.Strategy, lr_scale: float = 1.0,
               class_weights: list[float] | None = None, steps_per_epoch: int = 1):
    """`lr_scale` multiplies the learning rates (see distribute.plan_batches); float16 gets loss scaling.
    `class_weights` weighs each example's loss by its class (--class_weight). `steps_per_epoch`: train steps of
    an epoch, the unit of --finetune_schedule's decay."""
    self.config = config
    self.strategy = strategy
    self.seeds = randomness.StepSeeds(config.data.seed)
    with strategy.scope():
      self.model = model_lib.build_classifier(config.model, num_classes, config.data.image_size, config.data.seed)
      self.augmenter = augment.build(config.train, config.data.seed)
      self.learning_rates = {phase: model_lib.learning_rate(phase, config.train, lr_scale, epochs * steps_per_epoch)
                             for phase, epochs in model_lib.phases(config)}
      self.optimizers = {phase: keras.optimizers.Adam(rate) for phase, rate in self.learning_rates.items()}
      if distribute.needs_loss_scaling(keras.config.dtype_policy().name):
        self.optimizers = {phase: keras.optimizers.LossScaleOptimizer(optimizer)
                           for phase, optimizer in self.optimizers.items()}
      # Every optimizer is built before any restore so that its slots load from the checkpoint; the first last.
      for phase in reversed(self.optimizers):
        self.set_phase(phase)
        self.optimizers[phase].build(self.model.trainable_variables)
    for owner in (self.model, self.augmenter):
      if owner is not None:
        randomness.install(owner, self.seeds)
    self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="completed_epochs")
    # Train steps done in the epoch after `epoch`, and their sums (loss, correct, examples, seconds): non-zero
    # only in a checkpoint saved on SIGTERM mid-epoch, so that the resumed epoch reports all of its steps.
    self.epoch_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch_steps")
    self.epoch_sums = tf.Variable(tf.zeros([4], tf.float64), trainable=False, name="epoch_sums")
    self.checkpoint = tf.train.Checkpoint(model=self.model, epoch=self.epoch, epoch_step=self.epoch_step,
                                          epoch_sums=self.epoch_sums, **self.optimizers)
    self.class_weights = None if class_weights is None else tf.constant(class_weights, tf.float32)
    # The batch shapes each step function has run (see run_epoch): a new shape compiles, a known one does not.
    self._shapes_run: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    self.train_on_features(None)

  def train_on_features(self, head: keras.Model | None) -> None:
    """Makes the steps call `head` on cached features (frozen phase, --cache_features) or, for None, the whole
    classifier on images. The head's layers are the classifier's, so what it learns is the classifier's."""
    self.network = self.model if head is None else head
    self._train_step = None
    self._eval_step = self._make_eval_step()

  def epoch_start_rate(self, phase: str) -> float:
    """The learning rate of the first step of the epoch under way (a cosine schedule ends the phase at 0): also
    after a resume mid-epoch, whose optimizer has counted the steps done."""
    rate = self.learning_rates[phase]
    if not callable(rate):
      return float(rate)
    # .numpy(): under MultiWorkerMirroredStrategy the step count is a MirroredVariable, which int() refuses.
    return float(rate(int(self.optimizers[phase].iterations.numpy()) - int(self.epoch_step)))

  def set_phase(self, phase: str) -> None:
    model_lib.set_phase(self.model, phase, self.config.model.unfreeze_from,
                        model_lib.batchnorm_mode(self.config.model))
    self.phase = phase
    self._train_step = None

  def _make_train_step(self):
    model, optimizer = self.network, self.optimizers[self.phase]
    # Cached features were augmented (or not) when they were computed.
    augmenter = self.augmenter if model is self.model else None
    class_weights, variables, seed = self.class_weights, model.trainable_variables, self.config.data.seed

    def replica_step(images, labels, weights, ids):
      replica = tf.distribute.get_replica_context().replica_id_in_sync_group
      with tf.GradientTape() as tape, self.seeds.scope(randomness.step_seed(seed, replica, self.epoch,
                                                                            self.epoch_step)):
        inputs = tf.cast(images, tf.float32)
        if augmenter is not None:
          inputs = augmenter(inputs, training=True)
        probabilities = tf.cast(model(inputs, training=True), tf.float32)
        per_example = keras.losses.sparse_categorical_crossentropy(labels, probabilities)
        loss_weights = weights if class_weights is None else weights * tf.gather(class_weights, labels)
        # The mean over the real examples of the whole step, over every replica: padding weighs nothing.
        real = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, tf.reduce_sum(weights))
        loss = tf.reduce_sum(per_example * loss_weights) / tf.maximum(real, 1.0)
        # Identity unless the optimizer is a LossScaleOptimizer (float16), which unscales in apply_gradients and
        # skips a step whose gradients are not finite.
        scaled_loss = optimizer.scale_loss(loss)
      gradients = tape.gradient(scaled_loss, variables)
      optimizer.apply_gradients(zip(gradients, variables))
      return _sums(per_example, probabilities, labels, weights), tf.where(weights > 0, ids, -1)

    @tf.function(reduce_retracing=True)
    def train_step(images, labels, weights, ids):
      sums, seen = self.strategy.run(replica_step, args=(images, labels, weights, ids))
      return self._reduce(sums), seen
    return train_step

  def _make_eval_step(self):
    model = self.network

    def replica_step(images, labels, weights, ids):
      probabilities = tf.cast(model(tf.cast(images, tf.float32), training=False), tf.float32)
      # Confusion counts add up over replicas and batches like the sums, so they reduce the same way.
      confusion = tf.math.confusion_matrix(labels, tf.argmax(probabilities, axis=-1),
                                           num_classes=probabilities.shape[-1], weights=weights, dtype=tf.float32)
      per_example = keras.losses.sparse_categorical_crossentropy(labels, probabilities)
      return (*_sums(per_example, probabilities, labels, weights), confusion), tf.where(weights > 0, ids, -1)

    @tf.function(reduce_retracing=True)
    def eval_step(images, labels, weights, ids):
      sums, seen = self.strategy.run(replica_step, args=(images, labels, weights, ids))
      return self._reduce(sums), seen
    return eval_step

  def _reduce(self, per_replica):
    return [self.strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None) for value in per_replica]

  def run_epoch(self, batches, training: bool, steps: int, progress: bool,
                preemption: tf.distribute.experimental.PreemptionCheckpointHandler | None = None) -> dict:
    """Sums of one pass over the distributed `batches`; a training pass under `preemption` may save and exit
    between steps (with the epoch's sums so far in the checkpoint). Returns loss, accuracy, examples, seconds,
    the ids this worker trained on, and (evaluation) the confusion matrix."""
    if training and self._train_step is None:
      self._train_step = self._make_train_step()
    step = self._train_step if training else self._eval_step
    resumed = training and int(self.epoch_step) > 0
    totals = self.epoch_sums.numpy()[:3].copy() if resumed else np.zeros(3)
    earlier_seconds = float(self.epoch_sums.numpy()[3]) if resumed else 0.0
    bar = progress_lib.bar(steps, progress)
    confusion, seen = 0, []
    # The calls that traced or compiled the step function (its first, and the first of each new batch shape, such
    # as a partial last batch) are timed as compile_seconds. The steady rate leaves out those steps and the epoch's
    # first (whose wait for input starts the pipeline: a shuffle buffer to fill, a cache to read or write), so
    # that it is the rate of the steps that only ran, alike in every epoch.
    shapes_seen, traces = self._shapes_run.setdefault(step, set()), step.experimental_get_tracing_count()
    compile_seconds = unsteady_seconds = unsteady_examples = examples_here = 0.0
    start = last = time.perf_counter()
    for index, batch in enumerate(batches):
      shapes = tuple(tuple(part.shape) for part in tf.nest.flatten(batch, expand_composites=True))
      called = time.perf_counter()
      if training and preemption is not None:
        sums, ids = preemption.run(step, *batch)
      else:
        sums, ids = step(*batch)
      loss, correct, count, *eval_only = sums
      totals += [float(loss), float(correct), float(count)]
      now, examples_here = time.perf_counter(), examples_here + float(count)
      compiled = shapes not in shapes_seen or step.experimental_get_tracing_count() != traces
      if compiled:
        compile_seconds += now - called
        shapes_seen.add(shapes)
        traces = step.experimental_get_tracing_count()
      if compiled or index == 0:
        unsteady_seconds, unsteady_examples = unsteady_seconds + now - last, unsteady_examples + float(count)
      last = now
      seen.extend(int(i) for part in self.strategy.experimental_local_results(ids) for i in part.numpy() if i >= 0)
      if eval_only:
        confusion = confusion + eval_only[0].numpy()
      if training:
        self.epoch_step.assign_add(1)
        self.epoch_sums.assign([*totals, earlier_seconds + time.perf_counter() - start])
      bar.update(index + 1, [("loss", totals[0] / max(totals[2], 1)), ("accuracy", totals[1] / max(totals[2], 1))])
    seconds = time.perf_counter() - start
    steady_seconds, steady_examples = seconds - unsteady_seconds, examples_here - unsteady_examples
    metrics = {"loss": totals[0] / max(totals[2], 1), "accuracy": totals[1] / max(totals[2], 1),
               "examples": int(totals[2]), "seconds": earlier_seconds + seconds, "earlier_seconds": earlier_seconds,
               "ids": seen, "compile_seconds": compile_seconds,
               "steady_images_per_sec": (steady_examples / steady_seconds
                                         if steady_examples > 0 and steady_seconds > 0 else None)}
    if not training:
      metrics["confusion_matrix"] = np.asarray(confusion, np.int64)
    return metrics


def _sums(per_example_loss, probabilities, labels, weights):
  correct = tf.equal(tf.argmax(probabilities, axis=-1, output_type=tf.int32), tf.cast(labels, tf.int32))
  return (tf.reduce_sum(tf.cast(per_example_loss, tf.float32) * weights),
          tf.reduce_sum(tf.cast(correct, tf.float32) * weights), tf.reduce_sum(weights))


@dataclasses.dataclass
class Run:
  """Everything `setup` builds for the loop and the finish of one run in one process."""
  runtime: runtime_lib.Runtime
  workdir: str
  inputs: data.InputData
  run_dir: workdir_lib.RunDir
  trainer: Trainer
  manager: tf.train.CheckpointManager
  own_manager: tf.train.CheckpointManager
  history: list
  tensorboard: reporting.TensorBoardLog

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


def train_and_evaluate(config: Config | runtime_lib.Runtime, workdir: str, inputs: data.InputData | None = None
                       ) -> dict:
  """Trains every phase (resuming from the workdir's last checkpoint), exports, and returns the metrics.

  config: the runtime the command built (trainer.runtime.build), or a config to build it from here. inputs: this
  worker's data as `load_inputs` gave it to the caller (a --tune search), so that the files are decoded once."""
  # A lost peer ends a multi-worker run in one line and a code schedulers retry (distribute.exit_on_peer_loss).
  with distribute.exit_on_peer_loss():
    run = setup(config, workdir, inputs)
    finished = _finished_export(run)
    if finished:
      return finished
    val_metrics = train_epochs(run)
    return finalize(run, val_metrics)


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
  config to build it from here (trainer.runtime.build: the strategy, precision, batch plan, share, chief)."""
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

  trainer = Trainer(config, len(inputs.classes), strategy, plan.lr_scale, class_weights,
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
  tensorboard = reporting.TensorBoardLog(run_dir.tensorboard if chief else None, inputs.classes,
                                         next_epoch=int(trainer.epoch) + 1)
  return Run(runtime, workdir, inputs, run_dir, trainer, manager, own_manager, history, tensorboard)


def _finished_export(run: Run) -> dict | None:
  """A rerun of a finished run whose every artifact exists (the export of the last checkpoint, the metrics naming
  it, the report files and page): nothing is trained or exported. With one missing (a run killed between its
  export and its report) this returns None and `finalize` makes what is missing, reusing the export."""
  if int(run.trainer.epoch) < run.total_epochs or not run.manager.latest_checkpoint:
    return None
  # Every worker of a cluster reads the same files of the shared workdir here, before any collective of this start,
  # so all take the same path: a chief lost after its export is not exported twice when the job restarts.
  exported = _export_of(run.run_dir, run.config, run.manager.latest_checkpoint)
  reports = [run.run_dir.metrics_file, report_page.page_file(run.workdir),
             *(os.path.join(run.run_dir.report, name) for name in reporting.REPORT_FILES)]
  if not exported or not all(os.path.isfile(path) for path in reports):
    return None
  metrics = workdir_lib.read_json(run.run_dir.metrics_file)
  if metrics.get("export_path") != exported:  # Killed before the metrics named it, or the workdir moved.
    metrics["export_path"] = exported
    if run.chief:
      run.run_dir.save_metrics(metrics)
      report_page.write_page(run.workdir)
  logging.warning("The run is complete (%d epochs) and its export of %s is at %s: nothing to do. Raise "
                  "--finetune_epochs to train more, or run python -m export.main --workdir=%s to export again.",
                  run.total_epochs, os.path.basename(run.manager.latest_checkpoint), exported, run.workdir)
  run.tensorboard.close()
  distribute.remove_worker_files(run.workdir, run.strategy)
  return metrics


def _export_of(run_dir: workdir_lib.RunDir, config: Config, checkpoint: str) -> str | None:
  model_dir = os.path.join(run_dir.export, config.export.model_name)
  if not os.path.isdir(model_dir):
    return None
  for version in sorted((v for v in os.listdir(model_dir) if v.isdigit()), key=int, reverse=True):
    metadata = os.path.join(model_dir, version, saved_model.METADATA_FILE)
    # By the checkpoint's name: a workdir spelled another way (a symlink, a relative path, a moved folder) holds
    # the same checkpoints under another path.
    source = workdir_lib.read_json(metadata).get("source") if os.path.isfile(metadata) else None
    if source and os.path.basename(source) == os.path.basename(checkpoint):
      return os.path.join(model_dir, version)
  return None


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
    run.tensorboard.log_training_images(*_first_augmented_batch(config, run.inputs.train.images))
  val_metrics = feature_cache = None
  if config.train.drop_suspects:
    feature_cache = _feature_cache(run)  # The suspects are known before any epoch trains without them.
  else:
    _say_if_not_audited(config)
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
      feature_cache = _feature_cache(run)  # Computed once in this process (its time counts in this epoch).
    if (trainer.network is not trainer.model) != on_features:
      trainer.train_on_features(feature_cache.head if on_features else None)
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


class _SharedFeatures:
  """The frozen phase's cached features of this worker's share, padded and weighted like its images."""

  def __init__(self, cache, train: data.Examples, val: data.Examples, dropped: frozenset[int] = frozenset()):
    """dropped: ids of training examples that weigh 0 (--drop_suspects)."""
    self.head, self.dropped = cache.head, dropped
    self._train = _padded_arrays(cache.train_features, cache.train_labels, cache.train_ids, train, dropped)
    self._val = _padded_arrays(cache.val_features[np.newaxis], cache.val_labels, cache.val_ids, val)

  def train_share(self, epoch: int, seed: int) -> tf.data.Dataset:
    views, labels, weights, ids = self._train
    dataset = tf.data.Dataset.from_tensor_slices((views[epoch % len(views)], labels, weights, ids))
    return dataset.shuffle(max(len(labels), 1), seed=seed, reshuffle_each_iteration=False)

  def val_share(self) -> tf.data.Dataset:
    views, labels, weights, ids = self._val
    return tf.data.Dataset.from_tensor_slices((views[0], labels, weights, ids))


def _padded_arrays(views: np.ndarray, labels: np.ndarray, ids: np.ndarray, examples: data.Examples,
                   dropped: frozenset[int] = frozenset()):
  """[views, N, D] features of the share's real examples (ids [N]: which ones; without a cache, a file found
  undecodable is not among them) -> padded to the share's length with weight 0; the `dropped` ids weigh 0 too."""
  count, length = len(labels), examples.padded_length
  if ids is None and count != len(examples):
    raise RuntimeError(f"{count} cached features without ids for {len(examples)} examples: which is which is unknown.")
  order = np.concatenate([np.arange(count), np.resize(np.arange(count), max(length - count, 0))]).astype(int)
  weights = np.concatenate([np.ones(count, np.float32), np.zeros(max(length - count, 0), np.float32)])
  ids = np.asarray(examples.ids if ids is None else ids, np.int64)
  weights[:count][np.isin(ids, sorted(dropped))] = 0.0
  return views[:, order], np.asarray(labels, np.int32)[order], weights, ids[order]


def _feature_cache(run: Run) -> _SharedFeatures:
  """The frozen backbone's features of this worker's share, read from the run's cache when a run (or its --tune
  search) already extracted them."""
  config = run.config
  key = features.cache_key(config, run.inputs.identity, run.policy)
  cache = features.load_or_extract(run.trainer.model, run.inputs.train.images_with_ids, run.inputs.val.images_with_ids,
                                   config.data.batch_size, augment.build(config.train, config.data.seed),
                                   config.train.feature_views,
                                   features.folder(config.data.cache_dir,
                                                   os.path.join(distribute.write_dir(run.workdir, run.strategy),
                                                                "cache")),
                                   key)
  for examples, ids in ((run.inputs.train, cache.train_ids), (run.inputs.val, cache.val_ids)):
    # Features read from a file: the examples that did not decode when they were extracted are named here too.
    examples.note_undecodable(sorted(set(examples.ids) - set(ids.tolist())))
  return _SharedFeatures(cache, run.inputs.train, run.inputs.val, _audit(run, cache, key))


def _audit(run: Run, cache: features.FeatureCache, key: str) -> frozenset[int]:
  """The label audit of this worker's share (trainer.label_audit; the chief writes report/suspect_labels.csv and
  near_duplicates.csv), once per features; returns the ids --drop_suspects leaves out (none without it)."""
  config = run.config
  names = {split: dict(zip(examples.ids, examples.paths)) if examples.paths is not None else {}
           for split, examples in (("train", run.inputs.train), ("val", run.inputs.val))}
  suspects = label_audit.audit_run(cache, run.inputs.train.images_with_ids, run.inputs.val.images_with_ids, names,
                                   run.inputs.classes, config.data.seed, key,
                                   os.path.join(distribute.write_dir(run.workdir, run.strategy), "report"),
                                   run.chief, run.run_dir.tensorboard, config.data.image_size)
  if not config.train.drop_suspects:
    return frozenset()
  logging.warning("--drop_suspects: %d of %d training images with a suspect label weigh nothing in this run "
                  "(listed in report/suspect_labels.csv).", len(suspects), len(cache.train_labels))
  return suspects


def _say_if_not_audited(config: Config) -> None:
  """The label audit runs on the frozen phase's cached features: a run without them says why it has none."""
  if config.model.weights == "none":
    reason = "--weights=none trains from scratch: there are no frozen features"
  elif not config.train.cache_features:
    reason = "--cache_features=false computes no frozen features"
  elif not config.train.frozen_epochs:
    reason = "--frozen_epochs=0: there is no frozen phase"
  else:
    return
  logging.info("Label audit (suspect labels, near-duplicates) skipped: %s.", reason)


def finalize(run: Run, val_metrics: dict | None) -> dict:
  """Exports on the chief and writes the report; every worker takes part in the last evaluation."""
  trainer = run.trainer
  # A run resumed after its last epoch has not validated in this process; the report needs the final model's.
  trainer.train_on_features(None)
  val_metrics = val_metrics or trainer.run_epoch(_val_batches(run, None), training=False,
                                                 steps=_steps(run, run.inputs.val), progress=False)
  metrics = summarize(run.history, list(run.inputs.classes), None, [phase for phase, _ in model_lib.phases(run.config)])
  metrics["skipped_files"] = [{"path": path, "reason": why} for path, why in sorted(run.inputs.skipped.items())]
  if run.chief:  # Before the writers close: the grid goes to TensorBoard too.
    _report_top_losses(run)
  run.tensorboard.close()
  if run.chief:
    # The report first: a failed export check must not lose it either.
    run.run_dir.save_metrics(metrics)
    reporting.write_reports(run.run_dir.report, run.history, val_metrics["confusion_matrix"], run.inputs.classes)
    report_page.write_page(run.workdir)
    # A finished run rerun to make a missing report keeps its export (exports are never made twice).
    metrics["export_path"] = _export_of(run.run_dir, run.config, run.manager.latest_checkpoint or "")
    if not metrics["export_path"]:
      samples = data.sample_files(run.inputs.val, os.path.join(run.workdir, "cache", "samples"),
                                  saved_model.PARITY_FILES)
      metrics["export_path"] = _export(run, samples)
    run.run_dir.save_metrics(metrics)
    report_page.write_page(run.workdir)  # Again, with the export's link.
  distribute.wait_for_all_workers(run.strategy)
  distribute.remove_worker_files(run.workdir, run.strategy)
  return metrics


def _report_top_losses(run: Run) -> None:
  """The validation images of the chief's share the final model gets most wrong, for the report and TensorBoard:
  one forward pass over them."""
  report_page.report_top_losses(run.trainer.model, run.inputs.val, run.inputs.classes, run.config.data.batch_size,
                                run.run_dir.report, run.tensorboard, int(run.trainer.epoch), run.shard.count)


def _export(run: Run, samples) -> str:
  """The SavedModel of the last checkpoint. A failed export check never loses the training: the checkpoint stays
  and `python -m export.main` retries."""
  try:
    path = saved_model.export_saved_model(run.trainer.model, list(run.inputs.classes), run.config,
                                          run.run_dir.export, samples, source=run.manager.latest_checkpoint or "",
                                          inputs=run.inputs)
  except saved_model.ExportParityError as e:
    raise UserInputError(f"{e} Training is complete and kept in {run.run_dir.checkpoints}; retry the export with "
                         f"python -m export.main --workdir={run.workdir}.") from None
  logging.info("Exported the SavedModel to %s", path)
  return path


def _first_augmented_batch(config: Config, train_images: tf.data.Dataset,
                           count: int = reporting.GRID_IMAGES):
  """The first images of the first epoch through a new augmenter of the run's preset and seed: what the model
  sees, without drawing from the random state of the trainer's own augmenter."""
  images, labels = next(iter(data.batches(train_images, count, shuffle_seed=config.data.seed)))
  augmenter = augment.build(config.train, config.data.seed)
  if augmenter is not None:
    images = augmenter(images, training=True)
  return np.asarray(images), labels.numpy()


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
                     "steady_images_per_sec": reporting.steady_images_per_sec(records),
                     "compile_seconds": sum(r.get("compile_seconds") or 0.0 for r in records)}
  return {"classes": classes, "val_accuracy": history[-1]["val_accuracy"] if history else None,
          "val_loss": history[-1]["val_loss"] if history else None,
          "epochs": len(history), "phases": phases, "export_path": export_path}
