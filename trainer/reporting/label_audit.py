"""Suspect labels and near-duplicate images, found on the frozen phase's cached features (`trainer.loop.features`).

Suspect labels, by confident learning (Northcutt, Jiang & Chuang, "Confident Learning: Estimating Uncertainty in
Dataset Labels", JAIR 2021), as cleanlab's `find_label_issues(filter_by="prune_by_noise_rate")` does it:
  1. out-of-fold probabilities: the tuner's stratified folds of the training split (`tuning.stratified_folds`); per
     fold a multinomial logistic regression trained on every view of the other folds' images, its probabilities
     on the fold's own images averaged over their views (with augmentation every cached view is augmented: there
     is no clean one, and the average is a test-time augmentation);
  2. per class j a threshold t_j: the mean probability of j over the images labelled j (its self-confidence);
  3. the confident joint C[i, j]: the images labelled i whose probability of j reaches t_j (the most probable such
     j), calibrated so that row i sums to the count of label i;
  4. for every i != j, C[i, j] (rounded keeping each row's total, at least one image of each label left) images
     labelled i with the largest margin p_j - p_i are flagged, never one whose given label is its most probable
     class.
The flagged images are ranked by self-confidence, the out-of-fold probability of the given label, lowest first
(cleanlab's default `rank_by`); that probability is the CSV's `score`. Labels are never changed: --drop_suspects
gives the flagged images weight 0 in training (trainer.loop.train), nothing else.

Near-duplicates: pairs of images whose 16 x 16 pixel thumbnails (of the image the model sees, from the run's decoded
images, brightness-centred and L2-normalised) have a cosine similarity of at least `NEAR_DUPLICATE_SIMILARITY`,
train x val and within each split, computed in blocks (bounded memory at 100k images). Not the backbone's features:
measured on sign_language_digits, a copy re-encoded at JPEG quality 75 and resized to 90% has a feature similarity
of 0.81-0.94 to its original while distinct photos of that uniform set reach 0.95 (the pooled features describe
the hand, not the photo), and the augmented views of the cache lower a copy's similarity further. The byte-hash
leakage check (trainer.input.data_checks) misses such copies; the thumbnails find them (BUILD_NOTES.md).

Over 400 lines on purpose: both checks run once per run on the same features and thumbnails, and share one state
file, one report page section and one TensorBoard grid; split, each half would reach into the other.
"""

import csv
import dataclasses
import io
import os
import time
from typing import Sequence

import numpy as np
import tensorflow as tf
from absl import logging
from matplotlib.figure import Figure

from trainer.input import images
from trainer.loop import tuning
from trainer.reporting import report_files
from trainer.runtime import workdir as workdir_lib

# Thumbnail similarity from which two images count as near-duplicates, and the thumbnail's side. Measured on
# sign_language_digits (bench.label_errors, BUILD_NOTES.md): copies re-encoded at JPEG quality 75 and resized to 90%
# score >= 0.998 against their originals, copies cropped by 2% per side 0.968-0.99 (median 0.983), and the closest
# pair of distinct photos 0.975; a 5% crop (0.84-0.90) is beyond what pixels can tell from another photo.
NEAR_DUPLICATE_SIMILARITY = 0.98
THUMBNAIL_SIZE = 16
# Folds of the out-of-fold predictions when the training split allows them (the tuner's default).
FOLDS = 5
# The logistic regression of each fold: full-batch gradient steps and the L2 penalty on standardised features,
# measured on sign_language_digits with 5% of the labels flipped: 200 steps flagged the same images as 100, and a
# penalty of 0.1 predicted better out of fold (0.92 of the unflipped labels) than 0.01 (0.89) or 0.001 (0.85).
_STEPS = 100
_L2 = 0.1
# Rows of one block of the similarity matrix: a block against 8192 columns is 64 MB of float32.
_BLOCK = 2048
# Suspects shown in the TensorBoard grid, the worst first.
GRID_SUSPECTS = 16
_GRID_COLUMNS = 4

SUSPECTS_CSV = "suspect_labels.csv"
# The grid of the worst suspects in report/ (the report page shows it), as in TensorBoard.
SUSPECTS_PNG = "suspect_labels.png"
DUPLICATES_CSV = "near_duplicates.csv"
STATE_FILE = "label_audit.json"
SUSPECT_COLUMNS = ("path", "given_label", "suggested_label", "score")
DUPLICATE_COLUMNS = ("path_a", "split_a", "path_b", "split_b", "similarity")


@dataclasses.dataclass(frozen=True)
class Suspect:
  """A training image whose given label confident learning doubts: a row of suspect_labels.csv."""
  path: str
  given_label: str
  suggested_label: str
  score: float  # out-of-fold probability of the given label


@dataclasses.dataclass(frozen=True)
class Findings:
  """What `audit` found, by row of the features (train rows, val rows)."""
  suspects: np.ndarray  # train rows flagged by confident learning, the least likely given label first
  suggested: np.ndarray  # [N] most probable class of every training image, out of fold
  self_confidence: np.ndarray  # [N] out-of-fold probability of each training image's given label
  pairs: list  # (split_a, row_a, split_b, row_b, similarity), most similar first; rows of the thumbnails


# Out-of-fold probabilities --------------------------------------------------------------------------------------


def out_of_fold_probabilities(train_features: np.ndarray, labels: np.ndarray, num_classes: int, folds: int,
                              seed: int) -> np.ndarray:
  """[N, num_classes]: each image's class probabilities from a classifier that never saw it.

  train_features: [views, N, D] (as FeatureCache.train_features); a fold's classifier trains on every view of the
  other images and its probabilities are averaged over the views of the fold's images."""
  views, count, _ = train_features.shape
  assignment = tuning.stratified_folds(labels, folds, seed)
  probabilities = np.zeros((count, num_classes), np.float32)
  for fold in range(folds):
    inside, held_out = np.flatnonzero(assignment != fold), np.flatnonzero(assignment == fold)
    model = _fit_softmax_regression(train_features[:, inside].reshape(views * len(inside), -1),
                                    np.tile(labels[inside], views), num_classes)
    probabilities[held_out] = np.mean([_predict(model, view[held_out]) for view in train_features], axis=0)
  return probabilities


def usable_folds(labels: np.ndarray) -> int:
  """FOLDS, or fewer when the smallest class has fewer images (each fold needs one of every class); 0 when some
  class has a single image, which no fold split can hold out and learn at once."""
  counts = np.bincount(labels)
  smallest = int(counts[counts > 0].min()) if len(labels) else 0
  return min(FOLDS, smallest) if smallest >= 2 else 0


def _fit_softmax_regression(x: np.ndarray, y: np.ndarray, num_classes: int) -> tuple:
  """A multinomial logistic regression on standardised features by Nesterov's accelerated gradient: convex,
  deterministic (zero start, full batches) and seconds on the features of thousands of images."""
  mean, scale = x.mean(0), x.std(0) + 1e-6
  z = (x - mean) / scale
  count = len(z)
  targets = np.eye(num_classes, dtype=np.float32)[y]
  # Step 1/L: the softmax loss's Hessian is at most (Z^T Z / n) / 2 (Böhning 1992), plus the penalty; the bias
  # column is orthogonal to the centred features and adds an eigenvalue of 1.
  step = 1.0 / (0.5 * max(_largest_eigenvalue(z), 1.0) + _L2)
  weights = np.zeros((z.shape[1], num_classes), np.float32)
  bias = np.zeros(num_classes, np.float32)
  previous_weights, previous_bias = weights, bias
  for iteration in range(_STEPS):
    momentum = iteration / (iteration + 3)
    look_weights = weights + momentum * (weights - previous_weights)
    look_bias = bias + momentum * (bias - previous_bias)
    error = (_softmax(z @ look_weights + look_bias) - targets) / count
    previous_weights, previous_bias = weights, bias
    weights = look_weights - step * (z.T @ error + _L2 * look_weights)
    bias = look_bias - step * error.sum(0)
  return mean, scale, weights, bias


def _predict(model: tuple, x: np.ndarray) -> np.ndarray:
  mean, scale, weights, bias = model
  return _softmax(((x - mean) / scale) @ weights + bias)


def _softmax(logits: np.ndarray) -> np.ndarray:
  exp = np.exp(logits - logits.max(axis=1, keepdims=True))
  return exp / exp.sum(axis=1, keepdims=True)


def _largest_eigenvalue(z: np.ndarray, iterations: int = 30) -> float:
  """Of Z^T Z / n, by power iteration from a fixed start (deterministic)."""
  vector = np.ones(z.shape[1], np.float32) / np.sqrt(z.shape[1])
  value = 0.0
  for _ in range(iterations):
    product = z.T @ (z @ vector) / len(z)
    value = float(np.linalg.norm(product))
    if value == 0.0:
      return 0.0
    vector = product / value
  return value


# Confident learning ---------------------------------------------------------------------------------------------


def label_issues(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Rows confident learning flags (prune by noise rate, see the module docstring), least self-confident first."""
  count, num_classes = probabilities.shape
  label_counts = np.bincount(labels, minlength=num_classes)
  self_confidence = probabilities[np.arange(count), labels]
  thresholds = np.array([self_confidence[labels == j].mean() if label_counts[j] else np.inf
                         for j in range(num_classes)])
  above = probabilities >= thresholds - 1e-6  # cleanlab's tolerance: a probability equal to its threshold counts.
  confident = np.where(above, probabilities, -np.inf).argmax(axis=1)
  counted = above.any(axis=1)
  joint = np.zeros((num_classes, num_classes))
  np.add.at(joint, (labels[counted], confident[counted]), 1)
  # Calibrated: row i sums to the count of label i, the whole to the number of images.
  joint = joint / np.maximum(joint.sum(axis=1, keepdims=True), 1) * label_counts[:, None]
  joint = joint / max(joint.sum(), 1) * count
  prune = _round_preserving_row_totals(joint)
  np.fill_diagonal(prune, 0)
  # At least one image of every label stays (cleanlab's min_examples_per_class=1).
  for given in range(num_classes):
    excess = prune[given].sum() - max(label_counts[given] - 1, 0)
    while excess > 0:
      largest = int(prune[given].argmax())
      prune[given, largest] -= 1
      excess -= 1
  flagged = np.zeros(count, bool)
  for given, true in zip(*np.nonzero(prune)):
    members = np.flatnonzero(labels == given)
    margin = probabilities[members, true] - probabilities[members, given]
    flagged[members[np.argsort(-margin, kind="stable")[:prune[given, true]]]] = True
  flagged &= probabilities.argmax(axis=1) != labels
  rows = np.flatnonzero(flagged)
  return rows[np.argsort(self_confidence[rows], kind="stable")]


def _round_preserving_row_totals(matrix: np.ndarray) -> np.ndarray:
  """Integers whose rows sum to the rounded row sums: each row's floor, plus one for the entries with the largest
  fractional parts (cleanlab's round_preserving_row_totals)."""
  floors = np.floor(matrix).astype(int)
  short = np.round(matrix.sum(axis=1)).astype(int) - floors.sum(axis=1)
  for row, missing in enumerate(short):
    if missing > 0:
      floors[row, np.argsort(-(matrix[row] - floors[row]), kind="stable")[:missing]] += 1
  return floors


# Near-duplicates ------------------------------------------------------------------------------------------------


def thumbnails(images: tf.data.Dataset, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
  """(descriptors [N, THUMBNAIL_SIZE^2 * 3] unit rows, ids [N]) of (image, label, id) elements (as
  `Examples.images_with_ids`): each image area-averaged to THUMBNAIL_SIZE pixels a side, its mean brightness
  subtracted (a copy made lighter or darker stays a copy), scaled to length 1."""
  @tf.autograph.experimental.do_not_convert  # Plain TensorFlow ops: nothing for AutoGraph to rewrite.
  def describe(batch, labels, ids):
    small = tf.image.resize(tf.cast(batch, tf.float32), [THUMBNAIL_SIZE, THUMBNAIL_SIZE], method="area")
    flat = tf.reshape(small, [tf.shape(small)[0], -1])
    return tf.math.l2_normalize(flat - tf.reduce_mean(flat, axis=1, keepdims=True), axis=1), ids
  descriptors, ids = [], []
  for batch_descriptors, batch_ids in images.batch(batch_size).map(describe).prefetch(tf.data.AUTOTUNE):
    descriptors.append(batch_descriptors.numpy())
    ids.append(batch_ids.numpy())
  if not descriptors:
    return np.zeros((0, THUMBNAIL_SIZE * THUMBNAIL_SIZE * 3), np.float32), np.zeros(0, np.int64)
  return np.concatenate(descriptors), np.concatenate(ids).astype(np.int64)


def similar_pairs(a: np.ndarray, b: np.ndarray | None, threshold: float,
                  block: int = _BLOCK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(rows of a, rows of b, similarities) of the unit rows whose dot product is >= threshold; b None pairs a with
  itself (each pair once, i < j). The product is computed block by block, so memory stays at block x block."""
  within = b is None
  b = a if within else b
  found_a, found_b, found_similarity = [], [], []
  for start_a in range(0, len(a), block):
    # Within one split, the blocks left of the diagonal hold only pairs already seen.
    for start_b in range(start_a if within else 0, len(b), block):
      similarity = a[start_a:start_a + block] @ b[start_b:start_b + block].T
      rows, columns = np.nonzero(similarity >= threshold)
      if within:
        keep = start_a + rows < start_b + columns
        rows, columns = rows[keep], columns[keep]
      found_a.append(start_a + rows)
      found_b.append(start_b + columns)
      found_similarity.append(similarity[rows, columns])
  if not found_a:
    return np.zeros(0, int), np.zeros(0, int), np.zeros(0, np.float32)
  return np.concatenate(found_a), np.concatenate(found_b), np.concatenate(found_similarity)


def near_duplicates(train: np.ndarray, val: np.ndarray, threshold: float = NEAR_DUPLICATE_SIMILARITY) -> list:
  """(split_a, row_a, split_b, row_b, similarity) of every pair of unit rows at or above the threshold: train x
  val first (leakage), then within train, then within val; the most similar first within each."""
  pairs = []
  for split_a, split_b, found in (("train", "val", similar_pairs(train, val, threshold)),
                                  ("train", "train", similar_pairs(train, None, threshold)),
                                  ("val", "val", similar_pairs(val, None, threshold))):
    rows_a, rows_b, similarity = found
    for index in np.argsort(-similarity, kind="stable"):
      pairs.append((split_a, int(rows_a[index]), split_b, int(rows_b[index]), float(similarity[index])))
  return pairs


# The audit of a run ---------------------------------------------------------------------------------------------


def audit(train_features: np.ndarray, train_labels: np.ndarray, num_classes: int, seed: int,
          train_thumbnails: np.ndarray, val_thumbnails: np.ndarray,
          threshold: float = NEAR_DUPLICATE_SIMILARITY) -> Findings:
  """Suspect labels (none when a class has a single training image) from train_features [views, N, D], and
  near-duplicate pairs of the thumbnails (`thumbnails`) of both splits."""
  labels = np.asarray(train_labels, np.int64)
  folds = usable_folds(labels)
  if folds:
    probabilities = out_of_fold_probabilities(train_features, labels, num_classes, folds, seed)
    suspects = label_issues(probabilities, labels)
  else:
    logging.info("Label audit: no suspect labels sought: a class has a single training image, which no fold can "
                 "both hold out and learn.")
    probabilities = np.eye(num_classes, dtype=np.float32)[labels]
    suspects = np.zeros(0, int)
  pairs = near_duplicates(train_thumbnails, val_thumbnails, threshold)
  return Findings(suspects, probabilities.argmax(axis=1), probabilities[np.arange(len(labels)), labels], pairs)


def audit_run(cache, train_images: tf.data.Dataset, val_images: tf.data.Dataset, names: dict[str, dict[int, str]],
              classes: Sequence[str], seed: int, identity: str, report_dir: str, write: bool,
              tensorboard_dir: str | None, image_size: int) -> frozenset[int]:
  """The run's audit, once per identity: the ids of the training examples confident learning flags.

  cache: the run's FeatureCache (train_features, train_labels, train_ids). *_images: the splits' decoded (image,
  label, id) elements, for the thumbnails. names: {"train": id -> path, "val": ...} (a name for a record without a
  file). identity: what the audit depends on (the features' cache key); a resumed run finds report/label_audit.json
  of the same identity and reads the ids back instead of auditing again. write: whether this process writes the
  report files and the TensorBoard grid (the chief); another worker audits its own share and keeps only the ids,
  in its own report_dir."""
  state_path = os.path.join(report_dir, STATE_FILE)
  if os.path.isfile(state_path):
    state = workdir_lib.read_json(state_path)
    if state.get("identity") == identity:
      return frozenset(state["suspect_ids"])
  start = time.perf_counter()
  (train_thumbnails, train_thumbnail_ids), (val_thumbnails, val_thumbnail_ids) = (thumbnails(train_images),
                                                                                  thumbnails(val_images))
  findings = audit(cache.train_features, cache.train_labels, len(classes), seed, train_thumbnails, val_thumbnails)
  train_ids = np.asarray(cache.train_ids)
  suspects = [Suspect(_name(names, "train", train_ids[row]), classes[int(cache.train_labels[row])],
                      classes[int(findings.suggested[row])], float(findings.self_confidence[row]))
              for row in findings.suspects]
  thumbnail_ids = {"train": train_thumbnail_ids, "val": val_thumbnail_ids}
  pairs = [(_name(names, split_a, thumbnail_ids[split_a][row_a]), split_a,
            _name(names, split_b, thumbnail_ids[split_b][row_b]), split_b, similarity)
           for split_a, row_a, split_b, row_b, similarity in findings.pairs]
  seconds = time.perf_counter() - start
  if write:
    write_suspects_csv(os.path.join(report_dir, SUSPECTS_CSV), suspects)
    write_duplicates_csv(os.path.join(report_dir, DUPLICATES_CSV), pairs)
    if suspects:
      figure = suspects_figure(suspects[:GRID_SUSPECTS], image_size)
      report_files.write_png(figure, os.path.join(report_dir, SUSPECTS_PNG))
      if tensorboard_dir:
        log_suspect_grid(tensorboard_dir, figure)
    across = sum(1 for pair in pairs if pair[1] != pair[3])
    # A warning only when there is something to look at.
    logging.log(logging.WARNING if suspects or pairs else logging.INFO,
                "Label audit (%.1fs): %d of %d training images have a suspect label (%s); %d near-duplicate pair(s), "
                "%d of them across train and val (%s).", seconds, len(suspects), len(train_ids),
                os.path.join(report_dir, SUSPECTS_CSV), len(pairs), across, os.path.join(report_dir, DUPLICATES_CSV))
  suspect_ids = sorted(int(train_ids[row]) for row in findings.suspects)
  workdir_lib.write_json(state_path, {"identity": identity, "suspect_ids": suspect_ids, "suspects": len(suspects),
                                      "near_duplicates": len(pairs),
                                      "similarity_threshold": NEAR_DUPLICATE_SIMILARITY, "seconds": seconds})
  return frozenset(suspect_ids)


def _name(names: dict[str, dict[int, str]], split: str, example_id) -> str:
  kind = "training" if split == "train" else "validation"
  return names[split].get(int(example_id), f"{kind} example {int(example_id)}")


# Report files ---------------------------------------------------------------------------------------------------


def write_suspects_csv(path: str, suspects: Sequence[Suspect]) -> None:
  """report/suspect_labels.csv: one row per suspect, the least likely given label first."""
  _write_csv(path, SUSPECT_COLUMNS, [(s.path, s.given_label, s.suggested_label, f"{s.score:.6f}") for s in suspects])


def write_duplicates_csv(path: str, pairs: Sequence[tuple]) -> None:
  """report/near_duplicates.csv: path_a, split_a, path_b, split_b, similarity; train x val pairs first."""
  _write_csv(path, DUPLICATE_COLUMNS, [(*pair[:4], f"{pair[4]:.6f}") for pair in pairs])


def _write_csv(path: str, header: Sequence[str], rows: list) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  partial = f"{path}.{os.getpid()}.partial"  # Atomic: a killed run leaves no half-written report under the name.
  with open(partial, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  os.replace(partial, path)


def suspect_rows(report_dir: str, limit: int | None = None) -> list[Suspect]:
  """The suspects of report/suspect_labels.csv, the least likely given label first (for the report page); [] when
  the run has no audit."""
  path = os.path.join(report_dir, SUSPECTS_CSV)
  if not os.path.isfile(path):
    return []
  with open(path, newline="", encoding="utf-8") as f:
    rows = [Suspect(row["path"], row["given_label"], row["suggested_label"], float(row["score"]))
            for row in csv.DictReader(f)]
  return rows[:limit]


def suspects_figure(suspects: Sequence[Suspect], image_size: int) -> Figure:
  """The suspects' images in a grid, each titled 'given -> suggested' with its score."""
  rows = max(1, -(-len(suspects) // _GRID_COLUMNS))
  figure = Figure(figsize=(2.2 * _GRID_COLUMNS, 2.4 * rows), dpi=100, layout="constrained")
  for index, suspect in enumerate(suspects):
    axes = figure.add_subplot(rows, _GRID_COLUMNS, index + 1)
    axes.imshow(_image_or_blank(suspect.path, image_size))
    axes.set_title(f"{suspect.given_label[:10]} -> {suspect.suggested_label[:10]}\np={suspect.score:.3f}", fontsize=9)
    axes.axis("off")
  return figure


def log_suspect_grid(tensorboard_dir: str, figure: Figure) -> None:
  """The worst suspects' grid (`suspects_figure`) as an image in TensorBoard (tensorboard/, tag suspect_labels,
  step 0)."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png")
  writer = tf.summary.create_file_writer(tensorboard_dir)
  with writer.as_default(step=0):
    tf.summary.image("suspect_labels", tf.io.decode_png(buffer.getvalue(), channels=4)[tf.newaxis],
                     description="Training images whose given label the out-of-fold predictions doubt most: given "
                                 "-> suggested label, p = probability of the given label. Nothing was relabelled; "
                                 "the full list is report/suspect_labels.csv.")
  writer.close()


def _image_or_blank(path: str, image_size: int) -> np.ndarray:
  """The image the model sees (trainer.input.images.load), or grey for an example without a readable file."""
  try:
    return images.load(tf.io.read_file(path), image_size).numpy()
  except (tf.errors.OpError, ValueError):
    return np.full((image_size, image_size, 3), 128, np.uint8)
