"""How a run's weights move: each phase's learning rate (scaled with the batch, decayed over the fine-tune phase), its
optimizer, and the training loss. The steps (trainer.loop.steps) and the tuner's trials (trainer.loop.tuning) both take
them from here, so that a trial trains its head as the run's frozen phase does.
"""

import keras
import tensorflow as tf

from trainer.config import Config, TrainConfig
from trainer.modeling import model as model_lib
from trainer.runtime import distribute


def learning_rate(phase: str, config: TrainConfig, scale: float = 1.0, phase_steps: int = 1):
  """The phase's Adam learning rate (times `scale`, see distribute.plan_batches): a number, or for
  --finetune_schedule=cosine a schedule that reaches 0 after the phase's `phase_steps` steps (the optimizer's own
  step count, so a resumed run continues it)."""
  if phase != model_lib.FINETUNE:
    return config.frozen_lr * scale
  if config.finetune_schedule == "cosine":
    return keras.optimizers.schedules.CosineDecay(config.finetune_lr * scale, decay_steps=max(phase_steps, 1))
  return config.finetune_lr * scale


def phase_optimizers(config: Config, lr_scale: float, steps_per_epoch: int) -> tuple[dict, dict]:
  """({phase: learning rate or schedule}, {phase: optimizer}) for the run's phases, in training order. Each phase
  has its own optimizer: the fine-tune phase starts with fresh moments for the layers it unfreezes. Under float16
  the optimizers scale the loss (and skip steps whose gradients are not finite)."""
  rates = {phase: learning_rate(phase, config.train, lr_scale, epochs * steps_per_epoch)
           for phase, epochs in model_lib.phases(config)}
  optimizers = {phase: keras.optimizers.Adam(rate) for phase, rate in rates.items()}
  if distribute.needs_loss_scaling(keras.config.dtype_policy().name):
    optimizers = {phase: keras.optimizers.LossScaleOptimizer(optimizer) for phase, optimizer in optimizers.items()}
  return rates, optimizers


def phase_label_smoothing(phase: str, config: TrainConfig) -> float:
  """The label smoothing of `phase`'s training loss: --finetune_label_smoothing in the fine-tune phase when it is
  set, else --label_smoothing."""
  if phase == model_lib.FINETUNE and config.finetune_label_smoothing >= 0:
    return config.finetune_label_smoothing
  return config.label_smoothing


def training_loss(label_smoothing: float):
  """The per-example loss the weights are trained on: cross-entropy against the labels, smoothed towards the
  uniform distribution by `label_smoothing` (--label_smoothing). Evaluation always reports the plain cross-entropy,
  comparable across settings."""
  if not label_smoothing:
    return keras.losses.sparse_categorical_crossentropy

  def smoothed(labels, probabilities):
    labels = tf.one_hot(tf.cast(tf.reshape(labels, [-1]), tf.int32), tf.shape(probabilities)[-1])
    return keras.losses.categorical_crossentropy(labels, probabilities, label_smoothing=label_smoothing)
  return smoothed
