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
(`decode_or_stand_in`). Either way it is warned about and listed in the report (--strict_data: refused before
training).

Data never imports the model: preprocessing for the backbone and augmentation happen in the model and the train
step.
"""

import collections
import dataclasses
import hashlib
import itertools
import os
import uuid
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from trainer import config_checks
from trainer.config import DataConfig
from trainer.errors import UserInputError
from trainer.input import data_checks, record_sources, sources
from trainer.input.cache import (
  CacheChoice,
  bytes_per_image,
  cached,
  choose_cache,
  default_memory_budget,
  filled,
  keeping_order,
)
from trainer.input.decode import DecodeFailures, decode_or_stand_in
from trainer.input.images import plain_graph
from trainer.input.split import BUFFERED, WHOLE, Shard, SplitList, digest, padded, padded_length, share_of

# Largest shuffle buffer of a disk cache or of streamed records (elements held in memory at once).
_MAX_SHUFFLE_BUFFER = 10_000
# ... and at most these bytes of decoded images (or records), whatever the memory budget: memory stays bounded.
_MAX_SHUFFLE_BYTES = 256 << 20
# Bumped when `images.load` changes what pixels a file gives: old cache files must not be reused.
_PIXELS_VERSION = 3


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
  failures: "DecodeFailures | None" = None
  order: str = WHOLE  # How epochs are shuffled (see `load`): recorded with the run, so that a resume keeps it.

  def __len__(self) -> int:
    return len(self.labels)

  def note_undecodable(self, ids) -> None:
    for index in ids:
      if self.failures is not None:
        self.failures.record(int(index))

  @property
  def images(self) -> tf.data.Dataset:
    return self.images_with_ids.map(plain_graph(lambda image, label, index: (image, label)))

  @property
  def images_with_ids(self) -> tf.data.Dataset:
    """(float32 image, label, id) of the real examples in order: without a cache, a file found undecodable is
    not among them, so whatever is computed from them (features) keeps the ids it was computed for."""
    real = self.epoch(None).filter(plain_graph(lambda image, label, weight, index: weight > 0))
    return real.map(plain_graph(lambda image, label, weight, index: (tf.cast(image, tf.float32), label, index)))


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
    return digest(sorted(f"{name}\t{entry}" for name, entry in self.manifest.items()))


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
  budget = config_checks.memory_budget(config.memory_budget) or default_memory_budget()
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
      classes, train, val = record_sources.from_tfds(config, shard, pad_multiple)
    else:
      classes, train, val, skipped = record_sources.from_tfrecords(config, shard, pad_multiple)
    skipped = dict(skipped)  # Also gets the records that fail to decode in an epoch (`DecodeFailures`).
    where = f"--{source}={getattr(config, source)}"
    train_examples = _decoded(train, image_size, config, budget, folder,
                              failures=DecodeFailures(skipped, f"{where} training", train.record_name), order=order)
    val_examples = _decoded(val, image_size, config, _budget_left(budget, train_examples, image_size), folder,
                            failures=DecodeFailures(skipped, f"{where} validation", val.record_name), order=order)
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
  weight 0 when an epoch meets it, and is then named and counted (`DecodeFailures`). --strict_data decodes every
  such file before training instead, to refuse a bad one before anything trains."""
  files = sources.find_files(config)
  skipped = dict(files.skipped)
  splits = (files.train, files.val)
  shares = [share_of(split.paths, shard) for split in splits]
  lengths = [padded_length(len(split.labels), shard.count, pad_multiple) for split in splits]
  train_cache = keeping_order(choose_cache(config.cache, lengths[0], image_size, budget, folder), order)
  val_cache = keeping_order(choose_cache(config.cache, lengths[1], image_size, budget - (
      lengths[0] * bytes_per_image(image_size) if train_cache.mode == "memory" else 0), folder), order)
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
    identity = digest([f"{scan.digests[path]}\t{split.labels[index]}\t{index}" for path, index in usable]
                       + [f"padded to {length}"])
    if cache.mode == "disk":
      cache = dataclasses.replace(cache, path=os.path.join(folder, f"images_{image_size}_{identity}"))
    if fill:
      decoded, usable = filled(usable, image_size, cache, unreadable)
    labels = tuple(split.labels[index] for _, index in usable)
    paths, ids = tuple(path for path, _ in usable), tuple(index for _, index in usable)
    # One worker knows every file it skipped: the split's count is what it trains on (config.json said 33 with 32
    # trained on). A worker of several knows only its own share's skipped files, so the listing's count stays.
    all_labels = labels if shard.count == 1 else tuple(split.labels)
    listed = SplitList(None, labels, ids, all_labels, length, identity, paths, items_are_paths=True,
                        order=split_order)
    if fill:
      examples.append(_cached_examples(listed, padded(decoded, labels, ids, length), cache, image_size))
    else:
      # File names, read when decoded: an epoch's shuffle then holds names, not file contents.
      encoded = padded(tf.data.Dataset.from_tensor_slices(list(paths)), labels, ids, length)
      failures = DecodeFailures(reported, f"{name} file", dict(zip(ids, paths)).get, files=True)
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


def _cached_examples(listed: SplitList, padded: tf.data.Dataset, cache: CacheChoice, image_size: int,
                     failures: "DecodeFailures | None" = None) -> Examples:
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
  used = examples.padded_length * bytes_per_image(image_size) if examples.cache.mode == "memory" else 0
  return max(budget - used, 0)


def _shuffle_buffer(split: SplitList, image_size: int) -> int:
  """Elements of an epoch's shuffle: the whole share, or for a BUFFERED order at most _MAX_SHUFFLE_BUFFER elements
  and _MAX_SHUFFLE_BYTES of decoded images. Never the memory budget: the order must not change with it."""
  if split.order == WHOLE:
    return split.padded_length
  return min(split.padded_length, _MAX_SHUFFLE_BUFFER, max(1, _MAX_SHUFFLE_BYTES // bytes_per_image(image_size)))


# Decoding and caching -------------------------------------------------------------------------------------------


def _decoded(split: SplitList, image_size: int, config: DataConfig, budget: int, folder: str,
             cache: CacheChoice | None = None, failures: "DecodeFailures | None" = None,
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
    decoded = decode_or_stand_in(dataset, image_size, split.items_are_paths)
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
  return _cached_examples(split, cached(decode(split.encoded), cache), cache, image_size, failures)


def _with_options(dataset: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True
  # Every worker already reads only its own share (see `Shard`).
  options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
  return dataset.with_options(options)


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
