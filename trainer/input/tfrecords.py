"""TFRecord shards of tf.train.Example as a data source: `image/encoded` and `image/class/label` (plus the
optional `image/class/text` for class names), the keys of TFDS and the TF Model Garden.

`scan` reads every shard once before training: it counts the records, collects the labels and class names, and
finds the records that cannot be used, like the checks of image files: a shard that is truncated or corrupted
(its records from there on cannot be read), a record that is not such an Example, an image that does not decode
(unless the scan leaves decoding to the first epoch: `decode=False`), a negative label. Those are skipped with
one warning naming the shards (or refused with --strict_data).
`dataset` then streams the usable records as (encoded image bytes, int32 label), shards split across input
pipelines by file.
"""

import dataclasses
import hashlib
import os
import random
import re
from typing import Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from trainer.config import DataConfig
from trainer.errors import UserInputError
from trainer.input import data_checks, images, sources

ENCODED, LABEL, TEXT = "image/encoded", "image/class/label", "image/class/text"
FEATURES = {ENCODED: tf.io.FixedLenFeature([], tf.string), LABEL: tf.io.FixedLenFeature([], tf.int64),
            TEXT: tf.io.FixedLenFeature([], tf.string, default_value="")}
# How many skipped records a warning names (all of them are in the returned `skipped`).
_LISTED = 5


@dataclasses.dataclass(frozen=True)
class Shard:
  path: str
  readable: int  # records before the end of the file, or before the first record that cannot be read
  unusable: tuple[int, ...]  # indices of readable records that cannot be used


@dataclasses.dataclass(frozen=True)
class Scan:
  """What `scan` found. Unpacks as (classes, labels, skipped)."""
  classes: tuple[str, ...]  # names by label id: image/class/text where the records have it, else the id
  labels: tuple[int, ...]  # of every usable record, shard by shard (sorted by path) in file order
  skipped: dict[str, str]  # "SHARD record N" (or "SHARD from record N" when the rest is lost) -> why
  shards: tuple[Shard, ...]
  identity: str  # digest of the usable records' contents and labels, in order (names a cache of their pixels)
  named: frozenset[int] = frozenset()  # label ids whose name is an image/class/text

  def __iter__(self):
    return iter((self.classes, self.labels, self.skipped))


def shard_paths(glob: str, flag: str = "--tfrecord") -> tuple[str, ...]:
  paths = tuple(sorted(tf.io.gfile.glob(glob)))
  if not paths:
    raise UserInputError(f"{flag}={glob} matches no files. Give a glob of TFRecord shards, e.g. "
                         "'DIR/train-*' (python -m trainer.to_tfrecord writes them from image folders).")
  return paths


def scan(glob: str, strict: bool = False, image_size: int | None = None, flag: str = "--tfrecord",
         max_pixels: int | None = None, decode: bool = True) -> Scan:
  """Every shard of `glob` checked once: the usable records' labels, class names and the unusable records.

  max_pixels: records whose image header says more pixels (--max_image_pixels) are unusable, refused before
  they are decoded. decode=False leaves the images undecoded (trainer.input.data decodes each record once, in the
  first epoch, and names a record that fails then by `record_name`).

  image_size: decode the images as training will (`images.load` at this size) rather than at the cheapest scale
  that fails alike (`images.check`). strict: refuse unusable records (--strict_data) instead of skipping them
  with a warning.
  """
  paths = shard_paths(glob, flag)
  readable, skipped = [], {}
  for path in paths:
    count, problem = _readable_records(path)
    readable.append(count)
    if problem:
      skipped[f"{path} from record {count}"] = f"truncated or corrupted, later records cannot be read ({problem})"
  checked = _checked_records(paths, readable, image_size, max_pixels, decode)
  labels, texts, unusable, identity = [], {}, [[] for _ in paths], hashlib.sha256()
  for shard, path in enumerate(paths):
    failed = _why_unusable(path, [index for index in range(readable[shard]) if (shard, index) not in checked],
                           image_size, max_pixels, decode)
    for index in range(readable[shard]):
      record = checked.get((shard, index))
      why = failed.get(index) or (f"label {record[0]} is not a class id (0 or more)" if record[0] < 0 else None)
      if why:
        skipped[f"{path} record {index}"] = why
        unusable[shard].append(index)
        continue
      labels.append(record[0])
      identity.update(record[2] + b"%d\n" % record[0])
      if record[1]:
        texts.setdefault(record[0], {}).setdefault(record[1], path)
  _report(skipped, strict, flag)
  if not labels:
    raise UserInputError(f"{flag}={glob}: none of its {sum(readable)} record(s) is a usable tf.train.Example with "
                         f"'{ENCODED}' and '{LABEL}'.")
  classes = _class_names(max(labels) + 1, texts, flag)
  shards = tuple(Shard(path, count, tuple(bad)) for path, count, bad in zip(paths, readable, unusable))
  return Scan(classes, tuple(labels), skipped, shards, identity.hexdigest()[:16], frozenset(texts))


def _readable_records(path: str) -> tuple[int, str | None]:
  """(records that can be read, why the rest cannot or None)."""
  records = tf.data.TFRecordDataset(path)
  try:
    return int(records.reduce(np.int64(0), lambda count, _: count + 1)), None
  except tf.errors.DataLossError as e:
    # ignore_errors ends the file at its first unreadable record: what comes before it is counted.
    count = int(records.ignore_errors().reduce(np.int64(0), lambda count, _: count + 1))
    return count, _first_line(e)


def record_name(scanned: Scan, position: int) -> str:
  """"SHARD record N" of the usable record at `position` in `scanned.labels` (found when asked: a name is needed
  only for a record that fails)."""
  for shard in scanned.shards:
    usable = shard.readable - len(shard.unusable)
    if position < usable:
      index = position
      for unusable in sorted(shard.unusable):  # Each unusable record at or before it moves it one further.
        if unusable > index:
          break
        index += 1
      return f"{shard.path} record {index}"
    position -= usable
  raise IndexError(f"no usable record at {position} past the last shard")


def _checked_records(paths: Sequence[str], readable: Sequence[int], image_size: int | None,
                     max_pixels: int | None, decode: bool) -> dict[tuple[int, int], tuple[int, str, bytes]]:
  """(shard, record) -> (label, class text, fingerprint of the record) of every record that parses and whose
  image decodes (or, without decode, whose header is read), read in parallel. A record that fails is left out
  (tf.data's ignore_errors): `scan` asks it why."""
  shards = tf.data.Dataset.from_tensor_slices((tf.range(len(paths), dtype=tf.int64), list(paths),
                                               tf.constant(readable, tf.int64)))
  records = shards.flat_map(lambda shard, path, count: tf.data.TFRecordDataset(path).take(count).enumerate().map(
      lambda index, record: (shard, index, record)))

  def check(shard, index, record):
    example = tf.io.parse_single_example(record, FEATURES)
    with tf.control_dependencies(_pixel_limit(example[ENCODED], max_pixels)):
      image = _decoded(tf.identity(example[ENCODED]), image_size) if decode else tf.zeros([1], tf.uint8)
    # A value of the pixels is returned so the decode is not pruned as unused.
    return shard, index, example[LABEL], example[TEXT], tf.fingerprint([record])[0], tf.reduce_max(image)

  checked = records.map(check, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors(log_warning=False)
  found = {}
  for shard, index, label, text, fingerprint, _ in checked.batch(1024).as_numpy_iterator():
    for key in zip(shard.tolist(), index.tolist(), label.tolist(), text.tolist(), fingerprint):
      found[key[:2]] = (key[2], key[3].decode("utf-8", "replace"), key[4].tobytes())
  return found


def _decoded(image_bytes: tf.Tensor, image_size: int | None) -> tf.Tensor:
  # Without a size, the cheapest decode that fails exactly when `images.load` does.
  return images.load(image_bytes, image_size) if image_size else images.check(image_bytes)


def _pixel_limit(image_bytes: tf.Tensor, max_pixels: int | None) -> list[tf.Operation]:
  """An assertion that fails for an image whose header says more than max_pixels (none without a limit)."""
  if not max_pixels:
    return []
  return [tf.debugging.assert_less_equal(tf.reduce_prod(images.header_size(image_bytes)), tf.constant(max_pixels,
                                                                                                       tf.int64))]


def _why_unusable(path: str, indices: Sequence[int], image_size: int | None, max_pixels: int | None = None,
                  decode: bool = True) -> dict[int, str]:
  """index -> error of each record of the shard that failed the parallel check, checked again on its own."""
  if not indices:
    return {}
  records = tf.data.TFRecordDataset(path).take(max(indices) + 1).enumerate()
  wanted = set(indices)
  return {int(index): _error(record, image_size, max_pixels, decode) for index, record in records
          if int(index) in wanted}


def _error(record: tf.Tensor, image_size: int | None, max_pixels: int | None = None, decode: bool = True) -> str:
  try:
    example = tf.io.parse_single_example(record, FEATURES)
  except tf.errors.InvalidArgumentError as e:
    return f"not a tf.train.Example with '{ENCODED}' and '{LABEL}' ({_first_line(e)})"
  try:
    if max_pixels:
      height, width = images.header_size(example[ENCODED]).numpy().tolist()
      if height * width > max_pixels:
        return f"its image is {width}x{height} pixels, more than --max_image_pixels={max_pixels}"
    if decode:
      _decoded(example[ENCODED], image_size)
  except tf.errors.InvalidArgumentError as e:
    return f"its image cannot be decoded ({_first_line(e)})"
  return "it failed when checked with the other records"  # Not expected: the same checks passed alone.


def _first_line(error: tf.errors.OpError) -> str:
  """The op's own words, without TensorFlow's function and op decorations."""
  message = re.sub(r"\{\{.*?\}\}|\[Op:.*", "", error.message.splitlines()[0])
  return message.strip().rstrip(".")


def _report(skipped: dict[str, str], strict: bool, flag: str) -> None:
  if not skipped:
    return
  lines = [f"{where}: {why}" for where, why in skipped.items()]
  if strict:
    raise UserInputError(f"{len(lines)} TFRecord record(s) of {flag} cannot be used (--strict_data): "
                         f"{'; '.join(lines)}. Rewrite those shards (python -m trainer.to_tfrecord), or drop "
                         "--strict_data to skip the records.")
  more = f"; and {len(lines) - _LISTED} more" if len(lines) > _LISTED else ""
  logging.warning("Skipping %d TFRecord record(s) of %s that cannot be used: %s%s", len(lines), flag,
                  "; ".join(lines[:_LISTED]), more)


def _class_names(count: int, texts: dict[int, dict[str, str]], flag: str) -> tuple[str, ...]:
  conflicts = {label: sorted(names) for label, names in texts.items() if len(names) > 1}
  if conflicts:
    label, names = next(iter(conflicts.items()))
    raise UserInputError(f"{flag}: label {label} is named {names} ('{TEXT}') in different records (e.g. "
                         f"{texts[label][names[0]]} and {texts[label][names[1]]}). Give each label one name.")
  return tuple(next(iter(texts[label])) if label in texts else str(label) for label in range(count))


def merged_classes(train: Scan, val: Scan, flag: str = "--tfrecord_val") -> tuple[str, ...]:
  """The class names of a training scan and its validation scan, which must agree: a label of the validation
  shards that no training record has, or two names for one label, is refused."""
  unknown = sorted(set(range(len(val.classes))[len(train.classes):]) & set(val.labels))
  if unknown:
    raise UserInputError(f"{flag}: its records have label(s) {unknown}, which no training record (--tfrecord) "
                         f"has ({len(train.classes)} classes). Give both the same classes.")
  classes = list(train.classes)
  for label in sorted(val.named & set(range(len(classes)))):
    if label in train.named and classes[label] != val.classes[label]:
      raise UserInputError(f"Label {label} is '{train.classes[label]}' in --tfrecord but '{val.classes[label]}' "
                           f"in {flag}. Write both with the same class names.")
    classes[label] = val.classes[label]
  return tuple(classes)


def dataset(source: "str | Scan", input_context: tf.distribute.InputContext | None = None,
            select: Sequence[int] | None = None, flag: str = "--tfrecord") -> tf.data.Dataset:
  """(encoded image bytes, int32 label) of every usable record, in the order of `scan(...).labels`.

  source: a glob of shards, or its `scan` (scanned now when a glob). input_context: this input pipeline reads
  only its share of the shards (split by file). select: positions in the scan's labels to keep (e.g. a
  validation carve).
  """
  scanned = scan(source, flag=flag) if isinstance(source, str) else source
  shards = scanned.shards
  pipelines = input_context.num_input_pipelines if input_context else 1
  if len(shards) < pipelines:
    raise UserInputError(f"{flag} has {len(shards)} shard(s) for {pipelines} input pipelines (workers): each "
                         f"reads whole shards. Write at least {pipelines} (python -m trainer.to_tfrecord "
                         f"--shards={pipelines}).")
  starts = np.cumsum([0] + [shard.readable for shard in shards])
  files = tf.data.Dataset.from_tensor_slices((starts[:-1], [shard.path for shard in shards],
                                              np.array([shard.readable for shard in shards], np.int64)))
  if pipelines > 1:
    files = files.shard(pipelines, input_context.input_pipeline_id)
  keep = _kept_records(scanned, starts, select)

  def records(start, path, count):
    # take(count): a truncated shard ends where its records stop being readable, not in a DataLossError.
    indexed = tf.data.TFRecordDataset(path).take(count).enumerate(start)
    if keep is not None:
      indexed = indexed.filter(lambda position, _: tf.gather(keep, position))
    return indexed.map(lambda _, record: record)

  def parsed(record):
    example = tf.io.parse_single_example(record, {ENCODED: FEATURES[ENCODED], LABEL: FEATURES[LABEL]})
    return example[ENCODED], tf.cast(example[LABEL], tf.int32)

  # One shard after the other (the scan's order); reading is sequential I/O, the decoding after it is parallel.
  return files.flat_map(records).map(parsed, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _kept_records(scanned: Scan, starts: np.ndarray, select: Sequence[int] | None) -> tf.Tensor | None:
  """bool [readable records of all shards]: whether each is read; None when every readable record is."""
  usable = np.ones(starts[-1], bool)
  for start, shard in zip(starts, scanned.shards):
    usable[start + np.array(shard.unusable, np.int64)] = False
  if select is None:
    return None if usable.all() else tf.constant(usable)
  keep = np.zeros_like(usable)
  keep[np.flatnonzero(usable)[np.asarray(select, np.int64)]] = True
  return tf.constant(keep)


# Writing shards (python -m trainer.to_tfrecord) ------------------------------------------------------------------

_SPLITS = ("train", "val")
_FORMATS = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png", ".gif": "gif", ".bmp": "bmp", ".webp": "webp"}


def convert(config: DataConfig, output: str, shards: int) -> dict[str, int]:
  """Writes the shards of config's --data_dir or --csv source into `output`; returns the records per split."""
  if sources.chosen(config) not in ("data_dir", "csv"):
    raise UserInputError("trainer.to_tfrecord converts --data_dir or --csv sources; --tfds and --tfrecord data "
                         "are TFRecord shards already.")
  if not output:
    raise UserInputError("--output is required: the folder to write the shards to.")
  if shards < 1:
    raise UserInputError(f"--shards={shards}: must be >= 1.")
  _refuse_existing_shards(output)
  files = usable_files(config)
  tf.io.gfile.makedirs(output)
  written = {}
  for name, split in zip(_SPLITS, (files.train, files.val)):
    pairs = list(zip(split.paths, split.labels))
    random.Random(f"{config.seed}:{name}").shuffle(pairs)
    count = min(shards, len(pairs))
    for index in range(count):
      _write_shard(os.path.join(output, f"{name}-{index:05d}-of-{count:05d}.tfrecord"), pairs[index::count],
                   files.classes)
    written[name] = len(pairs)
  return written


def usable_files(config: DataConfig) -> sources.LabelledFiles:
  """The source's files split as training splits them, after the same checks (unusable files reported)."""
  files = sources.find_files(config)
  train, val = files.train, files.val
  checked = data_checks.scan(train.paths + val.paths, config.max_image_pixels)
  data_checks.report_unreadable({**files.skipped, **checked.unreadable}, config.strict_data)
  data_checks.warn_leakage(data_checks.leaked(train.paths, val.paths, checked.digests))
  return sources.LabelledFiles(files.classes, train.without(checked.unreadable), val.without(checked.unreadable))


def _refuse_existing_shards(output: str) -> None:
  existing = [path for split in _SPLITS for path in tf.io.gfile.glob(os.path.join(output, f"{split}-*"))]
  if existing:
    raise UserInputError(f"--output={output} already holds {len(existing)} shard(s) (e.g. {existing[0]}): a glob "
                         "would mix them with the new ones. Choose a new folder, or delete them first.")


def _write_shard(path: str, pairs: list[tuple[str, int]], classes: tuple[str, ...]) -> None:
  """Writes to a hidden name first, so a stopped conversion leaves nothing that OUT/train-* would match."""
  partial = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".partial")
  with tf.io.TFRecordWriter(partial) as writer:
    for file_path, label in pairs:
      with tf.io.gfile.GFile(file_path, "rb") as f:
        encoded = f.read()
      writer.write(example(encoded, label, classes[label], file_path).SerializeToString())
  tf.io.gfile.rename(partial, path, overwrite=True)


def example(encoded: bytes, label: int, text: str, filename: str = "") -> tf.train.Example:
  """A tf.train.Example with the keys of TFDS and the TF Model Garden."""

  def strings(value: bytes):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

  image_format = _FORMATS.get(os.path.splitext(filename)[1].lower(), "")
  return tf.train.Example(features=tf.train.Features(feature={
      ENCODED: strings(encoded), "image/format": strings(image_format.encode()),
      "image/filename": strings(os.path.basename(filename).encode()),
      LABEL: tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
      TEXT: strings(text.encode())}))
