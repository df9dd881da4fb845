"""Input: labelled image files found on disk, and the tf.data pipelines that feed them to training.

Data never imports the model: it yields float32 images in 0..255 at the model's input size; preprocessing for the
backbone and augmentation happen inside the model graph and the train step.
"""

import collections
import dataclasses
import os
import random

import tensorflow as tf

from trainer import images
from trainer.config import DataConfig
from trainer.errors import UserInputError


@dataclasses.dataclass(frozen=True)
class Split:
  paths: tuple[str, ...]
  labels: tuple[int, ...]

  def __len__(self) -> int:
    return len(self.paths)


@dataclasses.dataclass(frozen=True)
class LabelledFiles:
  """Every usable image of a source, split into train and validation, with class names indexed by label."""
  classes: tuple[str, ...]
  train: Split
  val: Split


def discover(config: DataConfig) -> LabelledFiles:
  """Finds the labelled images named by the data flags, or raises UserInputError saying what is wrong."""
  if not config.data_dir:
    raise UserInputError("No data given: pass --data_dir=FOLDER (class sub-folders, or train/ and val/).")
  root = config.data_dir
  if not os.path.isdir(root):
    raise UserInputError(f"--data_dir={root}: no such folder.")
  train_dir = os.path.join(root, "train")
  val_dir = next((os.path.join(root, name) for name in ("val", "validation")
                  if os.path.isdir(os.path.join(root, name))), None)
  if os.path.isdir(train_dir) and val_dir:
    classes, train = _class_folders(train_dir)
    val_classes, val = _class_folders(val_dir)
    if val_classes != classes:
      raise UserInputError(
          f"The class folders of {train_dir} and {val_dir} differ: only in train: "
          f"{sorted(set(classes) - set(val_classes)) or 'none'}, only in validation: "
          f"{sorted(set(val_classes) - set(classes)) or 'none'}. Give both the same class sub-folders.")
    return LabelledFiles(tuple(classes), _as_split(train, classes), _as_split(val, classes))
  classes, files = _class_folders(root)
  train, val = stratified_split(files, config.validation_split, config.seed, where=f"--data_dir={root}")
  return LabelledFiles(tuple(classes), _as_split(train, classes), _as_split(val, classes))


def is_image_file(name: str) -> bool:
  # Hidden files include macOS' .DS_Store and the ._* resource forks copied beside every photo.
  return not name.startswith(".") and name.lower().endswith(images.IMAGE_EXTENSIONS)


def _class_folders(folder: str) -> tuple[list[str], dict[str, list[str]]]:
  """Class names (sorted) and the image paths of each class folder directly below `folder`."""
  classes = sorted(d for d in os.listdir(folder)
                   if not d.startswith(".") and os.path.isdir(os.path.join(folder, d)))
  if len(classes) < 2:
    raise UserInputError(
        f"{folder} has {len(classes)} class folder(s) {classes}; a classifier needs at least two. Put each "
        "class's images in a sub-folder named after the class (or train/ and val/ folders that hold them).")
  files = {}
  for name in classes:
    class_dir = os.path.join(folder, name)
    files[name] = sorted(os.path.join(class_dir, f) for f in os.listdir(class_dir)
                         if is_image_file(f) and os.path.isfile(os.path.join(class_dir, f)))
    if not files[name]:
      raise UserInputError(f"Class folder {class_dir} holds no images ({', '.join(images.IMAGE_EXTENSIONS)}). "
                           "Add images or remove the folder.")
  return classes, files


def stratified_split(files: dict[str, list[str]], fraction: float, seed: int,
                     where: str) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
  """Holds out `fraction` of each class (at least one file) for validation, the same for the same seed."""
  if not 0.0 < fraction < 1.0:
    raise UserInputError(f"{where} has no validation folder, so --validation_split must be between 0 and 1 "
                         f"(got {fraction}).")
  rng = random.Random(seed)
  train, val = {}, {}
  for name, paths in files.items():
    if len(paths) < 2:
      raise UserInputError(f"{where}: class '{name}' has {len(paths)} image; at least 2 are needed to hold one "
                           "out for validation.")
    shuffled = list(paths)
    rng.shuffle(shuffled)
    n_val = min(len(paths) - 1, max(1, round(len(paths) * fraction)))
    val[name], train[name] = sorted(shuffled[:n_val]), sorted(shuffled[n_val:])
  return train, val


def _as_split(files: dict[str, list[str]], classes: list[str]) -> Split:
  pairs = [(path, classes.index(name)) for name in classes for path in files.get(name, [])]
  return Split(tuple(p for p, _ in pairs), tuple(label for _, label in pairs))


def class_counts(split: Split, num_classes: int) -> list[int]:
  counts = collections.Counter(split.labels)
  return [counts.get(label, 0) for label in range(num_classes)]


def decoded_images(split: Split, image_size: int, cache_dir: str = "") -> tf.data.Dataset:
  """(image float32 [S, S, 3] in 0..255, label int32) for every file, in order, decoded once and cached."""
  dataset = tf.data.Dataset.from_tensor_slices((list(split.paths), tf.constant(split.labels, tf.int32)))
  dataset = dataset.map(lambda path, label: (images.decode_and_resize(tf.io.read_file(path), image_size), label),
                        num_parallel_calls=tf.data.AUTOTUNE)
  if cache_dir:
    os.makedirs(cache_dir, exist_ok=True)
    return dataset.cache(os.path.join(cache_dir, f"images_{image_size}"))
  return dataset.cache()


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
