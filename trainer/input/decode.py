"""Decoding a split's items in order, an item that fails becoming a stand-in of weight 0 (so that an epoch keeps its
length on every worker), and the one collector of the failures an epoch meets (`DecodeFailures`).
"""

import threading
from typing import Callable

import tensorflow as tf
from absl import logging

from trainer.input import data_checks, images
from trainer.input.split import plain_graph

# Examples decoded together where an undecodable one becomes a stand-in (`decode_or_stand_in`).
_DECODE_CHUNK = 64


def decode_or_stand_in(encoded: tf.data.Dataset, image_size: int, items_are_paths: bool) -> tf.data.Dataset:
  """(item, label, weight, id) elements to (uint8 image, label, weight, id), in order (deterministic: a seeded
  shuffle before it is the same permutation in every process and after a restart). An item that cannot be read
  or decoded becomes a stand-in: a black image of weight 0 whose id is -1 - id. So an epoch keeps its length
  (every worker runs the same steps) without a pass that decodes every file before training, and the stand-in
  says which example failed, also from a tf.data service's worker.

  tf.data drops a failed element (`ignore_errors`) but cannot put another in its place: the items are decoded in
  chunks, each chunk's survivors put back at their positions.
  """
  def decode_chunk(items, labels, weights, ids):
    count = tf.shape(items)[0]
    survivors = tf.data.Dataset.from_tensor_slices((tf.range(count), items)).map(
        plain_graph(lambda position, item: (position, images.load(tf.io.read_file(item) if items_are_paths else item,
                                                                   image_size))),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
    nothing = tf.data.Dataset.from_tensors((tf.zeros([0], tf.int32),
                                            tf.zeros([0, image_size, image_size, 3], tf.uint8)))
    positions, pixels = survivors.batch(_DECODE_CHUNK).concatenate(nothing).take(1).get_single_element()
    decoded = tf.scatter_nd(positions[:, None], tf.ones_like(positions), [count]) > 0
    pixels = tf.cond(tf.size(positions) == count, lambda: pixels,
                     lambda: tf.scatter_nd(positions[:, None], pixels, [count, image_size, image_size, 3]))
    return pixels, labels, tf.where(decoded, weights, 0.0), tf.where(decoded, ids, -1 - ids)

  chunks = encoded.batch(_DECODE_CHUNK).map(plain_graph(decode_chunk), num_parallel_calls=tf.data.AUTOTUNE,
                                            deterministic=True)
  return chunks.unbatch()


class DecodeFailures:
  """The examples of one split that failed to decode in an epoch, found by their stand-ins' ids: each is warned
  about once and added to `skipped` (the run's report lists them). A file is named by its path and checked again
  for the decoder's message; a TFRecord record by its shard and number; a TFDS record by its id."""

  def __init__(self, skipped: dict[str, str], kind: str, name_of: Callable[[int], str | None] | None = None,
               files: bool = False):
    self._skipped, self._kind, self._name_of, self._files = skipped, kind, name_of or (lambda index: None), files
    self._lock = threading.Lock()

  def recorded(self, decoded: tf.data.Dataset) -> tf.data.Dataset:
    """`decoded`, its stand-ins recorded as they pass (here, in the trainer: not on a tf.data service)."""
    def record(image, label, weight, index):
      def stand_in():
        recorded = tf.py_function(self._record_stand_in, [index], tf.int64)
        recorded.set_shape([])
        return recorded
      return image, label, weight, tf.cond(index < 0, stand_in, lambda: index)
    return decoded.map(plain_graph(record))

  def _record_stand_in(self, stand_in_id: tf.Tensor) -> tf.Tensor:
    self.record(-1 - int(stand_in_id))
    return stand_in_id

  def record(self, index: int) -> None:
    """Names example `index` as undecodable, once."""
    name = self._name_of(index) or f"{self._kind} record {index}"
    with self._lock:
      if name in self._skipped:
        return
      self._skipped[name] = "its image cannot be decoded"  # Claimed: another thread does not check it again.
    if self._files:
      self._skipped[name] = data_checks.why_it_failed(name)
    logging.warning("Skipping %s: %s. Found while decoding it: it weighs nothing in this run (all skipped files "
                    "are listed in report/metrics.json).", name, self._skipped[name])
