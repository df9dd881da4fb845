"""python -m bench.image_size: how the input size changes what frozen ImageNet features give a new task.

For each size: the frozen backbone's pooled features of the training images (augmented views, as
--cache_features computes them) and of the validation images, then the default head trained on them with several
seeds. Prints the extraction time and the mean, min and max validation accuracy.
"""

import os
import tempfile
import time

import keras
import numpy as np
from absl import app, flags

from trainer import model as model_lib
from trainer import train, tuning
from trainer.config import Config

flags.DEFINE_string("data_dir", "../shared/datasets/hymenoptera", "Dataset (train/ + val/).")
flags.DEFINE_string("weights", "../shared/weights/mobilenet_v2_1.0_224_coral-tf2ptq-dequant_no_top.h5",
                    "MobileNetV2 no-top weights file.")
flags.DEFINE_list("sizes", ["224", "256", "288"], "Input sizes to compare.")
flags.DEFINE_integer("views", 2, "Augmented views of each training image.")
flags.DEFINE_integer("seeds", 8, "Heads trained per size.")
flags.DEFINE_integer("epochs", 10, "Epochs of each head (epoch e trains on view e mod views).")
FLAGS = flags.FLAGS


def head_accuracy(splits: tuning.FeatureSplits, config: Config, seed: int) -> float:
  views = splits.train_features.reshape(FLAGS.views, -1, splits.train_features.shape[-1])
  labels = splits.train_labels[:views.shape[1]]
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((views.shape[-1],))
  head = keras.Model(inputs, model_lib.classification_head(inputs, config.model.head_units, config.model.dropout,
                                                           splits.num_classes, seed))
  head.compile(keras.optimizers.Adam(config.train.frozen_lr), "sparse_categorical_crossentropy", metrics=["accuracy"])
  for epoch in range(FLAGS.epochs):
    head.fit(views[epoch % FLAGS.views], labels, batch_size=config.data.batch_size, epochs=1, verbose=0)
  return head.evaluate(splits.val_features, splits.val_labels, verbose=0)[1]


def main(argv):
  del argv
  cache = tempfile.mkdtemp(prefix="bench_image_size_")
  for size in map(int, FLAGS.sizes):
    config = train.resolve(Config().replace(data_dir=FLAGS.data_dir, weights=FLAGS.weights, image_size=size,
                                            feature_views=FLAGS.views, verbosity=-1))
    start = time.perf_counter()
    splits = tuning.cached_features(config, os.path.join(cache, str(size)))
    seconds = time.perf_counter() - start
    accuracies = [head_accuracy(splits, config, seed) for seed in range(FLAGS.seeds)]
    print(f"{size} px: extraction {seconds:.0f} s, head val_accuracy mean {np.mean(accuracies):.4f} "
          f"(min {min(accuracies):.4f}, max {max(accuracies):.4f}) over {FLAGS.seeds} seeds", flush=True)


if __name__ == "__main__":
  app.run(main)
