"""The training loop: a frozen phase, then a fine-tune phase, checkpointed every epoch, then the export.

One loop for every tf.distribute strategy (Keras 3 `model.fit` fails under MultiWorkerMirroredStrategy,
keras-team/keras#20585). Augmentation runs inside the train step, on the replica's device.
"""

import json
import math
import os
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from export import saved_model
from trainer import augment, backbones, data, distribute, reporting, workdir as workdir_lib
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

  def __init__(self, config: Config, num_classes: int, strategy: tf.distribute.Strategy):
    self.config = config
    self.strategy = strategy
    with strategy.scope():
      self.model = model_lib.build_classifier(config.model, num_classes, config.data.image_size, config.data.seed)
      self.augmenter = augment.build(config.train.augment, config.data.seed)
      self.optimizers = {model_lib.FROZEN: keras.optimizers.Adam(config.train.frozen_lr),
                         model_lib.FINETUNE: keras.optimizers.Adam(config.train.finetune_lr)}
      # Both optimizers are built before any restore so that their slots load from the checkpoint.
      for phase in (model_lib.FINETUNE, model_lib.FROZEN):
        self.set_phase(phase)
        self.optimizers[phase].build(self.model.trainable_variables)
    self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="completed_epochs")
    self.checkpoint = tf.train.Checkpoint(model=self.model, epoch=self.epoch, **self.optimizers)
    self._train_step = None

  def set_phase(self, phase: str) -> None:
    model_lib.set_phase(self.model, phase, self.config.model.unfreeze_from)
    self.phase = phase
    self._train_step = None

  def _make_train_step(self):
    model, augmenter, optimizer = self.model, self.augmenter, self.optimizers[self.phase]
    variables = model.trainable_variables

    def replica_step(images, labels):
      if augmenter is not None:
        images = augmenter(images, training=True)
      with tf.GradientTape() as tape:
        probabilities = model(images, training=True)
        per_example = keras.losses.sparse_categorical_crossentropy(labels, probabilities)
        loss = tf.nn.compute_average_loss(per_example)
      gradients = tape.gradient(loss, variables)
      optimizer.apply_gradients(zip(gradients, variables))
      return _sums(per_example, probabilities, labels)

    @tf.function(reduce_retracing=True)
    def train_step(images, labels):
      return self._reduce(self.strategy.run(replica_step, args=(images, labels)))
    return train_step

  @tf.function(reduce_retracing=True)
  def _eval_step(self, images, labels):
    def replica_step(images, labels):
      probabilities = self.model(images, training=False)
      # Confusion counts add up over replicas and batches like the sums, so they reduce the same way.
      confusion = tf.math.confusion_matrix(labels, tf.argmax(probabilities, axis=-1),
                                           num_classes=probabilities.shape[-1], dtype=tf.float32)
      sums = _sums(keras.losses.sparse_categorical_crossentropy(labels, probabilities), probabilities, labels)
      return (*sums, confusion)
    return self._reduce(self.strategy.run(replica_step, args=(images, labels)))

  def _reduce(self, per_replica):
    return [self.strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None) for value in per_replica]

  def run_epoch(self, batches: tf.data.Dataset, training: bool, steps: int, progress: bool) -> dict:
    if training and self._train_step is None:
      self._train_step = self._make_train_step()
    step = self._train_step if training else self._eval_step
    bar = keras.utils.Progbar(steps, verbose=1 if progress else 0,
                              stateful_metrics=["loss", "accuracy"], unit_name="step")
    totals, confusion = np.zeros(3), 0
    for index, (images, labels) in enumerate(self.strategy.experimental_distribute_dataset(batches)):
      loss, correct, count, *eval_only = step(images, labels)
      totals += [float(loss), float(correct), float(count)]
      if eval_only:
        confusion = confusion + eval_only[0].numpy()
      bar.update(index + 1, [("loss", totals[0] / totals[2]), ("accuracy", totals[1] / totals[2])])
    metrics = {"loss": totals[0] / totals[2], "accuracy": totals[1] / totals[2], "examples": int(totals[2])}
    if not training:
      metrics["confusion_matrix"] = np.asarray(confusion, np.int64)
    return metrics


def _sums(per_example_loss, probabilities, labels):
  correct = tf.equal(tf.argmax(probabilities, axis=-1, output_type=tf.int32), tf.cast(labels, tf.int32))
  return (tf.reduce_sum(tf.cast(per_example_loss, tf.float32)), tf.reduce_sum(tf.cast(correct, tf.float32)),
          tf.cast(tf.size(labels), tf.float32))


def train_and_evaluate(config: Config, workdir: str) -> dict:
  """Trains both phases (resuming from the workdir's last checkpoint), exports, and returns the metrics."""
  config = resolve(config)
  strategy = distribute.create_strategy(config.runtime)
  distribute.set_precision(distribute.resolve_precision(config.runtime, strategy))
  files = data.discover(config.data)
  run = workdir_lib.RunDir(workdir)
  run.save_config(config, {"classes": list(files.classes), "num_replicas": strategy.num_replicas_in_sync,
                           "train_examples": len(files.train), "val_examples": len(files.val)})
  logging.info("Classes %s; %d training and %d validation images.", list(files.classes), len(files.train),
               len(files.val))

  trainer = Trainer(config, len(files.classes), strategy)
  manager = tf.train.CheckpointManager(trainer.checkpoint, run.checkpoints, max_to_keep=2)
  if manager.latest_checkpoint:
    trainer.checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
    logging.info("Resumed from %s after epoch %d.", manager.latest_checkpoint, int(trainer.epoch))
  history = run.load_history()[:int(trainer.epoch)]

  cache_dir = config.data.cache_dir
  train_images = data.decoded_images(files.train, config.data.image_size, cache_dir and os.path.join(cache_dir, "train"))
  val_images = data.decoded_images(files.val, config.data.image_size, cache_dir and os.path.join(cache_dir, "val"))
  batch_size = config.data.batch_size
  train_steps, val_steps = math.ceil(len(files.train) / batch_size), math.ceil(len(files.val) / batch_size)
  val_batches = data.batches(val_images, batch_size)
  progress = config.runtime.verbosity >= 0
  total_epochs = config.train.frozen_epochs + config.train.finetune_epochs
  chief = distribute.is_chief(strategy)
  tensorboard = reporting.TensorBoardLog(run.tensorboard if chief else None, files.classes)
  tensorboard.log_run(config, {"precision": keras.mixed_precision.dtype_policy().name,
                               "num_replicas": strategy.num_replicas_in_sync, "classes": list(files.classes)})
  if int(trainer.epoch) == 0:
    tensorboard.log_training_images(*_first_augmented_batch(config, train_images))

  val_metrics = None
  for epoch in range(int(trainer.epoch), total_epochs):
    phase = phase_of_epoch(epoch, config)
    if phase != getattr(trainer, "phase", None) or trainer._train_step is None:
      trainer.set_phase(phase)
    if epoch in (0, config.train.frozen_epochs):
      tensorboard.log_phase_start(epoch + 1, phase, config)
    if progress:
      print(f"Epoch {epoch + 1}/{total_epochs} ({phase} phase)", flush=True)
    start = time.perf_counter()
    train_batches = data.batches(train_images, batch_size, shuffle_seed=config.data.seed + epoch,
                                 deterministic=config.data.deterministic)
    train_metrics = trainer.run_epoch(train_batches, training=True, steps=train_steps, progress=progress)
    train_seconds = time.perf_counter() - start
    val_metrics = trainer.run_epoch(val_batches, training=False, steps=val_steps, progress=False)
    record = {"epoch": epoch + 1, "phase": phase,
              "loss": train_metrics["loss"], "accuracy": train_metrics["accuracy"],
              "val_loss": val_metrics["loss"], "val_accuracy": val_metrics["accuracy"],
              "seconds": time.perf_counter() - start, "train_seconds": train_seconds,
              "images_per_sec": train_metrics["examples"] / train_seconds,
              "learning_rate": float(trainer.optimizers[phase].learning_rate)}
    history.append(record)
    tensorboard.log_epoch(record, val_metrics["confusion_matrix"])
    trainer.epoch.assign(epoch + 1)
    manager.save(checkpoint_number=epoch + 1)
    run.save_history(history)
    logging.info("epoch %d/%d %s: loss %.4f accuracy %.4f val_loss %.4f val_accuracy %.4f (%.1fs, %.1f img/s)",
                 epoch + 1, total_epochs, phase, record["loss"], record["accuracy"], record["val_loss"],
                 record["val_accuracy"], record["seconds"], record["images_per_sec"])

  export_path = saved_model.export_saved_model(trainer.model, list(files.classes), config.data.image_size,
                                               run.export, config.export.model_name)
  logging.info("Exported the SavedModel to %s", export_path)
  metrics = summarize(history, config, list(files.classes), export_path)
  run.save_metrics(metrics)
  tensorboard.close()
  if chief:
    # A run resumed after its last epoch has not validated in this process; the report needs the final model's.
    val_metrics = val_metrics or trainer.run_epoch(val_batches, training=False, steps=val_steps, progress=False)
    reporting.write_reports(run.report, history, val_metrics["confusion_matrix"], files.classes)
  return metrics


def _first_augmented_batch(config: Config, train_images: tf.data.Dataset, count: int = 16):
  """The first images of the first epoch through a new augmenter of the run's preset and seed: what the model
  sees, without drawing from the random state of the trainer's own augmenter."""
  images, labels = next(iter(data.batches(train_images, count, shuffle_seed=config.data.seed)))
  augmenter = augment.build(config.train.augment, config.data.seed)
  if augmenter is not None:
    images = augmenter(images, training=True)
  return np.asarray(images), labels.numpy()


def summarize(history: list[dict], config: Config, classes: list[str], export_path: str) -> dict:
  phases = {}
  for phase, epochs in ((model_lib.FROZEN, config.train.frozen_epochs),
                        (model_lib.FINETUNE, config.train.finetune_epochs)):
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
