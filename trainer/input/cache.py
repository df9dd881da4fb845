"""Where a worker's decoded images are kept between epochs (--cache): memory when they fit the budget, a disk file
when the disk has room (filled once by one process and published whole, so concurrent runs sharing --cache_dir
never read a half-written one), or nowhere (decoded every epoch).
"""

import dataclasses
import glob
import os
import shutil
import socket
import uuid

import tensorflow as tf
from absl import logging

from trainer.errors import DISK_FULL, UserInputError
from trainer.input import data_checks, images
from trainer.input.split import WHOLE, plain_graph
from trainer.runtime import workdir as workdir_lib

# Decoded images may take this share of the machine's memory when --memory_budget is not given.
_MEMORY_SHARE = 0.25


# A disk cache is chosen only when the disk keeps this much room besides it.
_DISK_MARGIN = 1 << 30


@dataclasses.dataclass(frozen=True)
class CacheChoice:
  mode: str  # memory | disk | none
  reason: str
  path: str = ""  # the disk cache's file prefix


def keeping_order(cache: CacheChoice, order: str) -> CacheChoice:
  """A disk cache cannot give the WHOLE shuffle a run started with (in memory, or decoding every epoch): such a run
  decodes every epoch instead, so that its resumed epochs are the ones it would have trained."""
  if order == WHOLE and cache.mode == "disk":
    return CacheChoice("none", f"{cache.reason}; but this run started with its epochs shuffled whole, which a disk "
                       "cache cannot give: decoded every epoch to keep the run's order")
  return cache


def filled(usable: list[tuple[str, int]], image_size: int, cache: CacheChoice, unreadable: dict[str, str]):
  """Decodes the files into the cache once; the ones that fail to decode are dropped (their reason, from the
  decoder, goes into `unreadable`). Returns the cached (uint8 image) dataset of the good files and those files."""
  paths = [path for path, _ in usable]
  positions = tf.data.Dataset.range(len(paths))
  decoded = tf.data.Dataset.zip(tf.data.Dataset.from_tensor_slices(paths), positions).map(
      plain_graph(lambda path, position: (images.load(tf.io.read_file(path), image_size), position)),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
  if cache.mode == "disk":
    decoded, good = shared_disk_cache(decoded, cache.path, len(paths) * bytes_per_image(image_size))
  else:
    decoded = decoded.cache()
    good = _positions_in(decoded)
  for position, (path, _) in enumerate(usable):
    if position not in good:
      unreadable[path] = data_checks.why_it_failed(path)
  kept = [item for position, item in enumerate(usable) if position in good]
  return decoded.map(plain_graph(lambda image, position: image)), kept


def _positions_in(decoded: tf.data.Dataset) -> set[int]:
  """The positions of the elements of (image, position) `decoded`, read through once (which fills its cache)."""
  good = set()
  for batch in decoded.map(plain_graph(lambda image, position: position)).batch(4096):
    good.update(batch.numpy().tolist())
  return good


def shared_disk_cache(decoded: tf.data.Dataset, prefix: str, needed: int) -> tuple[tf.data.Dataset, set[int]]:
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
    if not any(words in e.message for words in DISK_FULL):
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


def cached(decoded: tf.data.Dataset, cache: CacheChoice) -> tf.data.Dataset:
  """`decoded` kept where the cache choice says: memory or its disk file (a half-written one removed first)."""
  if cache.mode == "memory":
    return decoded.cache()
  _remove_unfinished_cache(cache.path)
  return decoded.cache(cache.path)


def choose_cache(mode: str, count: int, image_size: int, budget: int, folder: str, identity: str = "") -> CacheChoice:
  """--cache: auto picks memory when the decoded images fit the budget, else disk when the disk has room, else
  none (decode every epoch)."""
  needed = count * bytes_per_image(image_size)
  path = os.path.join(folder, f"images_{image_size}_{identity}") if folder else ""
  size = f"{count} images x {bytes_per_image(image_size):,} B = {needed / 2**20:.1f} MiB"
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


def bytes_per_image(image_size: int) -> int:
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


def default_memory_budget() -> int:
  try:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * _MEMORY_SHARE)
  except (ValueError, OSError, AttributeError):  # No sysconf (Windows): assume a modest machine.
    return 2 << 30
