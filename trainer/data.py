"""Input: any source (folders, CSV, TFDS) as checked, decoded, cached tf.data pipelines for training.

`load` is the one entry point. For train and val it gives an unbatched tf.data.Dataset of (float32 image
[S, S, 3] in 0..255, int32 label), decoded and resized once in parallel and then cached (in memory when it fits,
else a file cache), plus the labels; file sources also keep their paths. Before that, every file is checked
(`trainer.data_checks`): undecodable files are skipped with one warning (or refused with --strict_data) and the
same image in train and val is reported.

Data never imports the model: preprocessing for the backbone and augmentation happen inside the model graph and
the train step.
"""

import collections
import dataclasses
import hashlib
import os
from typing import Sequence

import tensorflow as tf
from absl import logging

from trainer import data_checks, images, sources
from trainer.config import DataConfig
from trainer.errors import UserInputError

# Decoded images may take this share of the machine's memory before they are cached in a file instead.
_MEMORY_SHARE = 0.25


@dataclasses.dataclass(frozen=True)
class Examples:
  """One split: its decoded images (unbatched (float32 [S, S, 3], int32)), labels, and paths (file sources)."""
  images: tf.data.Dataset
  labels: tuple[int, ...]
  paths: tuple[str, ...] | None = None

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class InputData:
  classes: tuple[str, ...]
  train: Examples
  val: Examples
  skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # unusable file -> why


def load(config: DataConfig, image_size: int, cache_root: str = "") -> InputData:
  """The checked, decoded and cached train and val data named by the data flags.

  cache_root: where decoded images go when they do not fit in memory and --cache_dir is not set.
  """
  # The cache keeps the order of whichever pass fills it first, and every shuffle permutes that order: with
  # --deterministic the decoding keeps the source's order even when a non-deterministic pass comes first.
  in_order = True if config.deterministic else None
  if sources.chosen(config) == "tfds":
    splits = sources.tfds_splits(config)
    identity = f"tfds:{config.tfds}:{config.validation_split}:{config.seed}"

    def tfds_examples(dataset, labels, split):
      decoded = dataset.map(lambda image, label: (images.resize(_rgb(image), image_size), tf.cast(label, tf.int32)),
                            num_parallel_calls=tf.data.AUTOTUNE, deterministic=in_order)
      return Examples(_cache(decoded, len(labels), image_size, config.cache_dir, cache_root,
                             f"{identity}:{split}:{len(labels)}"), labels)

    return InputData(splits.classes, tfds_examples(splits.train, splits.train_labels, "train"),
                     tfds_examples(splits.val, splits.val_labels, "val"))

  files, skipped = usable_files(config)

  def file_examples(split):
    identity = "\n".join(f"{path}\t{label}" for path, label in zip(split.paths, split.labels))
    decoded = decoded_images(split, image_size, in_order)
    return Examples(_cache(decoded, len(split), image_size, config.cache_dir, cache_root, identity), split.labels,
                    split.paths)

  return InputData(files.classes, file_examples(files.train), file_examples(files.val), skipped)


def usable_files(config: DataConfig) -> tuple[sources.LabelledFiles, dict[str, str]]:
  """The files of a file source without the unusable ones (and the unusable ones with the reason)."""
  files = sources.find_files(config)
  scan = data_checks.scan(files.train.paths + files.val.paths, config.max_image_pixels)
  data_checks.report_unreadable(scan.unreadable, config.strict_data)
  train, val = _without(files.train, scan.unreadable), _without(files.val, scan.unreadable)
  empty = [name for name, count in zip(files.classes, class_counts(train.labels, len(files.classes))) if not count]
  if empty:
    raise UserInputError(f"Class(es) {empty} have no usable training images left after skipping "
                         f"{len(scan.unreadable)} unusable file(s). Add readable images of those classes.")
  data_checks.warn_leakage(data_checks.leaked(train.paths, val.paths, scan.digests))
  return sources.LabelledFiles(files.classes, train, val), scan.unreadable


def _without(split: sources.Split, unusable: dict[str, str]) -> sources.Split:
  keep = [(path, label) for path, label in zip(split.paths, split.labels) if path not in unusable]
  return sources.Split(tuple(p for p, _ in keep), tuple(label for _, label in keep))


def _rgb(image: tf.Tensor) -> tf.Tensor:
  """uint8 [H, W, 1|3|4] -> [H, W, 3], as `images.decode` does for files."""
  channels = image.shape[-1]
  if channels == 1:
    return tf.image.grayscale_to_rgb(image)
  return image[..., :3]


def class_counts(labels: Sequence[int], num_classes: int) -> list[int]:
  counts = collections.Counter(labels)
  return [counts.get(label, 0) for label in range(num_classes)]


CLASS_WEIGHTS = ("", "balanced")


def class_weights(choice: str, labels: Sequence[int], num_classes: int) -> list[float] | None:
  """--class_weight: None for '' (every example weighs the same); for balanced, n / (classes * count) per class,
  so that every class weighs the same in the loss in total (scikit-learn's "balanced")."""
  if choice not in CLASS_WEIGHTS:
    raise UserInputError(f"--class_weight={choice} is not known. Choose balanced, or leave it empty.")
  if not choice:
    return None
  counts = class_counts(labels, num_classes)
  return [len(labels) / (num_classes * count) if count else 0.0 for count in counts]


def sample_files(examples: Examples, folder: str, count: int) -> tuple[str, ...]:
  """Up to `count` images of a split as files: the source's own files, or lossless PNGs of its decoded images
  written to `folder` (TFDS has no files). The export is checked on them."""
  if examples.paths is not None:
    return examples.paths[:count]
  os.makedirs(folder, exist_ok=True)
  paths = []
  for index, (image, _) in enumerate(examples.images.take(count)):
    paths.append(os.path.join(folder, f"{index}.png"))
    tf.io.write_file(paths[-1], tf.io.encode_png(tf.cast(tf.round(image), tf.uint8)))
  return tuple(paths)


def decoded_images(split: sources.Split, image_size: int, in_order: bool | None = None) -> tf.data.Dataset:
  """(image float32 [S, S, 3] in 0..255, label int32) for every file, read and decoded in parallel.

  in_order: True keeps the files' order whatever the pipeline's options; None lets tf.data's option decide.
  """
  dataset = tf.data.Dataset.from_tensor_slices((list(split.paths), tf.constant(split.labels, tf.int32)))
  return dataset.map(lambda path, label: (images.decode_and_resize(tf.io.read_file(path), image_size), label),
                     num_parallel_calls=tf.data.AUTOTUNE, deterministic=in_order)


def _cache(dataset: tf.data.Dataset, count: int, image_size: int, cache_dir: str, cache_root: str,
           identity: str) -> tf.data.Dataset:
  """Caches decoded images in memory when they fit, else in a file named after what it holds.

  The file name carries a hash of the examples and the image size: tf.data reads an existing cache file whatever
  it holds, so a changed dataset must never find the old file.
  """
  folder = cache_dir or (cache_root if count * image_size * image_size * 3 * 4 > _memory_budget() else "")
  if not folder:
    return dataset.cache()
  os.makedirs(folder, exist_ok=True)
  digest = hashlib.sha256(f"{image_size}\n{identity}".encode()).hexdigest()[:16]
  logging.info("Caching %d decoded images in %s.", count, folder)
  return dataset.cache(os.path.join(folder, f"images_{image_size}_{digest}"))


def _memory_budget() -> int:
  try:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * _MEMORY_SHARE)
  except (ValueError, OSError, AttributeError):  # No sysconf (Windows): assume a modest machine.
    return 2 << 30


def batches(decoded: tf.data.Dataset, batch_size: int, shuffle_seed: int | None = None,
            deterministic: bool = False) -> tf.data.Dataset:
  """Batches of a decoded dataset; shuffled (with the given seed, so an epoch can be replayed) when seeded."""
  dataset = decoded
  if shuffle_seed is not None:
    dataset = dataset.shuffle(buffer_size=10_000, seed=shuffle_seed, reshuffle_each_iteration=False)
  dataset = dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = deterministic or shuffle_seed is None
  options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
  return dataset.with_options(options)
