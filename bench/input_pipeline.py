"""Images per second of this project's input pipeline against the usual Keras ways, on one folder of classes.

python -m bench.input_pipeline --data_dir=../shared/datasets/hymenoptera/train --image_size=224 --batch_size=32
    [--cached_epochs=3] [--repeats=3] [--json=FILE]

Every figure is images/s over one full pass of the folder's images, as batches of --batch_size, the median of
--repeats rounds (each round measures every pipeline once, from scratch, so that a busy machine slows all alike):
  ours_first_epoch              trainer.input.data.load with --cache=memory (list, check and hash every file, decode +
                                resize in parallel into the cache), then a pass over its training and validation
                                splits (which together are the folder): from nothing to one epoch, as a run meets it
  ours_cached_epoch             later epochs: shuffled batches from the cache (mean of --cached_epochs)
  image_dataset_from_directory  keras.utils.image_dataset_from_directory, one epoch (it does not cache)
  image_data_generator_classic  the legacy ImageDataGenerator.flow_from_directory with the reference tutorials'
                                augmentation (rotation 40, shifts 0.2, shear 0.2, zoom 0.2, horizontal flip)
  image_data_generator_plain    the same without augmentation
  decode_only                   tf.io.decode_image alone, in parallel: the machine's decode bound for these files
Also reported (printed, and in the JSON as "facts"): the images counted, and the seconds of trainer.input.data_checks'
scan of every file (part of ours_first_epoch).
Keras 3 no longer exports ImageDataGenerator; its legacy class lives in keras.src.legacy.preprocessing.image.
"""

import os
import statistics
import time

import keras
import tensorflow as tf
from absl import flags
from keras.src.legacy.preprocessing.image import ImageDataGenerator

import bench
from trainer.config import Config
from trainer.input import data, data_checks, images, sources

FLAGS = flags.FlagValues()
flags.DEFINE_string("data_dir", None, "Folder with one sub-folder of images per class.", required=True,
                    flag_values=FLAGS)
flags.DEFINE_integer("image_size", 224, "Square size the images are resized to.", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 32, "Batch size.", flag_values=FLAGS)
flags.DEFINE_integer("cached_epochs", 3, "Epochs from the cache to average.", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 3, "Rounds; every figure is the median over them.", flag_values=FLAGS)
flags.DEFINE_string("json", "", "Also write the figures (images/s) to this JSON file.", flag_values=FLAGS)

# The reference tutorials' generator (rescale included, as they have it).
CLASSIC_AUGMENTATION = {"rotation_range": 40, "width_shift_range": 0.2, "height_shift_range": 0.2,
                        "shear_range": 0.2, "zoom_range": 0.2, "horizontal_flip": True}


def _images_per_sec(batches, count: int, start: float | None = None) -> float:
  """`count` / the seconds of one pass over `batches` (from `start` when given: work done before the pass)."""
  start = time.perf_counter() if start is None else start
  for _ in batches:
    pass
  return count / (time.perf_counter() - start)


def _generator_images_per_sec(generator) -> float:
  start = time.perf_counter()
  count = sum(len(generator[index][1]) for index in range(len(generator)))
  return count / (time.perf_counter() - start)


def _ours(data_dir: str, size: int, batch_size: int, cached_epochs: int) -> tuple[dict, int]:
  """images/s of trainer.input.data's first epoch (data.load included) and of its cached epochs, and the images."""
  config = Config().replace(data_dir=data_dir, cache="memory", batch_size=batch_size).data
  start = time.perf_counter()
  inputs = data.load(config, size)
  count = len(inputs.train) + len(inputs.val)

  def one_epoch(seed):
    # The folder's images are both splits: a run shuffles its training share and reads validation in order.
    train = inputs.train.epoch(seed).batch(batch_size)
    return train.concatenate(inputs.val.epoch(None).batch(batch_size)).prefetch(tf.data.AUTOTUNE)
  figures = {"ours_first_epoch": _images_per_sec(one_epoch(0), count, start)}
  figures["ours_cached_epoch"] = statistics.mean(_images_per_sec(one_epoch(epoch), count)
                                                 for epoch in range(1, cached_epochs + 1))
  return figures, count


def _round(data_dir: str, paths: list[str], size: int, batch_size: int, cached_epochs: int) -> dict:
  """Every pipeline once, from scratch: images/s of each, the seconds of the data check scan, the images."""
  count, figures = len(paths), {}
  start = time.perf_counter()
  data_checks.scan(paths, max_pixels=Config().data.max_image_pixels)
  figures["scan_seconds"] = time.perf_counter() - start

  decode = tf.data.Dataset.from_tensor_slices(paths).map(lambda path: images.decode(tf.io.read_file(path)),
                                                         num_parallel_calls=tf.data.AUTOTUNE)
  figures["decode_only"] = _images_per_sec(decode.prefetch(tf.data.AUTOTUNE), count)

  ours, figures["ours_images"] = _ours(data_dir, size, batch_size, cached_epochs)
  figures.update(ours)

  keras_dataset = keras.utils.image_dataset_from_directory(data_dir, image_size=(size, size), batch_size=batch_size,
                                                           shuffle=True, seed=0, verbose=False)
  figures["image_dataset_from_directory"] = _images_per_sec(keras_dataset, count)

  classic = ImageDataGenerator(rescale=1 / 255, **CLASSIC_AUGMENTATION)
  plain = ImageDataGenerator(rescale=1 / 255)
  for name, generator in (("image_data_generator_classic", classic), ("image_data_generator_plain", plain)):
    flow = generator.flow_from_directory(data_dir, target_size=(size, size), batch_size=batch_size,
                                         class_mode="sparse", seed=0)
    figures[name] = _generator_images_per_sec(flow)
  return figures


def main(argv: list[str]) -> dict:
  """Measures, prints, writes --json; returns the figures (images/s) and their "facts"."""
  bench.parse_flags(FLAGS, argv, __doc__)
  size, batch_size = FLAGS.image_size, FLAGS.batch_size
  _, files, _ = sources.class_folders(FLAGS.data_dir)
  paths = [path for class_files in files.values() for path in class_files]
  load_before = os.getloadavg()[0]
  rounds = [_round(FLAGS.data_dir, paths, size, batch_size, FLAGS.cached_epochs) for _ in range(FLAGS.repeats)]
  figures = {name: statistics.median(r[name] for r in rounds) for name in rounds[0]}
  facts = {"images": len(paths), "ours_images": figures.pop("ours_images"),
           "scan_seconds": figures.pop("scan_seconds"), "image_size": size, "batch_size": batch_size,
           "repeats": FLAGS.repeats, "load_average_before": load_before, "load_average_after": os.getloadavg()[0]}

  reference = figures["image_dataset_from_directory"]
  print(f"{len(paths)} images of {FLAGS.data_dir} at {size}x{size}, batches of {batch_size}, median of "
        f"{FLAGS.repeats} rounds; load average {load_before:.2f} before, {facts['load_average_after']:.2f} after; "
        f"data check scan {facts['scan_seconds']:.2f}s ({len(paths) / facts['scan_seconds']:.0f} images/s)")
  for name, value in figures.items():
    print(f"  {name:<30} {value:8.1f} images/s   {value / reference:5.2f}x image_dataset_from_directory")
  print(f"  ours_first_epoch / decode_only = {figures['ours_first_epoch'] / figures['decode_only']:.2f}; "
        f"ours_cached_epoch / image_data_generator_classic = "
        f"{figures['ours_cached_epoch'] / figures['image_data_generator_classic']:.1f}x")
  figures["facts"] = facts
  bench.write_figures(figures, FLAGS.json)
  return figures


if __name__ == "__main__":
  bench.run(main)
