"""The splits of the sources whose items are records, not files: TFDS (a seeded, stratified validation carve when
the dataset has no validation split) and TFRecord shards (each worker reading whole shard files of its own).
"""


import tensorflow as tf

from trainer.config import DataConfig
from trainer.errors import UserInputError
from trainer.input import sources, tfds_source
from trainer.input.images import plain_graph
from trainer.input.split import Shard, SplitList, digest, padded, padded_length


def from_tfds(config: DataConfig, shard: Shard, pad_multiple: int):
  splits = tfds_source.tfds_splits(config)
  lists = []
  for name, encoded, labels in (("train", splits.train, splits.train_labels),
                                ("val", splits.val, splits.val_labels)):
    ids = tuple(range(shard.index, len(labels), shard.count))
    mine = encoded.enumerate().filter(lambda index, example: index % shard.count == shard.index)
    mine = mine.map(lambda index, example: example[0])
    length = padded_length(len(labels), shard.count, pad_multiple)
    # The labels stand in for the content: TFDS records have no file to hash.
    identity = digest([f"tfds:{config.tfds}:{config.tfds_data_dir}:{name}:{config.validation_split}:{config.seed}",
                        ",".join(map(str, labels)), f"share {shard.index}/{shard.count} padded to {length}"])
    own_labels = tuple(labels[index] for index in ids)
    lists.append(SplitList(padded(mine, own_labels, ids, length), own_labels, ids, tuple(labels), length,
                            identity))
  return splits.classes, lists[0], lists[1]


def from_tfrecords(config: DataConfig, shard: Shard, pad_multiple: int):
  """TFRecord shards: each worker reads whole shard files of its own (shard k goes to worker k mod W)."""
  from trainer.input import tfrecords  # Only TFRecord sources need it.
  if not config.tfrecord:
    raise UserInputError("--tfrecord_val needs --tfrecord=GLOB, the training shards.")
  # Images are decoded in the first epoch (a record that fails becomes a stand-in), or first with --strict_data.
  train_scan = tfrecords.scan(config.tfrecord, config.strict_data, flag="--tfrecord",
                              max_pixels=config.max_image_pixels, decode=config.strict_data)
  if config.tfrecord_val:
    val_scan = tfrecords.scan(config.tfrecord_val, config.strict_data, flag="--tfrecord_val",
                              max_pixels=config.max_image_pixels, decode=config.strict_data)
    classes = tfrecords.merged_classes(train_scan, val_scan)
    parts = [(train_scan, None, "--tfrecord"), (val_scan, None, "--tfrecord_val")]
  else:
    classes = train_scan.classes
    by_class = {name: [i for i, label in enumerate(train_scan.labels) if label == number]
                for number, name in enumerate(classes)}
    by_class = {name: members for name, members in by_class.items() if members}
    train_part, val_part = sources.stratified_split(by_class, config.validation_split, config.seed,
                                                    where=f"--tfrecord={config.tfrecord}")
    parts = [(train_scan, sorted(i for members in train_part.values() for i in members), "--tfrecord"),
             (train_scan, sorted(i for members in val_part.values() for i in members), "--tfrecord")]
  lists = []
  for name, (scan, select, flag) in zip(("train", "val"), parts):
    selected = list(range(len(scan.labels))) if select is None else select
    mine = set(_own_positions(scan, shard))
    ids = tuple(index for index, position in enumerate(selected) if position in mine)
    all_labels = tuple(int(scan.labels[position]) for position in selected)
    own_labels = tuple(all_labels[index] for index in ids)
    context = tf.distribute.InputContext(num_input_pipelines=shard.count, input_pipeline_id=shard.index)
    records = tfrecords.dataset(scan, context if shard.count > 1 else None, select, flag=flag)
    length = padded_length(len(all_labels), shard.count, pad_multiple)
    identity = digest([scan.identity, name, f"{config.validation_split}:{config.seed}",
                        f"share {shard.index}/{shard.count} padded to {length}"])
    encoded = padded(records.map(plain_graph(lambda image, label: image)), own_labels, ids, length)
    lists.append(SplitList(encoded, own_labels, ids, all_labels, length, identity,
                            record_name=lambda index, scan=scan, selected=selected: tfrecords.record_name(
                                scan, selected[index])))
  return tuple(classes), lists[0], lists[1], {**train_scan.skipped, **(val_scan.skipped if config.tfrecord_val
                                                                       else {})}


def _own_positions(scan, shard: Shard) -> list[int]:
  """Positions in scan.labels of the usable records in this worker's shard files."""
  positions, start = [], 0
  for number, file in enumerate(scan.shards):
    usable = file.readable - len(file.unusable)
    if number % shard.count == shard.index:
      positions.extend(range(start, start + usable))
    start += usable
  return positions
