"""python -m bench.image_size: how the input size changes what frozen ImageNet features give a new task.

python -m bench.image_size [--data_dir=../shared/datasets/hymenoptera] [--sizes=224,256,288] [--json=FILE]

For each size: the frozen backbone's pooled features of the training images (--views augmented views, as
--cache_features computes them: trainer.loop.tuning.cached_features) and of the validation images, then the default
head trained on them with several seeds (epoch e on view e mod --views). Prints and writes, per size, the
extraction time and the mean, min and max validation accuracy.
"""

import os
import tempfile
import time

import keras
import numpy as np
from absl import flags

import bench
from trainer.config import Config
from trainer.loop import features, tuning
from trainer.modeling import model as model_lib
from trainer.runtime import runtime

FLAGS = flags.FlagValues()
flags.DEFINE_string("data_dir", "../shared/datasets/hymenoptera", "Dataset (train/ + val/).", flag_values=FLAGS)
bench.define_backbone_flags(FLAGS)
flags.DEFINE_list("sizes", ["224", "256", "288"], "Input sizes to compare.", flag_values=FLAGS)
flags.DEFINE_integer("views", 2, "Augmented views of each training image.", flag_values=FLAGS)
flags.DEFINE_integer("seeds", 8, "Heads trained per size.", flag_values=FLAGS)
flags.DEFINE_integer("epochs", 10, "Epochs of each head (epoch e trains on view e mod views).", flag_values=FLAGS)
flags.DEFINE_string("json", "", "Write the figures to this file.", flag_values=FLAGS)


def head_accuracy(cache: features.FeatureCache, config: Config, seed: int) -> float:
  """Validation accuracy of the default head trained on the cached features with `seed`."""
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((cache.train_features.shape[-1],))
  head = keras.Model(inputs, model_lib.classification_head(inputs, config.model.head_units, config.model.dropout,
                                                           cache.head.output.shape[-1], seed))
  head.compile(keras.optimizers.Adam(config.train.frozen_lr), "sparse_categorical_crossentropy", metrics=["accuracy"])
  for epoch in range(FLAGS.epochs):
    head.fit(cache.train_features[epoch % cache.views], cache.train_labels, batch_size=config.data.batch_size,
             epochs=1, verbose=0)
  return float(head.evaluate(cache.val_features, cache.val_labels, verbose=0)[1])


def main(argv: list[str]) -> dict:
  """Measures, prints, writes --json; returns the figures by size."""
  bench.parse_flags(FLAGS, argv, __doc__)
  figures = {"data_dir": FLAGS.data_dir, "backbone": FLAGS.backbone, "views": FLAGS.views, "seeds": FLAGS.seeds,
             "load_average_before": os.getloadavg()[0], "sizes": {}}
  with tempfile.TemporaryDirectory(prefix="bench_image_size_") as root:
    for size in map(int, FLAGS.sizes):
      config = runtime.resolve(Config().replace(data_dir=FLAGS.data_dir, backbone=FLAGS.backbone, alpha=FLAGS.alpha,
                                              weights=FLAGS.weights, image_size=size, feature_views=FLAGS.views,
                                              verbosity=-1))
      start = time.perf_counter()
      cache = tuning.cached_features(config, os.path.join(root, str(size)))
      seconds = time.perf_counter() - start
      accuracies = [head_accuracy(cache, config, seed) for seed in range(FLAGS.seeds)]
      figures["sizes"][str(size)] = {
          "extraction_seconds": seconds, "train_images": len(cache.train_labels), "val_images": len(cache.val_labels),
          "val_accuracy": {"mean": float(np.mean(accuracies)), "min": min(accuracies), "max": max(accuracies),
                           "runs": accuracies}}
      print(f"{size} px: extraction {seconds:.0f} s, head val_accuracy mean {np.mean(accuracies):.4f} "
            f"(min {min(accuracies):.4f}, max {max(accuracies):.4f}) over {FLAGS.seeds} seeds", flush=True)
  figures["load_average_after"] = os.getloadavg()[0]
  bench.write_figures(figures, FLAGS.json)
  return figures


if __name__ == "__main__":
  bench.run(main)
