"""The random streams of a train step (augmentation, dropout) derived from (seed, epoch, step, replica).

Keras' random layers draw from a `SeedGenerator` whose state is one variable: it is not in our checkpoint's
epoch bookkeeping, it restarts from the seed after a resume, and under a mirrored strategy every replica reads
the same state and so draws the same transforms. `StepSeeds` replaces the generator of every random layer of a
model: inside `scope(seed)` each draw gets its own stateless seed made of the run's seed, the replica and the
step, so a resumed run draws exactly what the uninterrupted run drew, and two replicas never draw alike. Outside a
scope (feature extraction, TensorBoard's sample grid) it draws like an ordinary seeded generator.
"""

import contextlib

import keras
import tensorflow as tf

# Draws one step may make (one per random layer and call): seeds of consecutive steps never overlap below it.
_DRAWS_PER_STEP = 1024


class StepSeeds(keras.random.SeedGenerator):
  """A seed generator whose seeds, inside `scope`, are a function of a per-step seed tensor."""

  def __init__(self, seed: int):
    super().__init__(seed=seed, name="step_seeds")
    self._step_seed = None
    self._draws = 0

  @contextlib.contextmanager
  def scope(self, step_seed: tf.Tensor):
    """step_seed: int64 [2], e.g. `step_seed(...)`; every draw inside gets its own seed derived from it."""
    self._step_seed, self._draws = tf.cast(step_seed, self.state.dtype), 0
    try:
      yield
    finally:
      self._step_seed = None

  def next(self, ordered=True):
    if self._step_seed is None:
      return super().next(ordered)
    self._draws += 1
    return self._step_seed + tf.constant([0, self._draws], self.state.dtype)


def step_seed(seed: int, replica_id, epoch, step) -> tf.Tensor:
  """int64 [2] distinct for every (replica, epoch, step) of a run, the same in every process."""
  replica_id = tf.cast(replica_id, tf.int64)
  position = (tf.cast(epoch, tf.int64) * 1_000_003 + tf.cast(step, tf.int64)) * _DRAWS_PER_STEP
  return tf.stack([tf.constant(seed, tf.int64) * 10_007 + replica_id, position])


def install(layers_owner: keras.Layer, seeds: StepSeeds) -> int:
  """Makes every random layer under `layers_owner` draw from `seeds`; returns how many were changed.

  Preprocessing layers keep their generator in `generator` (RandAugment also draws for its own choices), Dropout
  in `seed_generator`. The attribute is replaced without Keras' tracking, so checkpoints keep their structure.
  """
  changed = 0
  for layer in [layers_owner, *layers_owner._flatten_layers(include_self=False)]:
    for attribute in ("generator", "seed_generator"):
      if isinstance(getattr(layer, attribute, None), keras.random.SeedGenerator):
        object.__setattr__(layer, attribute, seeds)
        changed += 1
  return changed
