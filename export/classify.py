"""Classifying image files with an exported SavedModel: what `python -m export.predict` does.

Files go to the model as their encoded bytes through `serving_default`, exactly as a TF Serving client sends them.
A file that cannot be read or decoded is reported with the reason; the other files are still classified.
"""

import csv
import dataclasses
import io
import json
import os
from typing import Iterable, Sequence

import numpy as np
import tensorflow as tf

import export
from export import saved_model
from trainer.errors import UserInputError
from trainer.input import sources

FORMATS = export.PREDICTION_FORMATS
_BATCH = 16


@dataclasses.dataclass(frozen=True)
class Prediction:
  path: str
  top: tuple[tuple[str, float], ...] = ()  # (label, probability), best first
  error: str = ""


def image_paths(paths: Iterable[str]) -> tuple[list[str], list[str]]:
  """Files as given (whatever their name), and the image files found below folders, in sorted order; and the
  files below those folders that are not named as images (hidden files aside), which are not classified."""
  found, not_images = [], []
  for path in paths:
    if not os.path.isdir(path):
      found.append(path)
      continue
    below = sorted(os.path.join(folder, name) for folder, _, names in os.walk(path)
                   for name in names if not name.startswith("."))
    found.extend(p for p in below if sources.is_image_file(os.path.basename(p)))
    not_images.extend(p for p in below if not sources.is_image_file(os.path.basename(p)))
  return found, not_images


class Classifier:
  """An export folder (WORKDIR/export/<model_name>/<version>) loaded for prediction."""

  def __init__(self, model_dir: str):
    if not tf.saved_model.contains_saved_model(model_dir):
      raise UserInputError(f"--model={model_dir} holds no SavedModel; pass an export version folder such as "
                           "WORKDIR/export/classifier/1.")
    self._serve = tf.saved_model.load(model_dir).signatures[saved_model.SERVING_DEFAULT]
    with open(os.path.join(model_dir, "assets", saved_model.LABELS_FILE), encoding="utf-8") as f:
      self.classes = tuple(line.rstrip("\n") for line in f)

  def classify(self, paths: Sequence[str], top_k: int) -> list[Prediction]:
    """The top_k labels of every file, in the order given."""
    predictions = []
    for start in range(0, len(paths), _BATCH):
      predictions.extend(self._classify_batch(paths[start:start + _BATCH], top_k))
    return predictions

  def _classify_batch(self, paths: Sequence[str], top_k: int) -> list[Prediction]:
    contents, errors = {}, {}
    for path in paths:
      try:
        with open(path, "rb") as f:
          contents[path] = f.read()
      except OSError as e:
        errors[path] = e.strerror or str(e)
    try:
      probabilities = self._probabilities(list(contents.values()))
    except tf.errors.InvalidArgumentError:
      # Some file does not decode: one at a time, so that each failure has its own file and the rest still count.
      probabilities = []
      for path, content in list(contents.items()):
        try:
          probabilities.append(self._probabilities([content])[0])
        except tf.errors.InvalidArgumentError as e:
          errors[path] = _reason(e)
          del contents[path]
    scores = dict(zip(contents, probabilities))
    return [Prediction(path, error=errors[path]) if path in errors else
            Prediction(path, tuple((self.classes[i], float(scores[path][i]))
                                   for i in np.argsort(-scores[path], kind="stable")[:top_k]))
            for path in paths]

  def _probabilities(self, contents: list[bytes]) -> np.ndarray:
    if not contents:
      return np.zeros((0, len(self.classes)), np.float32)
    return self._serve(image_bytes=tf.constant(contents))["probabilities"].numpy()


def _reason(error: tf.errors.InvalidArgumentError) -> str:
  """The decoder's or the format check's own words, without TensorFlow's graph and node details."""
  lines = [line.strip() for line in error.message.splitlines()]
  useful = [line for line in lines if line and not line.startswith(("[[", "Detected at", "<stack", "Graph execution"))]
  reason = useful[0] if useful else error.message
  return reason.removeprefix("assertion failed: [").removesuffix("]").replace("image_bytes[0]", "the file")


def format_predictions(predictions: Sequence[Prediction], fmt: str) -> str:
  """As a readable table, a JSON list or CSV (one row per file: path, then label and score per rank, then error)."""
  if fmt == "json":
    return json.dumps([{"path": p.path, "predictions": [{"label": label, "score": score} for label, score in p.top],
                        "error": p.error or None} for p in predictions], indent=2, ensure_ascii=False) + "\n"
  if fmt == "csv":
    ranks = max((len(p.top) for p in predictions), default=0)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path"] + [f"{name}_{rank + 1}" for rank in range(ranks) for name in ("label", "score")]
                    + ["error"])
    for p in predictions:
      cells = [value for label, score in p.top for value in (label, f"{score:.6f}")]
      writer.writerow([p.path] + cells + [""] * (2 * ranks - len(cells)) + [p.error])
    return out.getvalue()
  if fmt != "table":
    raise UserInputError(f"--format={fmt}: choose one of {', '.join(FORMATS)}.")
  width = max((len(p.path) for p in predictions), default=0)
  lines = [f"{p.path:<{width}}  " + (f"error: {p.error}" if p.error else
                                      "  ".join(f"{label} {score:.4f}" for label, score in p.top))
           for p in predictions]
  return "".join(line + "\n" for line in lines)


if __name__ == "__main__":
  # `python -m export.classify FILES` ran this library module, printed nothing and exited 0, as if it had worked.
  import sys
  print("error: export.classify is the library behind the command; classify files with: python -m export.predict "
        "--model=WORKDIR/export/<model_name>/<version> FILE_OR_FOLDER...", file=sys.stderr)
  sys.exit(2)
