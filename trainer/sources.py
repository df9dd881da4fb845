"""Where labelled images come from: class folders, a CSV of `path,label` rows, or a prepared TFDS dataset.

File sources (folders, CSV) give paths, so the files can be checked, hashed and compared before training; TFDS
gives a tf.data.Dataset of examples and no paths. Every source is split into train and validation the same way:
its own validation split when it has one, else a stratified seeded carve of `--validation_split`.
"""

import csv
import dataclasses
import os
import random
from typing import Hashable, Sequence

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
  """Every image file of a source, split into train and validation, with class names indexed by label."""
  classes: tuple[str, ...]
  train: Split
  val: Split


@dataclasses.dataclass(frozen=True)
class TfdsSplits:
  """A TFDS dataset as (uint8 image [H, W, C], int64 label) examples, with the labels known up front."""
  classes: tuple[str, ...]
  train: tf.data.Dataset
  train_labels: tuple[int, ...]
  val: tf.data.Dataset
  val_labels: tuple[int, ...]


# The data flags that each name a whole source; exactly one is given.
SOURCE_FLAGS = ("data_dir", "csv", "tfds")


def chosen(config: DataConfig) -> str:
  """The one source flag given: data_dir, csv or tfds."""
  given = [name for name in SOURCE_FLAGS if getattr(config, name)]
  if not given:
    raise UserInputError("No data given: pass --data_dir=FOLDER (class sub-folders, or train/ and val/), "
                         "--csv=FILE (path,label rows) or --tfds=NAME.")
  if len(given) > 1:
    raise UserInputError(f"Pass only one data source; got {', '.join('--' + name for name in given)}.")
  return given[0]


def find_files(config: DataConfig) -> LabelledFiles:
  """The labelled image files of --data_dir or --csv, or UserInputError saying what is wrong and how to fix it."""
  if chosen(config) == "csv":
    classes, files = _csv_files(config.csv)
    where = f"--csv={config.csv}"
  else:
    root = config.data_dir
    if not os.path.isdir(root):
      raise UserInputError(f"--data_dir={root}: no such folder.")
    train_dir = os.path.join(root, "train")
    val_dir = next((os.path.join(root, name) for name in ("val", "validation")
                    if os.path.isdir(os.path.join(root, name))), None)
    if os.path.isdir(train_dir) and val_dir:
      classes, train = class_folders(train_dir)
      val_classes, val = class_folders(val_dir)
      if val_classes != classes:
        raise UserInputError(
            f"The class folders of {train_dir} and {val_dir} differ: only in train: "
            f"{sorted(set(classes) - set(val_classes)) or 'none'}, only in validation: "
            f"{sorted(set(val_classes) - set(classes)) or 'none'}. Give both the same class sub-folders.")
      return LabelledFiles(tuple(classes), as_split(train, classes), as_split(val, classes))
    classes, files = class_folders(root)
    where = f"--data_dir={root}"
  train, val = stratified_split(files, config.validation_split, config.seed, where=where)
  return LabelledFiles(tuple(classes), as_split(train, classes), as_split(val, classes))


def is_image_file(name: str) -> bool:
  # Hidden files include macOS' .DS_Store and the ._* resource forks copied beside every photo.
  return not name.startswith(".") and name.lower().endswith(images.IMAGE_EXTENSIONS)


def class_folders(folder: str) -> tuple[list[str], dict[str, list[str]]]:
  """Class names (sorted) and the image paths of each class folder directly below `folder`."""
  classes = sorted(d for d in os.listdir(folder)
                   if not d.startswith(".") and os.path.isdir(os.path.join(folder, d)))
  _require_two_classes(classes, folder, "Put each class's images in a sub-folder named after the class (or "
                       "train/ and val/ folders that hold them).")
  files = {}
  for name in classes:
    class_dir = os.path.join(folder, name)
    files[name] = sorted(os.path.join(class_dir, f) for f in os.listdir(class_dir)
                         if is_image_file(f) and os.path.isfile(os.path.join(class_dir, f)))
    if not files[name]:
      raise UserInputError(f"Class folder {class_dir} holds no images ({', '.join(images.IMAGE_EXTENSIONS)}). "
                           "Add images or remove the folder.")
  return classes, files


def _require_two_classes(classes: Sequence[str], where: str, fix: str) -> None:
  if len(classes) < 2:
    raise UserInputError(f"{where} has {len(classes)} class(es) {list(classes)}; a classifier needs at least two. "
                         + fix)


_CSV_HEADER_NAMES = {"path", "file", "filename", "file_name", "image", "image_path", "filepath"}


def _csv_files(csv_path: str) -> tuple[list[str], dict[str, list[str]]]:
  """Class names (sorted) and image paths per class of a CSV of `path,label` rows (paths relative to the CSV)."""
  if not os.path.isfile(csv_path):
    raise UserInputError(f"--csv={csv_path}: no such file.")
  base = os.path.dirname(os.path.abspath(csv_path))
  label_of, missing = {}, []
  # utf-8-sig: spreadsheet tools put a byte-order mark before the first cell.
  with open(csv_path, newline="", encoding="utf-8-sig") as f:
    for line, row in enumerate(csv.reader(f), start=1):
      if not any(cell.strip() for cell in row):
        continue
      if line == 1 and row[0].strip().lower() in _CSV_HEADER_NAMES:
        continue
      if len(row) < 2 or not row[0].strip() or not row[1].strip():
        raise UserInputError(f"{csv_path} line {line}: expected 'path,label', got {','.join(row)!r}. Every row "
                             "needs an image path and its label.")
      path, label = os.path.join(base, row[0].strip()), row[1].strip()
      if os.path.basename(path).startswith("."):
        continue
      if not os.path.isfile(path):
        missing.append(f"line {line}: {path}")
      elif label_of.setdefault(path, label) != label:
        raise UserInputError(f"{csv_path} line {line}: {path} is labelled both '{label_of[path]}' and '{label}'. "
                             "Give each image one label.")
  if missing:
    raise UserInputError(f"{csv_path} names {len(missing)} file(s) that do not exist ({'; '.join(missing[:5])}"
                         f"{'; ...' if len(missing) > 5 else ''}). Paths are relative to the CSV's folder; fix or "
                         "remove those rows.")
  classes = sorted(set(label_of.values()))
  _require_two_classes(classes, f"--csv={csv_path}", "Label the rows with at least two different labels.")
  files = {name: sorted(path for path, label in label_of.items() if label == name) for name in classes}
  return classes, files


def stratified_split(items: dict[str, list[Hashable]], fraction: float, seed: int,
                     where: str) -> tuple[dict[str, list], dict[str, list]]:
  """Holds out `fraction` of each class (at least one item) for validation, the same for the same seed."""
  if not 0.0 < fraction < 1.0:
    raise UserInputError(f"{where} has no validation split, so --validation_split must be between 0 and 1 "
                         f"(got {fraction}).")
  rng = random.Random(seed)
  train, val = {}, {}
  for name, members in items.items():
    if len(members) < 2:
      raise UserInputError(f"{where}: class '{name}' has {len(members)} image(s); at least 2 are needed to hold "
                           "one out for validation. Add images or remove the class.")
    shuffled = list(members)
    rng.shuffle(shuffled)
    n_val = min(len(members) - 1, max(1, round(len(members) * fraction)))
    val[name], train[name] = sorted(shuffled[:n_val]), sorted(shuffled[n_val:])
  return train, val


def as_split(files: dict[str, list[str]], classes: Sequence[str]) -> Split:
  pairs = [(path, list(classes).index(name)) for name in classes for path in files.get(name, [])]
  return Split(tuple(p for p, _ in pairs), tuple(label for _, label in pairs))


_VALIDATION_SPLITS = ("validation", "val")


def tfds_splits(config: DataConfig) -> TfdsSplits:
  """The train and validation examples of a TFDS dataset prepared under --tfds_data_dir (never downloads)."""
  import tensorflow_datasets as tfds  # Imported only for --tfds: it takes seconds.

  name, data_dir = config.tfds, config.tfds_data_dir or None
  where = f"--tfds={name}" + (f" --tfds_data_dir={data_dir}" if data_dir else "")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    prepared = builder.is_prepared()
  except Exception as e:  # tfds raises DatasetNotFoundError, ValueError or an I/O error for an unknown dataset.
    raise UserInputError(f"{where}: TFDS cannot find this dataset ({type(e).__name__}: {e}).") from None
  if not prepared:
    raise UserInputError(f"{where}: the dataset is not prepared there, and this command never downloads. Prepare "
                         f"it where there is internet (`tfds build {name} --data_dir=DIR`) and pass "
                         "--tfds_data_dir=DIR.")
  keys = builder.info.supervised_keys
  label_feature = builder.info.features[keys[1]] if keys else None
  if not keys or not hasattr(label_feature, "names"):
    raise UserInputError(f"{where}: the dataset has no (image, class label) supervised keys; use an image "
                         "classification dataset.")
  classes = tuple(label_feature.names)
  _require_two_classes(classes, where, "Use an image classification dataset with two or more classes.")
  if "train" not in builder.info.splits:
    raise UserInputError(f"{where}: the dataset has no 'train' split (it has {sorted(builder.info.splits)}).")

  def examples(split: str) -> tf.data.Dataset:
    return builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)

  def labels(split: str) -> tuple[int, ...]:
    # Labels without decoding a single image.
    skip_images = {keys[0]: tfds.decode.SkipDecoding()}
    dataset = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False, decoders=skip_images)
    return tuple(int(label) for label in dataset.map(lambda _, label: label).as_numpy_iterator())

  train_labels = labels("train")
  val_split = next((split for split in _VALIDATION_SPLITS if split in builder.info.splits), None)
  if val_split:
    return TfdsSplits(classes, examples("train"), train_labels, examples(val_split), labels(val_split))
  by_class = {classes[label]: [] for label in sorted(set(train_labels))}
  for index, label in enumerate(train_labels):
    by_class[classes[label]].append(index)
  _, val_indices = stratified_split(by_class, config.validation_split, config.seed, where=where)
  is_val = [False] * len(train_labels)
  for indices in val_indices.values():
    for index in indices:
      is_val[index] = True
  is_val_table = tf.constant(is_val)

  def carve(want_val: bool) -> tf.data.Dataset:
    keep = examples("train").enumerate().filter(lambda i, _: tf.equal(tf.gather(is_val_table, i), want_val))
    return keep.map(lambda _, example: example)

  return TfdsSplits(classes, carve(False), tuple(l for l, v in zip(train_labels, is_val) if not v),
                    carve(True), tuple(l for l, v in zip(train_labels, is_val) if v))
