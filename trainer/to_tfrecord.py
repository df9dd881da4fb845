"""python -m trainer.to_tfrecord --data_dir=DIR|--csv=FILE --output=OUT [--shards=N]: convert once, train many times.

Writes OUT/train-00000-of-0000N.tfrecord ... and OUT/val-... shards of tf.train.Example (image/encoded: the file's
bytes unchanged, image/format, image/filename, image/class/label, image/class/text), after the same checks as
training (unusable files skipped and listed, or refused with --strict_data; the same split with --seed and
--validation_split). The records are shuffled (seeded) before they are cut into shards, so every shard mixes the
classes. Train on them with --tfrecord='OUT/train-*' --tfrecord_val='OUT/val-*'.
"""

import os
import random

import tensorflow as tf
from absl import flags

from trainer import config_checks, data_checks, sources, tfrecords, usage
from trainer.config import DataConfig
from trainer import flags as trainer_flags
from trainer.errors import UserInputError, exit_on_user_error

flags.DEFINE_string("output", "", "Folder the shards are written to (created; must hold no train-* or val-* yet).")
flags.DEFINE_integer("shards", 8, "Shards per split (fewer when a split has fewer images): at least the number "
                     "of training workers, which read whole shards.")

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
      tfrecords.ENCODED: strings(encoded), "image/format": strings(image_format.encode()),
      "image/filename": strings(os.path.basename(filename).encode()),
      tfrecords.LABEL: tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
      tfrecords.TEXT: strings(text.encode())}))


def main(argv):
  with exit_on_user_error():
    usage.refuse_arguments(argv)
    given = trainer_flags.FLAGS
    output = given.output
    config = trainer_flags.config_from_flags()
    config_checks.validate(config)
    written = convert(config.data, output, given.shards)
    print(f"Wrote {written['train']} training and {written['val']} validation records to {output}. Train with "
          f"--tfrecord='{os.path.join(output, 'train-*')}' --tfrecord_val='{os.path.join(output, 'val-*')}'.")


_FLAG_GROUPS = {"source": ["data_dir", "csv", "validation_split", "seed", "strict_data", "max_image_pixels"],
                "output": ["output", "shards"]}


def run_script():
  usage.run(main, __doc__, _FLAG_GROUPS)


if __name__ == "__main__":
  run_script()
