"""The validation images the final model gets most wrong: one forward pass over the chief's share, a bounded top-k
of their losses (memory stays flat whatever the split's size), written as report/top_losses.json, a grid PNG and
thumbnails for the report page, and shown in TensorBoard. They rank as fastai's `plot_top_losses` users expect,
largest loss first, with the misclassified images before any correctly classified one.
"""

import dataclasses
import heapq
import itertools
import os
import shutil
import time
from typing import Callable, Generic, Sequence, TypeVar

import numpy as np
import tensorflow as tf
from absl import logging
from PIL import Image

from trainer.input import data
from trainer.reporting import report_files, summaries
from trainer.runtime import workdir as workdir_lib

# Images in the top-losses grid: four rows of report_files.TOP_LOSS_COLUMNS.
TOP_LOSSES = 24


# The longer side of a thumbnail (the model's input is kept when smaller): a tile of the page's grid at 1280 px.
THUMBNAIL_PIXELS = 160


TOP_LOSSES_FILE = "top_losses.json"


TOP_LOSSES_PNG = "top_losses.png"


THUMBNAIL_DIR = "top_losses"


# -log of a probability is capped as Keras' crossentropy caps it (its epsilon), so a probability of 0 ranks finite.
_EPSILON = 1e-7


Item = TypeVar("Item")


class TopK(Generic[Item]):
  """The `count` items of a stream with the largest keys, in memory for `count` items whatever the stream's length.
  Of equal keys the earlier item ranks first (and stays when only one fits)."""

  def __init__(self, count: int):
    self.count = count
    self._heap: list = []  # min-heap of (key, -position, item): its root is the first to leave
    self._position = itertools.count()

  def offer(self, key, make_item: Callable[[], Item]) -> None:
    """Considers the next item of the stream; `make_item` is called only when the item is kept (a thumbnail is
    made for the few images that rank, not for every image)."""
    entry = (key, -next(self._position))
    if len(self._heap) < self.count:
      heapq.heappush(self._heap, (*entry, make_item()))
    elif self.count and entry > self._heap[0][:2]:
      heapq.heapreplace(self._heap, (*entry, make_item()))

  def floor(self):
    """The smallest key kept when full (a key must exceed it to enter), else None."""
    return self._heap[0][0] if self.count and len(self._heap) == self.count else None

  def ranked(self) -> list[Item]:
    """The kept items, largest key first."""
    return [item for *_, item in sorted(self._heap, key=lambda entry: entry[:2], reverse=True)]


@dataclasses.dataclass(frozen=True)
class TopLoss:
  """One validation example as the final model sees it."""
  id: int
  label: int
  predicted: int
  probability: float  # of the predicted class
  true_probability: float
  loss: float  # -log(true_probability)
  thumbnail: np.ndarray  # uint8 [h, w, 3], the model's input image at most THUMBNAIL_PIXELS on its longer side

  @property
  def wrong(self) -> bool:
    return self.label != self.predicted


def find_top_losses(model: Callable, images_with_ids: tf.data.Dataset, batch_size: int,
                    count: int = TOP_LOSSES) -> tuple[list[TopLoss], int, int]:
  """The `count` examples of `images_with_ids` ((float32 image 0..255, label, id), as `data.Examples`) that rank
  highest: misclassified before correct, then by loss. Returns them, the examples seen and how many of those the
  model gets wrong."""
  # One trace for every batch, the last (smaller) one included: tracing the model costs more than a small split's
  # forward pass.
  @tf.function(input_signature=[tf.TensorSpec([None, *images_with_ids.element_spec[0].shape], tf.float32)])
  def probabilities_of(images):
    return tf.cast(model(images, training=False), tf.float32)

  top: TopK[TopLoss] = TopK(count)
  seen = wrong = 0
  for images, labels, ids in images_with_ids.batch(batch_size).prefetch(tf.data.AUTOTUNE):
    probabilities = probabilities_of(images).numpy().astype(np.float64)
    labels, ids = labels.numpy().astype(np.int64), ids.numpy()
    predicted = probabilities.argmax(axis=-1)
    true_probabilities = probabilities[np.arange(len(labels)), labels]
    losses = -np.log(np.clip(true_probabilities, _EPSILON, 1.0))
    misclassified = predicted != labels
    seen += len(labels)
    wrong += int(np.sum(misclassified))
    floor = top.floor()
    # Only the rows that beat the batch's first floor can enter (it only rises): the rest cost no Python.
    rows = (np.arange(len(labels)) if floor is None else
            np.flatnonzero((misclassified > floor[0]) | ((misclassified == floor[0]) & (losses > floor[1]))))
    for row in rows:
      top.offer((bool(misclassified[row]), float(losses[row])), lambda row=row: TopLoss(
          int(ids[row]), int(labels[row]), int(predicted[row]), float(probabilities[row, predicted[row]]),
          float(true_probabilities[row]), float(losses[row]), _thumbnail(images[row].numpy())))
  return top.ranked(), seen, wrong


def _thumbnail(image: np.ndarray) -> np.ndarray:
  pixels = Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8), "RGB")
  pixels.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS), Image.Resampling.LANCZOS)  # Only ever shrinks.
  return np.asarray(pixels)


def report_top_losses(model: Callable, examples: data.Examples, classes: Sequence[str], batch_size: int,
                      report_dir: str, tensorboard: summaries.TensorBoardLog | None = None, step: int = 0,
                      workers: int = 1) -> None:
  """The top losses of this worker's validation examples: thumbnails in report/top_losses/, the list in
  report/top_losses.json, the grid in report/top_losses.png and (given `tensorboard`) in TensorBoard's Images, as
  images/top_losses at `step`."""
  start = time.perf_counter()
  ranked, seen, wrong = find_top_losses(model, examples.images_with_ids, batch_size)
  seconds = time.perf_counter() - start
  logging.info("Top losses: %d of %d validation images misclassified; one pass over them took %.1f s.", wrong, seen,
               seconds)
  sources = dict(zip(examples.ids, examples.paths)) if examples.paths is not None else {}
  folder = os.path.join(report_dir, THUMBNAIL_DIR)
  shutil.rmtree(folder, ignore_errors=True)  # A rerun's list may be shorter: no stale thumbnail stays.
  os.makedirs(folder)
  entries = []
  for rank, example in enumerate(ranked, 1):
    thumbnail = f"{THUMBNAIL_DIR}/{rank:03d}.jpg"
    Image.fromarray(example.thumbnail).save(os.path.join(report_dir, thumbnail), quality=90)
    entries.append({"rank": rank, "id": example.id, "label": example.label, "predicted": example.predicted,
                    "probability": example.probability, "true_probability": example.true_probability,
                    "loss": example.loss, "wrong": example.wrong, "thumbnail": thumbnail,
                    "source": sources.get(example.id, f"record {example.id}")})
  workdir_lib.write_json(os.path.join(report_dir, TOP_LOSSES_FILE), {
      "classes": list(classes), "examples": seen, "wrong": wrong, "all_examples": len(examples.all_labels),
      "workers": workers, "seconds": seconds, "top": entries})
  png = os.path.join(report_dir, TOP_LOSSES_PNG)
  if not ranked:
    if os.path.exists(png):
      os.remove(png)
    return
  figure = report_files.top_losses_figure(np.stack([e.thumbnail for e in ranked]),
                                       [e.label for e in ranked], [e.predicted for e in ranked],
                                       [e.probability for e in ranked], classes)
  report_files.write_png(figure, png)
  if tensorboard is not None:
    tensorboard.log_top_losses(figure, step, f"The {len(ranked)} validation images with the largest loss "
                                             f"(misclassified first; {wrong} of {seen} misclassified): true class, "
                                             "then the predicted class and its probability.")
