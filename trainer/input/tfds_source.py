"""A prepared TensorFlow Datasets dataset as a source (--tfds): its train and validation splits (a stratified, seeded
carve of --validation_split when it has no validation split), its test split for evaluation, and one line naming a
dataset that is not prepared or does not exist.
"""

import dataclasses
import difflib
from typing import Sequence

import tensorflow as tf

from trainer.config import DataConfig
from trainer.errors import UserInputError
from trainer.input.sources import require_classes, stratified_split


@dataclasses.dataclass(frozen=True)
class TfdsSplits:
  """A TFDS dataset as (encoded image bytes, int64 label) examples, with the labels known up front."""
  classes: tuple[str, ...]
  train: tf.data.Dataset
  train_labels: tuple[int, ...]
  val: tf.data.Dataset
  val_labels: tuple[int, ...]


_VALIDATION_SPLITS = ("validation", "val")


# The `tfds` command line needs apache_beam, which is not installed: this lists the names without it.
_LIST_TFDS_NAMES = "python -c 'import tensorflow_datasets as tfds; print(tfds.list_builders())'"


def _did_you_mean(names: Sequence[str]) -> str:
  return f" (did you mean {' or '.join(names)}?)" if names else ""


@dataclasses.dataclass(frozen=True)
class _Tfds:
  builder: object  # tfds.core.DatasetBuilder
  classes: tuple[str, ...]
  image_key: str
  where: str  # the flags that name it, for messages

  def examples(self, split: str) -> tf.data.Dataset:
    """(encoded image bytes, int64 label): decoded by images.load, as the serving graph decodes a request."""
    import tensorflow_datasets as tfds
    return self.builder.as_dataset(split=split, as_supervised=True, shuffle_files=False,
                                   decoders={self.image_key: tfds.decode.SkipDecoding()})

  def labels(self, split: str) -> tuple[int, ...]:
    """Labels without decoding a single image."""
    return tuple(int(label) for label in self.examples(split).map(lambda _, label: label).as_numpy_iterator())


def _open_tfds(config: DataConfig, min_classes: int) -> _Tfds:
  """The prepared TFDS image classification dataset of --tfds, or UserInputError saying why it cannot be used."""
  import tensorflow_datasets as tfds  # Imported only for --tfds: it takes seconds.

  name, data_dir = config.tfds, config.tfds_data_dir or None
  where = f"--tfds={name}" + (f" --tfds_data_dir={data_dir}" if data_dir else "")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    prepared = builder.is_prepared()
  except tfds.core.DatasetNotFoundError:
    # Its message lists every registered dataset (over 400 lines).
    similar = difflib.get_close_matches(name.split(":")[0], tfds.list_builders(), n=3)
    raise UserInputError(f"{where}: TFDS has no dataset of that name{_did_you_mean(similar)}. List the names with "
                         f"{_LIST_TFDS_NAMES}.") from None
  except Exception as e:  # tfds raises ValueError or an I/O error for a bad version, config or folder.
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise UserInputError(f"{where}: TFDS cannot open this dataset ({type(e).__name__}: {first_line}).") from None
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
  require_classes(classes, min_classes, where, "Use an image classification dataset with two or more classes.")
  return _Tfds(builder, classes, keys[0], where)


def tfds_test_split(config: DataConfig) -> tuple[tuple[str, ...], str, tf.data.Dataset]:
  """(classes, split, its examples) of a TFDS dataset given for evaluation: its test split, else its validation
  split, else its train split (a whole other dataset)."""
  dataset = _open_tfds(config, min_classes=1)
  split = next((name for name in ("test",) + _VALIDATION_SPLITS + ("train",) if name in dataset.builder.info.splits),
               None)
  if not split:
    raise UserInputError(f"{dataset.where}: the dataset has no test, validation or train split (it has "
                         f"{sorted(dataset.builder.info.splits)}).")
  return dataset.classes, split, dataset.examples(split)


def tfds_splits(config: DataConfig) -> TfdsSplits:
  """The train and validation examples of a TFDS dataset prepared under --tfds_data_dir (never downloads)."""
  dataset = _open_tfds(config, min_classes=2)
  builder, classes, where, examples, labels = (dataset.builder, dataset.classes, dataset.where, dataset.examples,
                                               dataset.labels)
  if "train" not in builder.info.splits:
    raise UserInputError(f"{where}: the dataset has no 'train' split (it has {sorted(builder.info.splits)}).")
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
