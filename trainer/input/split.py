"""A split of any source before decoding, the one shape every source gives `trainer.input.data.load`: this worker's
share of its examples (`Shard`: index, index + count, ... of the list), padded with weight-0 copies to the length
every worker's share has, and what identifies them.
"""

import dataclasses
import hashlib
import math
from typing import Callable, Sequence

import tensorflow as tf

# The map functions here are plain TensorFlow ops, left alone by AutoGraph as the decode functions are.
from trainer.input.images import plain_graph

# How an epoch is shuffled (`load`): a permutation of the whole share, or, over what cannot be held whole (a disk
# cache, a stream of records), the share stored in a seeded random order and shuffled in a bounded buffer.
WHOLE, BUFFERED = "whole", "buffered"


@dataclasses.dataclass(frozen=True)
class Shard:
  """This worker's share of every split: examples index, index + count, ... of the list."""
  index: int = 0
  count: int = 1


@dataclasses.dataclass(frozen=True)
class SplitList:
  """A split before decoding: the encoded examples of this worker's share, in order, and what identifies them."""
  encoded: tf.data.Dataset  # (string bytes, int32 label, float32 weight, int64 id), padded
  labels: tuple[int, ...]  # this worker's real examples
  ids: tuple[int, ...]
  all_labels: tuple[int, ...]
  padded_length: int
  identity: str
  paths: tuple[str, ...] | None = None
  # `encoded` holds file names, read when decoded: cheap to shuffle whole before decoding (records take a bounded
  # buffer).
  items_are_paths: bool = False
  record_name: Callable[[int], str] | None = None  # id -> "SHARD record N" of a TFRecord record
  order: str = ""  # WHOLE or BUFFERED; '' until the cache is chosen


def share_of(paths: Sequence[str], shard: Shard) -> list[tuple[str, int]]:
  return [(paths[index], index) for index in range(shard.index, len(paths), shard.count)]


def padded_length(total: int, workers: int, multiple: int) -> int:
  """Elements of every worker's share: its examples, padded to the largest share, rounded up to `multiple`."""
  return math.ceil(math.ceil(total / workers) / multiple) * multiple if total else 0


def padded(encoded: tf.data.Dataset, labels: Sequence[int], ids: Sequence[int], length: int) -> tf.data.Dataset:
  """(encoded, label, weight, id) of the share, then copies of its first examples with weight 0 up to `length`."""
  count = len(labels)
  pad = length - count
  real = tf.data.Dataset.zip(encoded, tf.data.Dataset.from_tensor_slices(
      (tf.constant(labels, tf.int32), tf.ones([count], tf.float32), tf.constant(ids, tf.int64))))
  real = real.map(plain_graph(lambda item, rest: (item, *rest)))
  if pad <= 0 or not count:
    return real
  # A share can be shorter than `pad` (its worker skipped many files): repeat it as often as needed.
  padding = real.repeat(math.ceil(pad / count)).take(pad)
  return real.concatenate(padding.map(plain_graph(lambda item, label, weight, index: (item, label, 0.0 * weight,
                                                                                     index))))


def digest(lines: Sequence[str]) -> str:
  return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
