"""Checks of every image file before training starts: can it be used, and is it in both train and val.

Every file is read once, in parallel threads: its header is checked for absurd sizes (decompression bombs) before
anything is decoded, and its content hash finds the same image in train and validation (data leakage) whatever
the file names. The files asked for (`scan(decode=...)`: with --strict_data, and for a file found undecodable, its
message) are also decoded by `images.check` (the decode path training and serving use, a JPEG at 1/8 scale), so
a file that passes it decodes in the pipeline too. The others are decoded once, in the first epoch
(trainer.input.data), which skips and names the ones that fail.
"""

import concurrent.futures
import dataclasses
import hashlib
import io
import os
import re
from typing import Collection, Sequence

import tensorflow as tf
from absl import logging
from PIL import Image

from trainer.errors import UserInputError
from trainer.input import images

# How many skipped files a warning names (all of them go into the run's report).
_LISTED = 5
# PIL's own decompression-bomb check raises in Image.open above ~179 MP, before the size is known: such a file read
# as 0x0 and passed. Our --max_image_pixels is the one limit, applied to every size read from the header.
Image.MAX_IMAGE_PIXELS = None


@dataclasses.dataclass(frozen=True)
class ScanResult:
  unreadable: dict[str, str]  # path -> why it cannot be used
  digests: dict[str, str]  # path -> sha256 of its bytes, for every readable file


def check_file(path: str, max_pixels: int, decode: bool = True) -> tuple[str | None, str | None]:
  """(why the file cannot be used or None, sha256 of its bytes or None). decode=False checks the header only:
  for files that the pipeline decodes next anyway (trainer.input.data skips and names what fails there)."""
  try:
    with open(path, "rb") as f:
      content = f.read()
  except OSError as e:
    return f"cannot be read ({e.strerror})", None
  if not content:
    return "empty file", None
  try:
    # Reads the header only: the pixel count is known before anything is decoded.
    with Image.open(io.BytesIO(content)) as header:
      width, height = header.size
  except Exception:  # Anything PIL cannot identify is left to TensorFlow's decoder, the authority below.
    width = height = 0
  if width * height > max_pixels:
    return f"{width}x{height} pixels exceeds --max_image_pixels={max_pixels}", None
  if not decode:
    return None, hashlib.sha256(content).hexdigest()
  try:
    images.check(tf.constant(content))
  except tf.errors.InvalidArgumentError as e:
    return f"cannot be decoded ({_decoder_message(e)})", None
  return None, hashlib.sha256(content).hexdigest()


def why_it_failed(path: str) -> str:
  """Why a file that failed in a pipeline (its read or decode: tf.data's ignore_errors drops any error) cannot be
  used, from a check of it alone."""
  return (check_file(path, max_pixels=2**62)[0]
          or "could not be read or decoded in the pipeline (it reads and decodes when checked again)")


def _decoder_message(error: tf.errors.OpError) -> str:
  """The decoder's own words, without TensorFlow's function and op decorations. Called where a graph runs (a
  tf.data thread), the error starts "Graph execution error:" and a traceback; the words are the line after it."""
  lines = [line for line in error.message.splitlines() if line.strip()] or ["unknown error"]
  if lines[0].startswith("Graph execution error") and len(lines) > 1:
    lines = [line for line in lines[1:] if not line.startswith((" ", "\t", "<", "Detected at node"))] or lines
  message = re.sub(r"\{\{.*?\}\}|\[Op:.*", "", lines[0])
  return message.strip().rstrip(".")


def scan(paths: Sequence[str], max_pixels: int, workers: int | None = None,
         decode: "bool | Collection[str]" = True) -> ScanResult:
  """Checks every file in parallel; decode: whether (or which of the paths) to decode, else the header only."""
  # One thread per core: the per-file work (header, hash) mostly holds the GIL, and more threads measured slower
  # (3,000 files: 0.35-0.48 s on 2 threads, 0.67-0.85 s on 4; BUILD_NOTES.md).
  workers = workers or min(32, os.cpu_count() or 1)
  decoded = (lambda path: decode) if isinstance(decode, bool) else decode.__contains__
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    results = list(pool.map(lambda path: check_file(path, max_pixels, decoded(path)), paths))
  unreadable = {path: problem for path, (problem, _) in zip(paths, results) if problem}
  digests = {path: digest for path, (_, digest) in zip(paths, results) if digest}
  return ScanResult(unreadable, digests)


def report_unreadable(unreadable: dict[str, str], strict: bool, listed_in: str = "report/metrics.json") -> None:
  """--strict_data: an error listing every unusable file; otherwise one warning with the count and a few paths.
  listed_in: the file of the workdir that lists them all."""
  if not unreadable:
    return
  lines = [f"{path}: {why}" for path, why in sorted(unreadable.items())]
  if strict:
    raise UserInputError(f"{len(lines)} image file(s) cannot be used (--strict_data): {'; '.join(lines)}. Fix or "
                         "remove them, or drop --strict_data to skip them.")
  more = f"; and {len(lines) - _LISTED} more" if len(lines) > _LISTED else ""
  logging.warning("Skipping %d image file(s) that cannot be used (all listed in %s): %s%s",
                  len(lines), listed_in, "; ".join(lines[:_LISTED]), more)


def leaked(train_paths: Sequence[str], val_paths: Sequence[str], digests: dict[str, str]) -> list[tuple[str, str]]:
  """(train path, val path) pairs whose files have the same content."""
  train_by_digest = {}
  for path in train_paths:
    if path in digests:
      train_by_digest.setdefault(digests[path], path)
  return [(train_by_digest[digests[path]], path) for path in val_paths
          if path in digests and digests[path] in train_by_digest]


def warn_leakage(pairs: list[tuple[str, str]]) -> None:
  if pairs:
    logging.warning("Data leakage: %d validation image(s) are also in the training data (same content), e.g. %s. "
                    "Validation accuracy overstates accuracy on new images; remove them from one side.",
                    len(pairs), "; ".join(f"{val} = {train}" for train, val in pairs[:3]))
