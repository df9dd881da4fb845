"""The training loop: a frozen phase, then a fine-tune phase, checkpointed every epoch, then the export.

One loop for every tf.distribute strategy (Keras 3 `model.fit` fails under MultiWorkerMirroredStrategy,
keras-team/keras#20585). Augmentation runs inside the train step, on the replica's device.
"""

import dataclasses
import math
import os
import sys
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from export import saved_model
from trainer import augment, backbones, data, distribute, features, reporting, workdir as workdir_lib
from trainer import model as model_lib
from trainer.config import Config


def resolve(config: Config) -> Config:
  """Fills the settings whose default depends on the backbone."""
  spec = backbones.get(config.model.backbone)
  return config.replace(image_size=config.data.image_size or spec.default_image_size,
                        unfreeze_from=config.model.unfreeze_from or spec.default_unfreeze_from)


def phase_of_epoch(epoch: int, config: Config) -> str:
  """Phase of the 0-based epoch index; epochs are numbered continuously across both phases."""
  return model_lib.FROZEN if epoch < config.train.frozen_epochs else model_lib.FINETUNE


class Trainer:
  """Owns the model, its optimizers and the compiled steps of one run under one strategy."""

  def __init__(self, config: Config, num_classes: int, strategy: tf.distribute.Strategy, lr_scale: float = 1.0,
               class_weights: list[float] | None = None):
    """`lr_scale` multiplies both learning rates (see distribute.plan_batches); float16 gets loss scaling.
    `class_weights` weighs each example's loss by its class (--class_weight)."""
    self.config = config
    self.strategy = strategy
    with strategy.scope():
      self.model = model_lib.build_classifier(config.model, num_classes, config.data.image_size, config.data.seed)
      self.augmenter = augment.build(config.train, config.data.seed)
      self.optimizers = {model_lib.FROZEN: keras.optimizers.Adam(config.train.frozen_lr * lr_scale),
                         model_lib.FINETUNE: keras.optimizers.Adam(config.train.finetune_lr * lr_scale)}
      if distribute.needs_loss_scaling(keras.config.dtype_policy().name):
        self.optimizers = {phase: keras.optimizers.LossScaleOptimizer(optimizer)
                           for phase, optimizer in self.optimizers.items()}
      # Both optimizers are built before any restore so that their slots load from the checkpoint.
      for phase in (model_lib.FINETUNE, model_lib.FROZEN):
        self.set_phase(phase)
        self.optimizers[phase].build(self.model.trainable_variables)
    self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="completed_epochs")
    # Train steps done in the epoch after `epoch`: non-zero only in a checkpoint saved on SIGTERM mid-epoch.
    self.epoch_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch_steps")
    self.checkpoint = tf.train.Checkpoint(model=self.model, epoch=self.epoch, epoch_step=self.epoch_step,
                                          **self.optimizers)
    self.class_weights = None if class_weights is None else tf.constant(class_weights, tf.float32)
    self.train_on_features(None)

  def train_on_features(self, head: keras.Model | None) -> None:
    """Makes the steps call `head` on cached features (frozen phase, --cache_features) or, for None, the whole
    classifier on images. The head's layers are the classifier's, so what it learns is the classifier's."""
    self.network = self.model if head is None else head
    self._train_step = None
    self._eval_step = self._make_eval_step()

  def set_phase(self, phase: str) -> None:
    model_lib.set_phase(self.model, phase, self.config.model.unfreeze_from)
    self.phase = phase
    self._train_step = None

  def _make_train_step(self):
    model, optimizer = self.network, self.optimizers[self.phase]
    # Cached features were augmented (or not) when they were computed.
    augmenter = self.augmenter if model is self.model else None
    class_weights, variables = self.class_weights, model.trainable_variables

    def replica_step(images, labels):
      with tf.GradientTape() as tape:
        probabilities = _predict(model, images, training=True, augmenter=augmenter)
        per_example = keras.losses.sparse_categorical_crossentropy(labels, probabilities)
        weights = None if class_weights is None else tf.gather(class_weights, labels)
        loss = tf.nn.compute_average_loss(per_example, sample_weight=weights,
                                          global_batch_size=_global_batch_size(labels))
        # Identity unless the optimizer is a LossScaleOptimizer (float16), which unscales in apply_gradients.
        scaled_loss = optimizer.scale_loss(loss)
      gradients = tape.gradient(scaled_loss, variables)
      optimizer.apply_gradients(zip(gradients, variables))
      return _sums(per_example, probabilities, labels)

    @tf.function(reduce_retracing=True)
    def train_step(images, labels):
      return self._reduce(self.strategy.run(replica_step, args=(images, labels)))
    return train_step

  def _make_eval_step(self):
    model = self.network

    def replica_step(images, labels):
      probabilities = _predict(model, images, training=False)
      # Confusion counts add up over replicas and batches like the sums, so they reduce the same way.
      confusion = tf.math.confusion_matrix(labels, tf.argmax(probabilities, axis=-1),
                                           num_classes=probabilities.shape[-1], dtype=tf.float32)
      sums = _sums(keras.losses.sparse_categorical_crossentropy(labels, probabilities), probabilities, labels)
      return (*sums, confusion)

    @tf.function(reduce_retracing=True)
    def eval_step(images, labels):
      return self._reduce(self.strategy.run(replica_step, args=(images, labels)))
    return eval_step

  def _reduce(self, per_replica):
    return [self.strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None) for value in per_replica]

  def run_epoch(self, batches: tf.data.Dataset, training: bool, steps: int, progress: bool,
                preemption: tf.distribute.experimental.PreemptionCheckpointHandler | None = None) -> dict:
    """Sums of one pass over `batches`; a training pass under `preemption` may save and exit between steps."""
    if training and self._train_step is None:
      self._train_step = self._make_train_step()
    step = self._train_step if training else self._eval_step
    bar = keras.utils.Progbar(steps, verbose=1 if progress else 0,
                              stateful_metrics=["loss", "accuracy"], unit_name="step")
    totals, confusion = np.zeros(3), 0
    for index, (images, labels) in enumerate(self.strategy.experimental_distribute_dataset(batches)):
      if training and preemption is not None:
        loss, correct, count, *eval_only = preemption.run(step, images, labels)
      else:
        loss, correct, count, *eval_only = step(images, labels)
      if training:
        self.epoch_step.assign_add(1)
      totals += [float(loss), float(correct), float(count)]
      if eval_only:
        confusion = confusion + eval_only[0].numpy()
      bar.update(index + 1, [("loss", totals[0] / totals[2]), ("accuracy", totals[1] / totals[2])])
    metrics = {"loss": totals[0] / totals[2], "accuracy": totals[1] / totals[2], "examples": int(totals[2])}
    if not training:
      metrics["confusion_matrix"] = np.asarray(confusion, np.int64)
    return metrics


def _predict(model: keras.Model, images, training: bool, augmenter: keras.Layer | None = None):
  """Probabilities of a replica's share of a batch, which is empty when a short last batch has fewer examples
  than there are replicas: Keras' MobileNet fails on an empty batch on CPU ("Incompatible shapes: [0,32,32,3] vs.
  [8]" in its first BatchNorm), so an empty share skips the model and contributes zero gradients."""
  def predict():
    inputs = images if augmenter is None else augmenter(images, training=True)
    return tf.cast(model(inputs, training=training), tf.float32)
  return tf.cond(tf.shape(images)[0] > 0, predict, lambda: tf.zeros([0, model.output_shape[-1]], tf.float32))


def _global_batch_size(labels):
  """Examples of this step over all replicas: an epoch's last batch is partial and splits unevenly, and the mean
  must still be over the whole batch for every strategy to compute the same step."""
  return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, tf.shape(labels)[0])


def _sums(per_example_loss, probabilities, labels):
  correct = tf.equal(tf.argmax(probabilities, axis=-1, output_type=tf.int32), tf.cast(labels, tf.int32))
  return (tf.reduce_sum(tf.cast(per_example_loss, tf.float32)), tf.reduce_sum(tf.cast(correct, tf.float32)),
          tf.cast(tf.size(labels), tf.float32))


def train_and_evaluate(config: Config, workdir: str) -> dict:
  """Trains both phases (resuming from the workdir's last checkpoint), exports, and returns the metrics."""
  config = resolve(config)
  strategy = distribute.create_strategy(config.runtime)
  policy = distribute.resolve_precision(config.runtime, strategy)
  distribute.set_precision(policy)
  plan = distribute.plan_batches(config.data.batch_size, strategy.num_replicas_in_sync,
                                 config.train.lr_base_batch_size)
  # A worker's own file cache: two workers writing one cache file collide.
  inputs = data.load(config.data, config.data.image_size,
                     os.path.join(distribute.write_dir(workdir, strategy), "cache"))
  class_weights = data.class_weights(config.train.class_weight, inputs.train.labels, len(inputs.classes))
  run = workdir_lib.RunDir(workdir)
  chief = distribute.is_chief(strategy)
  if chief:
    run.save_config(config, {
        "classes": list(inputs.classes), "train_examples": len(inputs.train), "val_examples": len(inputs.val),
        "class_weights": class_weights, "skipped_files": len(inputs.skipped),
        "strategy": type(strategy).__name__, "dtype_policy": policy, **dataclasses.asdict(plan),
        "frozen_lr": config.train.frozen_lr * plan.lr_scale, "finetune_lr": config.train.finetune_lr * plan.lr_scale})
  else:
    run.check_config(config)
  logging.info("Classes %s; %d training and %d validation images.", list(inputs.classes), len(inputs.train),
               len(inputs.val))

  trainer = Trainer(config, len(inputs.classes), strategy, plan.lr_scale, class_weights)
  manager, own_manager = _restore_checkpoint(trainer, run, workdir, strategy)
  history = run.load_history()[:int(trainer.epoch)]
  preemption = distribute.preemption_handler(strategy, manager, save_fn=own_manager.save,
                                             exit_fn=lambda: _exit_preempted(trainer))

  train_images, val_images = inputs.train.images, inputs.val.images
  batch_size = config.data.batch_size
  train_steps, val_steps = math.ceil(len(inputs.train) / batch_size), math.ceil(len(inputs.val) / batch_size)
  val_batches = data.batches(val_images, batch_size)
  progress = config.runtime.verbosity >= 0
  total_epochs = config.train.frozen_epochs + config.train.finetune_epochs
  tensorboard = reporting.TensorBoardLog(run.tensorboard if chief else None, inputs.classes)
  tensorboard.log_run(config, {"precision": keras.mixed_precision.dtype_policy().name,
                               "num_replicas": strategy.num_replicas_in_sync, "classes": list(inputs.classes)})
  if int(trainer.epoch) == 0:
    tensorboard.log_training_images(*_first_augmented_batch(config, train_images))

  val_metrics = feature_cache = None
  for epoch in range(int(trainer.epoch), total_epochs):
    phase = phase_of_epoch(epoch, config)
    if phase != trainer.phase:
      trainer.set_phase(phase)
    if epoch in (0, config.train.frozen_epochs):
      tensorboard.log_phase_start(epoch + 1, phase, config)
    if progress:
      print(f"Epoch {epoch + 1}/{total_epochs} ({phase} phase)", flush=True)
    start = time.perf_counter()
    on_features = config.train.cache_features and phase == model_lib.FROZEN
    if on_features and feature_cache is None:
      # Computed in this process's first frozen epoch (its time counts there), then reused.
      feature_cache = features.FeatureCache(trainer.model, train_images, val_images, batch_size,
                                            augment.build(config.train, config.data.seed),
                                            config.train.feature_views)
    if (trainer.network is not trainer.model) != on_features:
      trainer.train_on_features(feature_cache.head if on_features else None)
    seeded = dict(shuffle_seed=config.data.seed + epoch, deterministic=config.data.deterministic)
    train_batches = (feature_cache.train_batches(epoch, batch_size, **seeded) if on_features
                     else data.batches(train_images, batch_size, **seeded))
    # The epoch's shuffle is seeded, so a run stopped mid-epoch replays it and skips the steps it had done.
    done_steps = int(trainer.epoch_step)
    train_metrics = trainer.run_epoch(train_batches.skip(done_steps), training=True,
                                      steps=train_steps - done_steps, progress=progress, preemption=preemption)
    train_seconds = time.perf_counter() - start
    val_metrics = trainer.run_epoch(feature_cache.val_batches(batch_size) if on_features else val_batches,
                                    training=False, steps=val_steps, progress=False)
    record = {"epoch": epoch + 1, "phase": phase,
              "loss": train_metrics["loss"], "accuracy": train_metrics["accuracy"],
              "val_loss": val_metrics["loss"], "val_accuracy": val_metrics["accuracy"],
              "seconds": time.perf_counter() - start, "train_seconds": train_seconds,
              "images_per_sec": train_metrics["examples"] / train_seconds,
              "learning_rate": float(tf.convert_to_tensor(trainer.optimizers[phase].learning_rate))}
    history.append(record)
    tensorboard.log_epoch(record, val_metrics["confusion_matrix"])
    if chief:
      # History first: a run killed between the two files drops the record past the checkpoint on resume.
      run.save_history(history)
    trainer.epoch.assign(epoch + 1)
    trainer.epoch_step.assign(0)
    own_manager.save()
    logging.info("epoch %d/%d %s: loss %.4f accuracy %.4f val_loss %.4f val_accuracy %.4f (%.1fs, %.1f img/s)",
                 epoch + 1, total_epochs, phase, record["loss"], record["accuracy"], record["val_loss"],
                 record["val_accuracy"], record["seconds"], record["images_per_sec"])

  distribute.end_preemption_handling(preemption)
  # A run resumed after its last epoch has not validated in this process; the report needs the final model's.
  # Every worker evaluates: the evaluation reduces over all of them.
  trainer.train_on_features(None)
  val_metrics = val_metrics or trainer.run_epoch(val_batches, training=False, steps=val_steps, progress=False)
  export_path = None
  if chief:
    export_path = saved_model.export_saved_model(trainer.model, list(inputs.classes), config, run.export,
                                                 data.sample_files(inputs.val, os.path.join(workdir, "cache",
                                                                   "samples"), saved_model.PARITY_FILES),
                                                 source=manager.latest_checkpoint or "")
    logging.info("Exported the SavedModel to %s", export_path)
  metrics = summarize(history, list(inputs.classes), export_path)
  metrics["skipped_files"] = [{"path": path, "reason": why} for path, why in sorted(inputs.skipped.items())]
  tensorboard.close()
  if chief:
    run.save_metrics(metrics)
    reporting.write_reports(run.report, history, val_metrics["confusion_matrix"], inputs.classes)
  distribute.wait_for_all_workers(strategy)
  distribute.remove_worker_files(workdir, strategy)
  return metrics


def _restore_checkpoint(trainer: Trainer, run: workdir_lib.RunDir, workdir: str, strategy: tf.distribute.Strategy):
  """Restores the run's latest checkpoint, if any. Returns the manager of the run's checkpoints and the one this
  process saves with: the same on the chief; a temporary folder of a non-chief worker's own (removed at the end),
  since two workers writing one checkpoint file collide."""
  manager = tf.train.CheckpointManager(trainer.checkpoint, run.checkpoints, max_to_keep=2)
  own_manager = manager
  if not distribute.is_chief(strategy):
    own_checkpoints = workdir_lib.RunDir(distribute.write_dir(workdir, strategy)).checkpoints
    own_manager = tf.train.CheckpointManager(trainer.checkpoint, own_checkpoints, max_to_keep=1)
  if manager.latest_checkpoint:
    trainer.checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
    logging.info("Resumed from %s after epoch %d, step %d.", manager.latest_checkpoint, int(trainer.epoch),
                 int(trainer.epoch_step))
  return manager, own_manager


def _exit_preempted(trainer: Trainer) -> None:
  """After the checkpoint PreemptionCheckpointHandler saved on SIGTERM: exit with a code schedulers retry."""
  logging.warning("Stopped by SIGTERM: saved a checkpoint at epoch %d, step %d. Run the same command again to "
                  "continue.", int(trainer.epoch) + 1, int(trainer.epoch_step))
  sys.exit(distribute.PREEMPTED_EXIT_CODE)


def _first_augmented_batch(config: Config, train_images: tf.data.Dataset, count: int = 16):
  """The first images of the first epoch through a new augmenter of the run's preset and seed: what the model
  sees, without drawing from the random state of the trainer's own augmenter."""
  images, labels = next(iter(data.batches(train_images, count, shuffle_seed=config.data.seed)))
  augmenter = augment.build(config.train, config.data.seed)
  if augmenter is not None:
    images = augmenter(images, training=True)
  return np.asarray(images), labels.numpy()


def summarize(history: list[dict], classes: list[str], export_path: str | None) -> dict:
  phases = {}
  for phase in (model_lib.FROZEN, model_lib.FINETUNE):
    records = [r for r in history if r["phase"] == phase]
    train_seconds = sum(r["train_seconds"] for r in records)
    examples = sum(r["images_per_sec"] * r["train_seconds"] for r in records)
    phases[phase] = {"epochs": len(records),
                     "val_accuracy": records[-1]["val_accuracy"] if records else None,
                     "seconds": sum(r["seconds"] for r in records),
                     "images_per_sec": examples / train_seconds if train_seconds else None}
  return {"classes": classes, "val_accuracy": history[-1]["val_accuracy"] if history else None,
          "val_loss": history[-1]["val_loss"] if history else None,
          "epochs": len(history), "phases": phases, "export_path": export_path}
