"""The compiled steps of one run: the model, its optimizers per phase, and the train and eval steps under the
run's strategy, with every epoch's sums (loss, accuracy, examples, seconds, ids) and its timing figures.

Augmentation runs inside the train step on the replica's device, with seeds derived from (seed, epoch, step, replica)
(`trainer.modeling.randomness`), so a resumed run continues the random streams it left. Padding examples weigh 0: the
loss is the mean over the real examples of the whole step, over every replica.
"""

import time
import weakref

import keras
import numpy as np
import tensorflow as tf

from trainer.config import Config
from trainer.modeling import augment, optimization, randomness
from trainer.modeling import model as model_lib
from trainer.reporting import progress as progress_lib


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
      self.learning_rates, self.optimizers = optimization.phase_optimizers(config, lr_scale, steps_per_epoch)
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
    training_loss = optimization.training_loss(optimization.phase_label_smoothing(self.phase, self.config.train))

    def replica_step(images, labels, weights, ids):
      replica = tf.distribute.get_replica_context().replica_id_in_sync_group
      with tf.GradientTape() as tape, self.seeds.scope(randomness.step_seed(seed, replica, self.epoch,
                                                                            self.epoch_step)):
        inputs = tf.cast(images, tf.float32)
        if augmenter is not None:
          inputs = augmenter(inputs, training=True)
        probabilities = tf.cast(model(inputs, training=True), tf.float32)
        per_example = training_loss(labels, probabilities)
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
