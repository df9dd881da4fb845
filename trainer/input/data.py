"""Input: any source (folders, CSV, TFDS, TFRecord) as checked, decoded, cached tf.data pipelines, per worker.

`load` is the one entry point. Each split (train, val) is a list of examples (a file, a TFDS record, a TFRecord
record) with a global id. A worker of a multi-worker run takes its own disjoint share of that list *before*
anything is decoded (`Shard`), checks and decodes only that share, and caches it (`--cache`: memory, disk, or
none to decode every epoch). Every share is padded to the same length with copies of its own examples of weight
0, so that every worker runs the same number of steps (the collectives never wait for a worker that ran out) and
the loss and metrics still count every real example exactly once per epoch.

An element is (uint8 image [S, S, 3], int32 label, float32 weight (1 real, 0 padding), int64 id). Images are
decoded by `images.load`, the function the serving graph uses, so training and serving see the same pixels.
Decoding keeps the list's order, so an epoch's seeded shuffle is the same permutation in every process: a run
stopped mid-epoch replays the same batches. Before anything is decoded every file's header and content hash are
read (`trainer.input.data_checks`). Each file is decoded once in a first epoch: filling the cache of a folder or CSV
source drops the files that fail to decode; otherwise such an item becomes a stand-in of weight 0
(`_decode_or_stand_in`). Either way it is warned about and listed in the report (--strict_data: refused before
training).

Data never imports the model: preprocessing for the backbone and augmentation happen in the model and the train
step.
"""

import collections
import dataclasses
import glob
import hashlib
import itertools
import math
import os
import shutil
import socket
import threading
import uuid
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from trainer import config_checks
from trainer.config import DataConfig
from trainer.errors import UserInputError
from trainer.input import data_checks, images, sources
from trainer.loop import checkpoints
from trainer.runtime import workdir as workdir_lib

# Decoded images may take this share of the machine's memory when --memory_budget is not given.
_MEMORY_SHARE = 0.25
# A disk cache is chosen only when the disk keeps this much room besides it.
_DISK_MARGIN = 1 << 30
# Largest shuffle buffer of a disk cache or of streamed records (elements held in memory at once).
_MAX_SHUFFLE_BUFFER = 10_000
# ... and at most these bytes of decoded images (or records), whatever the memory budget: memory stays bounded.
_MAX_SHUFFLE_BYTES = 256 << 20
# Bumped when `images.load` changes what pixels a file gives: old cache files must not be reused.
_PIXELS_VERSION = 3
# How an epoch is shuffled (`load`): a permutation of the whole share, or, over what cannot be held whole (a disk
# cache, a stream of records), the share stored in a seeded random order and shuffled in a bounded buffer.
WHOLE, BUFFERED = "whole", "buffered"
# Examples decoded together where an undecodable one becomes a stand-in (`_decode_or_stand_in`).
_DECODE_CHUNK = 64
# The pipelines' map functions are plain TensorFlow ops: AutoGraph, which tf.data runs on each of them, need not
# parse and rewrite them (as for trainer.input.images: ~0.4 s of CPU of every data.load, and of every epoch without a
# cache, which builds its pipeline anew).
_plain_graph = tf.autograph.experimental.do_not_convert


@dataclasses.dataclass(frozen=True)
class Shard:
  """This worker's share of every split: examples index, index + count, ... of the list."""
  index: int = 0
  count: int = 1


@dataclasses.dataclass(frozen=True)
class CacheChoice:
  mode: str  # memory | disk | none
  reason: str
  path: str = ""  # the disk cache's file prefix


@dataclasses.dataclass(frozen=True)
class Examples:
  """One split as this worker sees it.

  labels, paths, ids: this worker's examples in order (paths only for file sources); without a cache (or with
  --data_service, or a TFRecord or TFDS source) they include the items no epoch has yet found undecodable.
  all_labels: every example of the split over all workers. `epoch(seed)` gives this worker's padded share,
  shuffled by the seed (in order for None), as elements (uint8 image, label, weight, id), an undecodable item as
  a stand-in of weight 0 and id -1 - id; `images` its real examples in order as (float32 image in 0..255, label),
  for extraction and evaluation (`images_with_ids` with their ids). `note_undecodable(ids)`: examples found
  undecodable elsewhere (features extracted by an earlier process) are named like those an epoch meets.
  """
  labels: tuple[int, ...]
  all_labels: tuple[int, ...]
  ids: tuple[int, ...]
  padded_length: int
  cache: CacheChoice
  epoch: Callable[[int | None], tf.data.Dataset]
  paths: tuple[str, ...] | None = None
  failures: "_DecodeFailures | None" = None
  order: str = WHOLE  # How epochs are shuffled (see `load`): recorded with the run, so that a resume keeps it.

  def __len__(self) -> int:
    return len(self.labels)

  def note_undecodable(self, ids) -> None:
    for index in ids:
      if self.failures is not None:
        self.failures.record(int(index))

  @property
  def images(self) -> tf.data.Dataset:
    return self.images_with_ids.map(_plain_graph(lambda image, label, index: (image, label)))

  @property
  def images_with_ids(self) -> tf.data.Dataset:
    """(float32 image, label, id) of the real examples in order: without a cache, a file found undecodable is
    not among them, so whatever is computed from them (features) keeps the ids it was computed for."""
    real = self.epoch(None).filter(_plain_graph(lambda image, label, weight, index: weight > 0))
    return real.map(_plain_graph(lambda image, label, weight, index: (tf.cast(image, tf.float32), label, index)))


@dataclasses.dataclass(frozen=True)
class InputData:
  classes: tuple[str, ...]
  train: Examples
  val: Examples
  skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # unusable file (of this worker) -> why
  identity: str = ""  # digest of every example this worker trains and validates on, and of the image size
  # File sources: every file of this worker's share -> "split<TAB>class<TAB>content hash" (whatever the cache
  # mode), so that a resume can say which files were added, removed or changed (trainer.runtime.workdir.data_changes).
  manifest: dict[str, str] = dataclasses.field(default_factory=dict)

  @property
  def data_identity(self) -> str:
    """What the run's checkpoints were trained on, independent of where decoded images are kept."""
    if not self.manifest:
      return self.identity
    return _digest(sorted(f"{name}\t{entry}" for name, entry in self.manifest.items()))


@dataclasses.dataclass(frozen=True)
class _SplitList:
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


def load(config: DataConfig, image_size: int, cache_root: str = "", shard: Shard = Shard(),
         pad_multiple: int = 1, order: str = "") -> InputData:
  """The checked, decoded and cached train and val data of this worker.

  cache_root: where the disk cache goes when --cache_dir is not set. pad_multiple: every worker's share is
  padded to the same multiple of this (the examples of one step over this worker's replicas).

  order: how epochs are shuffled, so that an epoch depends on the seed alone, never on where decoded images live:
  '' lets the cache decide (WHOLE in memory and for files decoded every epoch, BUFFERED from a disk cache); a
  resumed run passes the order it started with (Examples.order, recorded in config.json). Every mode can give a
  BUFFERED epoch; a WHOLE one cannot come from a disk cache, so such a run decodes every epoch instead.
  """
  source = sources.chosen(config)
  budget = config_checks.memory_budget(config.memory_budget) or _default_memory_budget()
  folder = config.cache_dir or cache_root
  if folder and shard.count > 1:
    folder = os.path.join(folder, f"worker_{shard.index}")  # Two workers writing one cache file collide.
  skipped: dict[str, str] = {}
  manifest: dict[str, str] = {}
  if source in ("data_dir", "csv"):
    classes, train_examples, val_examples, skipped, train, val, manifest = _file_examples(
        config, shard, pad_multiple, image_size, budget, folder, order)
  else:
    if source == "tfds":
      classes, train, val = _tfds_lists(config, shard, pad_multiple)
    else:
      classes, train, val, skipped = _tfrecord_lists(config, shard, pad_multiple)
    skipped = dict(skipped)  # Also gets the records that fail to decode in an epoch (`_DecodeFailures`).
    where = f"--{source}={getattr(config, source)}"
    train_examples = _decoded(train, image_size, config, budget, folder,
                              failures=_DecodeFailures(skipped, f"{where} training", train.record_name), order=order)
    val_examples = _decoded(val, image_size, config, _budget_left(budget, train_examples, image_size), folder,
                            failures=_DecodeFailures(skipped, f"{where} validation", val.record_name), order=order)
  for name, examples in (("train", train_examples), ("val", val_examples)):
    logging.info("%s: %d images, cache %s (%s).", name, len(examples), examples.cache.mode, examples.cache.reason)
  identity = hashlib.sha256(f"{image_size}\n{_PIXELS_VERSION}\n{train.identity}\n{val.identity}".encode())
  return InputData(classes, train_examples, val_examples, skipped, identity.hexdigest()[:16], manifest)


# Sources ---------------------------------------------------------------------------------------------------------


def _file_examples(config: DataConfig, shard: Shard, pad_multiple: int, image_size: int, budget: int, folder: str,
                   order: str):
  """Folder and CSV sources. Every file is decoded once in a first epoch: a split whose decoded images are kept
  (memory or disk cache) decodes in the pass that fills the cache, which drops the files that cannot be decoded.
  Without a cache (or with --data_service, whose workers decode) a file that fails to decode becomes a stand-in of
  weight 0 when an epoch meets it, and is then named and counted (`_DecodeFailures`). --strict_data decodes every
  such file before training instead, to refuse a bad one before anything trains."""
  files = sources.find_files(config)
  skipped = dict(files.skipped)
  splits = (files.train, files.val)
  shares = [_share(split.paths, shard) for split in splits]
  lengths = [padded_length(len(split.labels), shard.count, pad_multiple) for split in splits]
  train_cache = _keeping_order(choose_cache(config.cache, lengths[0], image_size, budget, folder), order)
  val_cache = _keeping_order(choose_cache(config.cache, lengths[1], image_size, budget - (
      lengths[0] * _bytes_per_image(image_size) if train_cache.mode == "memory" else 0), folder), order)
  orders = [order or (BUFFERED if cache.mode == "disk" else WHOLE) for cache in (train_cache, val_cache)]
  prefill = [cache.mode != "none" and not config.data_service for cache in (train_cache, val_cache)]
  decode_first = [path for share, filled in zip(shares, prefill) if not filled and config.strict_data
                  for path, _ in share]
  scan = data_checks.scan([path for share in shares for path, _ in share], config.max_image_pixels,
                          decode=set(decode_first))
  unreadable = dict(scan.unreadable)
  # Also gets the files that fail to decode in an epoch.
  reported = {**skipped, **unreadable}
  manifest = {path: f"{name}\t{files.classes[split.labels[index]]}\t{scan.digests.get(path, 'unreadable')}"
              for name, split, share in zip(("train", "val"), splits, shares) for path, index in share}
  examples, lists = [], []
  for name, split, share, length, cache, fill, split_order in zip(("training", "validation"), splits, shares,
                                                                  lengths, (train_cache, val_cache), prefill, orders):
    usable = [(path, index) for path, index in share if path not in unreadable]
    if split_order == BUFFERED:
      # Read in order and shuffled in a bounded buffer: stored in a seeded random order, its batches are not runs
      # of one class (folders list each class's files together).
      usable = [usable[i] for i in np.random.default_rng(config.seed).permutation(len(usable))]
    identity = _digest([f"{scan.digests[path]}\t{split.labels[index]}\t{index}" for path, index in usable]
                       + [f"padded to {length}"])
    if cache.mode == "disk":
      cache = dataclasses.replace(cache, path=os.path.join(folder, f"images_{image_size}_{identity}"))
    if fill:
      decoded, usable = _filled_cache(usable, image_size, cache, unreadable)
    labels = tuple(split.labels[index] for _, index in usable)
    paths, ids = tuple(path for path, _ in usable), tuple(index for _, index in usable)
    # One worker knows every file it skipped: the split's count is what it trains on (config.json said 33 with 32
    # trained on). A worker of several knows only its own share's skipped files, so the listing's count stays.
    all_labels = labels if shard.count == 1 else tuple(split.labels)
    listed = _SplitList(None, labels, ids, all_labels, length, identity, paths, items_are_paths=True,
                        order=split_order)
    if fill:
      examples.append(_cached_examples(listed, _padded(decoded, labels, ids, length), cache, image_size))
    else:
      # File names, read when decoded: an epoch's shuffle then holds names, not file contents.
      encoded = _padded(tf.data.Dataset.from_tensor_slices(list(paths)), labels, ids, length)
      failures = _DecodeFailures(reported, f"{name} file", dict(zip(ids, paths)).get, files=True)
      examples.append(_decoded(dataclasses.replace(listed, encoded=encoded), image_size, config, budget, folder,
                               cache, failures))
    lists.append(listed)
  reported.update(unreadable)  # The files the cache fills dropped.
  data_checks.report_unreadable(reported, config.strict_data)
  train, val = lists
  if shard.count == 1:
    # With shares, a worker's share may lack a class; the listing already has every class.
    empty = [name for name, count in zip(files.classes, class_counts(train.labels, len(files.classes))) if not count]
    if empty:
      raise UserInputError(f"Class(es) {empty} have no usable training images left after skipping "
                           f"{len(unreadable)} unusable file(s). Add readable images of those classes.")
  data_checks.warn_leakage(data_checks.leaked(train.paths, val.paths, scan.digests))
  return files.classes, examples[0], examples[1], reported, train, val, manifest


def _keeping_order(cache: CacheChoice, order: str) -> CacheChoice:
  """A disk cache cannot give the WHOLE shuffle a run started with (in memory, or decoding every epoch): such a run
  decodes every epoch instead, so that its resumed epochs are the ones it would have trained."""
  if order == WHOLE and cache.mode == "disk":
    return CacheChoice("none", f"{cache.reason}; but this run started with its epochs shuffled whole, which a disk "
                       "cache cannot give: decoded every epoch to keep the run's order")
  return cache


def _filled_cache(usable: list[tuple[str, int]], image_size: int, cache: CacheChoice, unreadable: dict[str, str]):
  """Decodes the files into the cache once; the ones that fail to decode are dropped (their reason, from the
  decoder, goes into `unreadable`). Returns the cached (uint8 image) dataset of the good files and those files."""
  paths = [path for path, _ in usable]
  positions = tf.data.Dataset.range(len(paths))
  decoded = tf.data.Dataset.zip(tf.data.Dataset.from_tensor_slices(paths), positions).map(
      _plain_graph(lambda path, position: (images.load(tf.io.read_file(path), image_size), position)),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
  if cache.mode == "disk":
    decoded, good = _shared_disk_cache(decoded, cache.path, len(paths) * _bytes_per_image(image_size))
  else:
    decoded = decoded.cache()
    good = _positions_in(decoded)
  for position, (path, _) in enumerate(usable):
    if position not in good:
      unreadable[path] = data_checks.why_it_failed(path)
  kept = [item for position, item in enumerate(usable) if position in good]
  return decoded.map(_plain_graph(lambda image, position: image)), kept


def _positions_in(decoded: tf.data.Dataset) -> set[int]:
  """The positions of the elements of (image, position) `decoded`, read through once (which fills its cache)."""
  good = set()
  for batch in decoded.map(_plain_graph(lambda image, position: position)).batch(4096):
    good.update(batch.numpy().tolist())
  return good


def _shared_disk_cache(decoded: tf.data.Dataset, prefix: str, needed: int) -> tuple[tf.data.Dataset, set[int]]:
  """`decoded` cached in the files of `prefix`, and the positions they hold.

  Runs that share a --cache_dir may need the same cache at once (tf.data's writer then failed with AlreadyExists
  on its lock file): each process fills a file of its own (host and PID in its name) and publishes it under
  `prefix` by renaming, unless another published first. A published cache that does not read back whole (a
  truncated file: OutOfRange on every rerun) is set aside in corrupt/ with one warning and filled again."""
  if os.path.exists(f"{prefix}.index"):
    try:
      return decoded.cache(prefix), _positions_in(decoded.cache(prefix))
    # A truncated file surfaces as InternalError ("FileCacheImpl returned OutOfRange"), others as these.
    except (tf.errors.OutOfRangeError, tf.errors.DataLossError, tf.errors.InvalidArgumentError,
            tf.errors.InternalError, tf.errors.NotFoundError) as e:
      aside = _set_aside(prefix)
      logging.warning("The disk cache %s does not read back (%s): moved to %s; decoding the images again.",
                      prefix, e.message.strip().splitlines()[0][:160], aside)
  own = _writer_prefix(prefix, os.getpid())
  os.makedirs(os.path.dirname(prefix), exist_ok=True)
  _remove_dead_writers(prefix)
  try:
    good = _positions_in(decoded.cache(own))
  except tf.errors.OpError as e:
    if not any(words in e.message for words in checkpoints.DISK_FULL):
      raise
    for path in glob.glob(glob.escape(own) + "*"):
      os.remove(path)
    raise UserInputError(f"The disk holding {os.path.dirname(prefix)} is full: the decoded-image cache needs "
                         f"{needed / 2**20:.0f} MiB ({_free_bytes(prefix) / 2**20:.0f} MiB free). Free space there, "
                         "pass --cache_dir=FOLDER on a larger disk, or --cache=none to decode every epoch.") from None
  files = glob.glob(glob.escape(own) + "*")
  if os.path.exists(f"{prefix}.index"):  # Another run published the same cache meanwhile: keep one.
    for path in files:
      os.remove(path)
  else:
    # The index last: a cache is complete when its index exists.
    for path in sorted(files, key=lambda path: path.endswith(".index")):
      os.replace(path, prefix + path[len(own):])
  return decoded.cache(prefix), good


def _set_aside(prefix: str) -> str:
  folder = os.path.join(os.path.dirname(prefix), "corrupt")
  os.makedirs(folder, exist_ok=True)
  for path in glob.glob(glob.escape(prefix) + ".*"):
    if not _is_writer_file(prefix, path):
      os.replace(path, os.path.join(folder, os.path.basename(path)))
  return folder


def _writer_prefix(prefix: str, pid: int | str) -> str:
  """Where process `pid` of this host fills the cache of `prefix` before publishing it (no host name has '@'); a
  random part keeps two fills of one process apart."""
  return f"{prefix}.{pid}@{socket.gethostname()}.{uuid.uuid4().hex[:8]}.fill"


def _is_writer_file(prefix: str, path: str) -> bool:
  return "@" in path[len(prefix):]


def _remove_dead_writers(prefix: str) -> None:
  """The files of fills of `prefix` that a killed process of this host left (its PID no longer runs)."""
  for path in glob.glob(f"{glob.escape(prefix)}.*@{glob.escape(socket.gethostname())}.*.fill*"):
    pid = path[len(prefix) + 1:].split("@")[0]
    if pid.isdigit() and not workdir_lib.process_runs(int(pid)):
      if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
      else:
        os.remove(path)


def _cached_examples(listed: _SplitList, padded: tf.data.Dataset, cache: CacheChoice, image_size: int,
                     failures: "_DecodeFailures | None" = None) -> Examples:
  """Examples of a split whose decoded images are cached: each epoch a seeded shuffle of `padded`. With
  `failures`, its stand-ins are recorded as they pass in every epoch: a cache filled by an earlier process holds
  them too."""
  buffer = _shuffle_buffer(listed, image_size)

  def epoch(seed):
    shuffled = padded if seed is None else padded.shuffle(max(buffer, 1), seed=seed, reshuffle_each_iteration=False)
    return _with_options(failures.recorded(shuffled) if failures else shuffled)
  return Examples(listed.labels, listed.all_labels, listed.ids, listed.padded_length, cache, epoch, listed.paths,
                  failures, listed.order)


def _budget_left(budget: int, examples: Examples, image_size: int) -> int:
  used = examples.padded_length * _bytes_per_image(image_size) if examples.cache.mode == "memory" else 0
  return max(budget - used, 0)


def _shuffle_buffer(split: _SplitList, image_size: int) -> int:
  """Elements of an epoch's shuffle: the whole share, or for a BUFFERED order at most _MAX_SHUFFLE_BUFFER elements
  and _MAX_SHUFFLE_BYTES of decoded images. Never the memory budget: the order must not change with it."""
  if split.order == WHOLE:
    return split.padded_length
  return min(split.padded_length, _MAX_SHUFFLE_BUFFER, max(1, _MAX_SHUFFLE_BYTES // _bytes_per_image(image_size)))


def _share(paths: Sequence[str], shard: Shard) -> list[tuple[str, int]]:
  return [(paths[index], index) for index in range(shard.index, len(paths), shard.count)]


def _tfds_lists(config: DataConfig, shard: Shard, pad_multiple: int):
  splits = sources.tfds_splits(config)
  lists = []
  for name, encoded, labels in (("train", splits.train, splits.train_labels),
                                ("val", splits.val, splits.val_labels)):
    ids = tuple(range(shard.index, len(labels), shard.count))
    mine = encoded.enumerate().filter(lambda index, example: index % shard.count == shard.index)
    mine = mine.map(lambda index, example: example[0])
    length = padded_length(len(labels), shard.count, pad_multiple)
    # The labels stand in for the content: TFDS records have no file to hash.
    identity = _digest([f"tfds:{config.tfds}:{config.tfds_data_dir}:{name}:{config.validation_split}:{config.seed}",
                        ",".join(map(str, labels)), f"share {shard.index}/{shard.count} padded to {length}"])
    own_labels = tuple(labels[index] for index in ids)
    lists.append(_SplitList(_padded(mine, own_labels, ids, length), own_labels, ids, tuple(labels), length,
                            identity))
  return splits.classes, lists[0], lists[1]


def _tfrecord_lists(config: DataConfig, shard: Shard, pad_multiple: int):
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
    identity = _digest([scan.identity, name, f"{config.validation_split}:{config.seed}",
                        f"share {shard.index}/{shard.count} padded to {length}"])
    encoded = _padded(records.map(_plain_graph(lambda image, label: image)), own_labels, ids, length)
    lists.append(_SplitList(encoded, own_labels, ids, all_labels, length, identity,
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


def padded_length(total: int, workers: int, multiple: int) -> int:
  """Elements of every worker's share: its examples, padded to the largest share, rounded up to `multiple`."""
  return math.ceil(math.ceil(total / workers) / multiple) * multiple if total else 0


def _padded(encoded: tf.data.Dataset, labels: Sequence[int], ids: Sequence[int], length: int) -> tf.data.Dataset:
  """(encoded, label, weight, id) of the share, then copies of its first examples with weight 0 up to `length`."""
  count = len(labels)
  pad = length - count
  real = tf.data.Dataset.zip(encoded, tf.data.Dataset.from_tensor_slices(
      (tf.constant(labels, tf.int32), tf.ones([count], tf.float32), tf.constant(ids, tf.int64))))
  real = real.map(_plain_graph(lambda item, rest: (item, *rest)))
  if pad <= 0 or not count:
    return real
  # A share can be shorter than `pad` (its worker skipped many files): repeat it as often as needed.
  padding = real.repeat(math.ceil(pad / count)).take(pad)
  return real.concatenate(padding.map(_plain_graph(lambda item, label, weight, index: (item, label, 0.0 * weight,
                                                                                     index))))


# Decoding and caching -------------------------------------------------------------------------------------------


def _decoded(split: _SplitList, image_size: int, config: DataConfig, budget: int, folder: str,
             cache: CacheChoice | None = None, failures: "_DecodeFailures | None" = None,
             order: str = "") -> Examples:
  """Examples that decode `split.encoded` (into a cache when the mode keeps decoded images). An item that fails to
  decode becomes a stand-in of weight 0, named by `failures` when an epoch meets it."""
  cache = cache or choose_cache(config.cache, split.padded_length, image_size, budget, folder, split.identity)
  if not split.order:
    # Records stream from their files and only a memory cache could hold them whole: every mode shuffles them in a
    # bounded buffer, so that a resume whose cache moved trains the epochs an uninterrupted run would (records are
    # written shuffled: trainer.input.tfrecords.convert). A run an earlier version started WHOLE keeps that order while
    # memory holds its records.
    whole = order == WHOLE and cache.mode == "memory"
    if order == WHOLE and not whole:
      logging.warning("This run started with its records shuffled whole in memory; they are now %s (%s), so the "
                      "resumed epochs are shuffled in a buffer: not the order an uninterrupted run would have. Give "
                      "--memory_budget room for them to keep it.", cache.mode, cache.reason)
    split = dataclasses.replace(split, order=WHOLE if whole else BUFFERED)

  def decode(dataset: tf.data.Dataset) -> tf.data.Dataset:
    decoded = _decode_or_stand_in(dataset, image_size, split.items_are_paths)
    if config.data_service:
      from trainer.input import service  # Only --data_service needs it.
      # A job of its own for this worker's share: the service's workers decode it, and this trainer, its only
      # consumer, receives every element once (in the order they finish, so resumes are not bit-exact).
      decoded = service.distribute(decoded, config.data_service, elements=split.padded_length,
                                   job_name=f"transfer-trainer-{uuid.uuid4().hex}")
    return decoded

  if cache.mode == "none":
    # Shuffle what is cheap to hold (file names), then decode; records are shuffled in a bounded buffer.
    buffer = _shuffle_buffer(split, image_size)

    def epoch(seed):
      encoded = split.encoded if seed is None else split.encoded.shuffle(max(buffer, 1), seed=seed,
                                                                          reshuffle_each_iteration=False)
      decoded = decode(encoded)
      return _with_options(failures.recorded(decoded) if failures else decoded)
    return Examples(split.labels, split.all_labels, split.ids, split.padded_length, cache, epoch, split.paths,
                    failures, split.order)
  return _cached_examples(split, _cached(decode(split.encoded), cache), cache, image_size, failures)


def _decode_or_stand_in(encoded: tf.data.Dataset, image_size: int, items_are_paths: bool) -> tf.data.Dataset:
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
        _plain_graph(lambda position, item: (position, images.load(tf.io.read_file(item) if items_are_paths else item,
                                                                   image_size))),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
    nothing = tf.data.Dataset.from_tensors((tf.zeros([0], tf.int32),
                                            tf.zeros([0, image_size, image_size, 3], tf.uint8)))
    positions, pixels = survivors.batch(_DECODE_CHUNK).concatenate(nothing).take(1).get_single_element()
    decoded = tf.scatter_nd(positions[:, None], tf.ones_like(positions), [count]) > 0
    pixels = tf.cond(tf.size(positions) == count, lambda: pixels,
                     lambda: tf.scatter_nd(positions[:, None], pixels, [count, image_size, image_size, 3]))
    return pixels, labels, tf.where(decoded, weights, 0.0), tf.where(decoded, ids, -1 - ids)

  chunks = encoded.batch(_DECODE_CHUNK).map(_plain_graph(decode_chunk), num_parallel_calls=tf.data.AUTOTUNE,
                                            deterministic=True)
  return chunks.unbatch()


class _DecodeFailures:
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
    return decoded.map(_plain_graph(record))

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


def _cached(decoded: tf.data.Dataset, cache: CacheChoice) -> tf.data.Dataset:
  """`decoded` kept where the cache choice says: memory or its disk file (a half-written one removed first)."""
  if cache.mode == "memory":
    return decoded.cache()
  _remove_unfinished_cache(cache.path)
  return decoded.cache(cache.path)


def choose_cache(mode: str, count: int, image_size: int, budget: int, folder: str, identity: str = "") -> CacheChoice:
  """--cache: auto picks memory when the decoded images fit the budget, else disk when the disk has room, else
  none (decode every epoch)."""
  needed = count * _bytes_per_image(image_size)
  path = os.path.join(folder, f"images_{image_size}_{identity}") if folder else ""
  size = f"{count} images x {_bytes_per_image(image_size):,} B = {needed / 2**20:.1f} MiB"
  if mode == "memory" or (mode == "auto" and needed <= budget):
    fits = "fit" if needed <= budget else "exceed"
    return CacheChoice("memory", f"{size} {fits} the memory budget of {budget / 2**20:.0f} MiB")
  if mode == "none":
    return CacheChoice("none", "--cache=none: decoded every epoch")
  if not folder:
    return CacheChoice("none", f"{size} exceed the memory budget and there is no cache folder")
  free = _free_bytes(folder)
  if mode == "disk":
    if free < needed:
      raise UserInputError(f"--cache=disk: {folder} has {free / 2**20:.0f} MiB free and the cache needs "
                           f"{needed / 2**20:.0f} MiB. Free some space, pass --cache_dir=FOLDER on a larger disk, "
                           "or --cache=none to decode every epoch.")
    return CacheChoice("disk", f"--cache=disk: {size} in {folder}", path)
  if free >= needed + _DISK_MARGIN:
    return CacheChoice("disk", f"{size} exceed the memory budget of {budget / 2**20:.0f} MiB; {folder} has room",
                       path)
  return CacheChoice("none", f"{size} fit neither the memory budget of {budget / 2**20:.0f} MiB nor the "
                     f"{free / 2**20:.0f} MiB free in {folder}: decoded every epoch")


def _bytes_per_image(image_size: int) -> int:
  return image_size * image_size * 3


def _free_bytes(folder: str) -> int:
  probe = folder
  while probe and not os.path.exists(probe):
    probe = os.path.dirname(probe)
  return shutil.disk_usage(probe or ".").free


def _remove_unfinished_cache(prefix: str) -> None:
  """A cache that a killed run left half-written has a lock file and no index: tf.data would refuse it."""
  os.makedirs(os.path.dirname(prefix), exist_ok=True)
  if not os.path.exists(f"{prefix}.index"):
    for path in glob.glob(glob.escape(prefix) + "*"):
      if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
      else:
        os.remove(path)


def _default_memory_budget() -> int:
  try:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * _MEMORY_SHARE)
  except (ValueError, OSError, AttributeError):  # No sysconf (Windows): assume a modest machine.
    return 2 << 30


def _with_options(dataset: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True
  # Every worker already reads only its own share (see `Shard`).
  options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
  return dataset.with_options(options)


def _digest(lines: Sequence[str]) -> str:
  return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


# Batches, labels and samples ------------------------------------------------------------------------------------


def batches(decoded: tf.data.Dataset, batch_size: int, shuffle_seed: int | None = None) -> tf.data.Dataset:
  """Batches of an unbatched dataset held in memory (features, `Examples.images`); shuffled when seeded."""
  dataset = decoded
  if shuffle_seed is not None:
    dataset = dataset.shuffle(buffer_size=_MAX_SHUFFLE_BUFFER, seed=shuffle_seed, reshuffle_each_iteration=False)
  return _with_options(dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE))


def class_counts(labels: Sequence[int], num_classes: int) -> list[int]:
  counts = collections.Counter(labels)
  return [counts.get(label, 0) for label in range(num_classes)]


def class_weights(choice: str, labels: Sequence[int], num_classes: int) -> list[float] | None:
  """--class_weight: None for '' (every example weighs the same); for balanced, n / (classes * count) per class,
  so that every class weighs the same in the loss in total (scikit-learn's "balanced")."""
  if not choice:
    return None
  counts = class_counts(labels, num_classes)
  return [len(labels) / (num_classes * count) if count else 0.0 for count in counts]


def sample_files(examples: Examples, folder: str, count: int) -> tuple[str, ...]:
  """Up to `count` images of a split as files: the source's own files that decode (without a cache, the split
  still lists the ones no epoch has met yet), or lossless PNGs of its decoded images written to `folder` (TFDS
  and TFRecord have no files). The export is checked on them."""
  if examples.paths is not None:
    decodable = (path for path in examples.paths if data_checks.check_file(path, max_pixels=2**62)[0] is None)
    return tuple(itertools.islice(decodable, count))
  os.makedirs(folder, exist_ok=True)
  paths = []
  for index, (image, _) in enumerate(examples.images.take(count)):
    paths.append(os.path.join(folder, f"{index}.png"))
    tf.io.write_file(paths[-1], tf.io.encode_png(tf.cast(image, tf.uint8)))
  return tuple(paths)
