"""What a fixed decode order costs: the pipeline decodes in parallel either way, and `deterministic=True` only
makes it yield in the list's order (which exact resumes and identical shuffles in every process need).

  python -m bench.input_order --data_dir=../shared/datasets/hymenoptera --image_size=224 --rounds=3 [--json=FILE]
"""

import glob
import os
import time

import numpy as np
import tensorflow as tf
from absl import flags

import bench
from trainer.input import images

FLAGS = flags.FlagValues()
flags.DEFINE_string("data_dir", "../shared/datasets/hymenoptera", "A folder of images (searched recursively).",
                    flag_values=FLAGS)
flags.DEFINE_integer("image_size", 224, "Decoded size.", flag_values=FLAGS)
flags.DEFINE_integer("rounds", 3, "Alternating rounds of each order; the median is reported.", flag_values=FLAGS)
flags.DEFINE_string("json", "", "Write the figures to this JSON file.", flag_values=FLAGS)


def _images_per_sec(paths: list[str], in_order: bool) -> float:
  dataset = tf.data.Dataset.from_tensor_slices(paths).map(
      lambda path: images.load(tf.io.read_file(path), FLAGS.image_size),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=in_order).batch(32).prefetch(tf.data.AUTOTUNE)
  start = time.perf_counter()
  for _ in dataset:
    pass
  return len(paths) / (time.perf_counter() - start)


def main(argv: list[str]) -> dict:
  """Measures, prints, writes --json; returns the figures."""
  bench.parse_flags(FLAGS, argv, __doc__)
  paths = sorted(path for path in glob.glob(os.path.join(FLAGS.data_dir, "**", "*"), recursive=True)
                 if path.lower().endswith((".jpg", ".jpeg", ".png")))
  _images_per_sec(paths[:32], True)  # Warm-up: tracing, file cache.
  rates = {"in_order": [], "any_order": []}
  for _ in range(FLAGS.rounds):
    for name, in_order in (("in_order", True), ("any_order", False)):
      rates[name].append(_images_per_sec(paths, in_order))
  figures = {"files": len(paths), "image_size": FLAGS.image_size,
             **{f"{name}_images_per_sec": float(np.median(values)) for name, values in rates.items()},
             "ratio_in_order_to_any": float(np.median(rates["in_order"]) / np.median(rates["any_order"]))}
  bench.write_figures(figures, FLAGS.json)
  print(figures)
  return figures


if __name__ == "__main__":
  bench.run(main)
