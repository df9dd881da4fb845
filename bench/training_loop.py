"""python -m bench.training_loop: seconds per train step of the project's loop against plain Keras model.fit.

Same model, data (random images in memory), batch, optimizer and loss; each timed over --repeats passes of --steps
steps after one warm-up pass (tracing). --fit also times model.fit (only under the default strategy: Keras 3's fit
fails under MultiWorkerMirroredStrategy). --logical_cpus=N splits the CPU into N logical devices first, so that
--strategy=mirrored has N replicas on a CPU-only machine.
"""

import json
import time

from absl import flags

import bench

FLAGS = flags.FlagValues()
flags.DEFINE_string("backbone", "mobilenet", "Backbone.", flag_values=FLAGS)
flags.DEFINE_float("alpha", 0.25, "Width multiplier.", flag_values=FLAGS)
flags.DEFINE_string("weights", "../shared/weights/mobilenet_2_5_224_tf_no_top.h5", "No-top weights file.",
                    flag_values=FLAGS)
flags.DEFINE_integer("image_size", 96, "Input size.", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 32, "Global batch size.", flag_values=FLAGS)
flags.DEFINE_integer("steps", 10, "Steps per timed pass.", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 3, "Timed passes.", flag_values=FLAGS)
flags.DEFINE_enum("phase", "finetune", ["frozen", "finetune"], "Which layers train.", flag_values=FLAGS)
flags.DEFINE_string("strategy", "default", "default | mirrored (the project loop only, unless default).",
                    flag_values=FLAGS)
flags.DEFINE_integer("logical_cpus", 0, "Split the CPU into this many logical devices first (0: leave it).",
                     flag_values=FLAGS)
flags.DEFINE_bool("fit", True, "Also time model.fit (default strategy only).", flag_values=FLAGS)
flags.DEFINE_string("json", "", "Write the figures to this file.", flag_values=FLAGS)


def _timed(run_pass) -> float:
  run_pass()  # Warm-up: tracing.
  start = time.perf_counter()
  for _ in range(FLAGS.repeats):
    run_pass()
  return (time.perf_counter() - start) / (FLAGS.repeats * FLAGS.steps)


def main(argv: list[str]) -> dict:
  """Measures, prints, writes --json; returns the figures."""
  bench.parse_flags(FLAGS, argv, __doc__)
  import tensorflow as tf
  if FLAGS.logical_cpus:
    tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                               [tf.config.LogicalDeviceConfiguration()] * FLAGS.logical_cpus)
  import keras
  import numpy as np

  from trainer.config import Config, RuntimeConfig
  from trainer.loop import steps, train
  from trainer.runtime import distribute, runtime

  config = runtime.resolve(Config().replace(backbone=FLAGS.backbone, alpha=FLAGS.alpha, weights=FLAGS.weights,
                                          image_size=FLAGS.image_size, batch_size=FLAGS.batch_size,
                                          augment="none", head_units=128))
  strategy = distribute.create_strategy(RuntimeConfig(strategy=FLAGS.strategy))
  rng = np.random.default_rng(0)
  count = FLAGS.batch_size * FLAGS.steps
  images = rng.uniform(0, 255, (count, FLAGS.image_size, FLAGS.image_size, 3)).astype(np.float32)
  labels = rng.integers(0, 3, count).astype(np.int32)
  options = tf.data.Options()
  options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA

  def batched(elements: tuple) -> tf.data.Dataset:
    dataset = tf.data.Dataset.from_tensor_slices(elements).batch(FLAGS.batch_size).cache().prefetch(2)
    return dataset.with_options(options)
  # The loop's elements also carry a weight (0 for padding: none here) and an id, as trainer.input.data gives them.
  loop_batches = batched((images, labels, np.ones(count, np.float32), np.arange(count, dtype=np.int64)))

  trainer = steps.Trainer(config, 3, strategy)
  trainer.set_phase(FLAGS.phase)
  figures = {"strategy": FLAGS.strategy, "replicas": strategy.num_replicas_in_sync, "phase": FLAGS.phase,
             "image_size": FLAGS.image_size, "batch_size": FLAGS.batch_size,
             "loop_seconds_per_step": _timed(lambda: trainer.run_epoch(loop_batches, True, FLAGS.steps, False))}
  if FLAGS.fit and FLAGS.strategy == "default":
    model = steps.Trainer(config, 3, strategy).model
    train.model_lib.set_phase(model, FLAGS.phase, config.model.unfreeze_from)
    model.compile(keras.optimizers.Adam(config.train.finetune_lr), "sparse_categorical_crossentropy",
                  jit_compile=False)
    fit_batches = batched((images, labels))
    figures["fit_seconds_per_step"] = _timed(lambda: model.fit(fit_batches, epochs=1, verbose=0, shuffle=False))
    figures["loop_overhead"] = figures["loop_seconds_per_step"] / figures["fit_seconds_per_step"] - 1
  print(json.dumps(figures, indent=2))
  bench.write_figures(figures, FLAGS.json)
  return figures


if __name__ == "__main__":
  bench.run(main)
