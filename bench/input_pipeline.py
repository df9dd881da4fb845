"""Images per second of this project's input pipeline against the usual Keras ways, on one folder of classes.

python -m bench.input_pipeline --data_dir=../shared/datasets/hymenoptera/train --image_size=224 --batch_size=32
    [--cached_epochs=3] [--repeats=3] [--json=FILE]

Every figure is images/s over one full pass of the folder's images, as batches of --batch_size, the median of
--repeats rounds (each round measures every pipeline once, from scratch, so that a busy machine slows all alike):
  ours_first_epoch              read + decode + resize in parallel (trainer.data), filling the in-memory cache
  ours_cached_epoch             later epochs: shuffled batches from the cache (mean of --cached_epochs)
  image_dataset_from_directory  keras.utils.image_dataset_from_directory, one epoch (it does not cache)
  image_data_generator_classic  the legacy ImageDataGenerator.flow_from_directory with the reference tutorials'
                                augmentation (rotation 40, shifts 0.2, shear 0.2, zoom 0.2, horizontal flip)
  image_data_generator_plain    the same without augmentation
  decode_only                   tf.io.decode_image alone, in parallel: the machine's decode bound for these files
Also reported: the seconds of trainer.data_checks' scan of every file, which runs once before training.
Keras 3 no longer exports ImageDataGenerator; its legacy class lives in keras.src.legacy.preprocessing.image.
"""

import os
import statistics
import time

import keras
import tensorflow as tf
from absl import app, flags

from bench import write_figures
from keras.src.legacy.preprocessing.image import ImageDataGenerator

from trainer import data, data_checks, images, sources

flags.DEFINE_string("data_dir", None, "Folder with one sub-folder of images per class.", required=True)
flags.DEFINE_integer("image_size", 224, "Square size the images are resized to.")
flags.DEFINE_integer("batch_size", 32, "Batch size.")
flags.DEFINE_integer("cached_epochs", 3, "Epochs from the cache to average.")
flags.DEFINE_integer("repeats", 3, "Rounds; every figure is the median over them.")
flags.DEFINE_string("json", "", "Also write the figures (images/s) to this JSON file.")
FLAGS = flags.FLAGS


def _images_per_sec(batches, count: int) -> float:
  start = time.perf_counter()
  for _ in batches:
    pass
  return count / (time.perf_counter() - start)


def _generator_images_per_sec(generator) -> float:
  start = time.perf_counter()
  count = sum(len(generator[index][1]) for index in range(len(generator)))
  return count / (time.perf_counter() - start)


def _round(split: sources.Split, size: int, batch_size: int) -> dict:
  """Every pipeline once, from scratch: images/s of each, and the seconds of the data check scan."""
  count, figures = len(split), {}
  start = time.perf_counter()
  data_checks.scan(split.paths, max_pixels=89_478_485)
  figures["scan_seconds"] = time.perf_counter() - start

  paths = tf.data.Dataset.from_tensor_slices(list(split.paths))
  decode = paths.map(lambda path: images.decode(tf.io.read_file(path)), num_parallel_calls=tf.data.AUTOTUNE)
  figures["decode_only"] = _images_per_sec(decode.prefetch(tf.data.AUTOTUNE), count)

  cached = data.decoded_images(split, size).cache()
  figures["ours_first_epoch"] = _images_per_sec(data.batches(cached, batch_size, shuffle_seed=0), count)
  figures["ours_cached_epoch"] = statistics.mean(
      _images_per_sec(data.batches(cached, batch_size, shuffle_seed=epoch), count)
      for epoch in range(1, FLAGS.cached_epochs + 1))

  keras_dataset = keras.utils.image_dataset_from_directory(FLAGS.data_dir, image_size=(size, size),
                                                           batch_size=batch_size, shuffle=True, seed=0, verbose=False)
  figures["image_dataset_from_directory"] = _images_per_sec(keras_dataset, count)

  # The reference tutorials' generators (rescale included, as they have it).
  classic = ImageDataGenerator(rescale=1 / 255, rotation_range=40, width_shift_range=0.2, height_shift_range=0.2,
                               shear_range=0.2, zoom_range=0.2, horizontal_flip=True)
  plain = ImageDataGenerator(rescale=1 / 255)
  for name, generator in (("image_data_generator_classic", classic), ("image_data_generator_plain", plain)):
    flow = generator.flow_from_directory(FLAGS.data_dir, target_size=(size, size), batch_size=batch_size,
                                         class_mode="sparse", seed=0)
    figures[name] = _generator_images_per_sec(flow)
  return figures


def main(argv):
  del argv
  size, batch_size = FLAGS.image_size, FLAGS.batch_size
  classes, files, _ = sources.class_folders(FLAGS.data_dir)
  split = sources.as_split(files, classes)
  load_before = os.getloadavg()[0]
  rounds = [_round(split, size, batch_size) for _ in range(FLAGS.repeats)]
  figures = {name: statistics.median(r[name] for r in rounds) for name in rounds[0]}
  scan_seconds = figures.pop("scan_seconds")

  reference = figures["image_dataset_from_directory"]
  print(f"{len(split)} images of {FLAGS.data_dir} at {size}x{size}, batches of {batch_size}, median of "
        f"{FLAGS.repeats} rounds; load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after; data check "
        f"scan {scan_seconds:.2f}s ({len(split) / scan_seconds:.0f} images/s)")
  for name, value in figures.items():
    print(f"  {name:<30} {value:8.1f} images/s   {value / reference:5.2f}x image_dataset_from_directory")
  print(f"  ours_first_epoch / decode_only = {figures['ours_first_epoch'] / figures['decode_only']:.2f}; "
        f"ours_cached_epoch / image_data_generator_classic = "
        f"{figures['ours_cached_epoch'] / figures['image_data_generator_classic']:.1f}x")
  write_figures(figures, FLAGS.json)


if __name__ == "__main__":
  app.run(main)
