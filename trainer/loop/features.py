"""The frozen phase computed once: pooled backbone features, and the classifier's head trained on them.

While the backbone is frozen (and BatchNorm in inference mode) its output depends only on the input image, so
every frozen epoch recomputes the same features. `--cache_features` computes them once per image (with
augmentation: `--feature_views=K` augmented views per image, epoch e training on view e mod K) and trains the
head alone on them. The head is the classifier's own layers after the pooling layer, so the fine-tune phase
starts from it, and with augmentation off it receives the same inputs in the same batches as end-to-end frozen
training: the same head comes out, in a fraction of the time.

The features can be kept on disk (`load_or_extract`), in a file named after everything they depend on
(`cache_key`), so that a resumed run, or a --tune search and the training after it, extract them once.

API, also for hyper-parameter search on cached features:

  feature_model(model) -> keras.Model       images 0..255 [N, S, S, 3] -> pooled features [N, D]
  head_of(model) -> keras.Model             pooled features [N, D] -> probabilities, sharing the model's layers
  extract(model, images, batch_size) -> (features float32 [N, D], labels int32 [N])
  extract_views(model, images, batch_size, augmenter, views) -> (features [views, N, D], labels [N])
  FeatureCache(model, train_images, val_images, batch_size, augmenter, views): both splits, batched per epoch
  cache_key(config, data_identity, dtype_policy) -> str
  load_or_extract(model, train_images, val_images, batch_size, augmenter, views, cache_dir, key) -> FeatureCache

`images` is an unbatched tf.data.Dataset of (float32 image [S, S, 3] in 0..255, int32 label), as in
`trainer.input.data.Examples.images`; a FeatureCache given (image, label, id), as `Examples.images_with_ids`, also keeps
the ids (`train_ids`, `val_ids`: which example each row is; None without them).
"""

import dataclasses
import errno
import glob
import hashlib
import json
import os
import shutil
import socket
import zipfile

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from trainer.config import Config
from trainer.input import data
from trainer.modeling import augment
from trainer.runtime import workdir as workdir_lib

# The layer of the classifier (trainer.modeling.model.build_classifier) whose output the head starts from.
POOL_LAYER = "pool"
_ARRAYS = ("train_features", "train_labels", "val_features", "val_labels")
# The examples' ids (trainer.input.data), kept when the images came with them: which examples the rows are.
_ID_ARRAYS = ("train_ids", "val_ids")


def feature_model(model: keras.Model) -> keras.Model:
  """The classifier up to its pooling layer: preprocessing and the frozen backbone."""
  return keras.Model(model.inputs, model.get_layer(POOL_LAYER).output, name=f"{model.name}_features")


def head_of(model: keras.Model) -> keras.Model:
  """The layers after the pooling layer as a model of their own; its weights ARE the classifier's."""
  pool = model.get_layer(POOL_LAYER)
  inputs = keras.Input(pool.output.shape[1:], name="features")
  outputs = inputs
  for layer in model.layers[model.layers.index(pool) + 1:]:
    outputs = layer(outputs)
  return keras.Model(inputs, outputs, name=f"{model.name}_head")


def extract_views(model: keras.Model, images: tf.data.Dataset, batch_size: int,
                  augmenter: keras.Layer | None = None, views: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Features of every image in dataset order: [views, N, D] (view v: the v-th augmented pass), and labels [N]."""
  return _extract(model, images, batch_size, augmenter, views)[:2]


def _extract(model: keras.Model, images: tf.data.Dataset, batch_size: int, augmenter: keras.Layer | None = None,
             views: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """`extract_views`, and the ids [N] when the elements are (image, label, id) (else None)."""
  features_of = feature_model(model)

  @tf.function(reduce_retracing=True)
  def compute(batch):
    if augmenter is not None:
      batch = augmenter(batch, training=True)
    return features_of(batch, training=False)

  batches = images.batch(batch_size).prefetch(tf.data.AUTOTUNE)
  passes, labels, ids = [], None, None
  for _ in range(views if augmenter is not None else 1):
    outputs, pass_labels, pass_ids = [], [], []
    for batch in batches:
      outputs.append(compute(batch[0]).numpy())
      pass_labels.append(batch[1].numpy())
      pass_ids += [batch[2].numpy()] if len(batch) > 2 else []
    passes.append(np.concatenate(outputs).astype(np.float32))
    labels = np.concatenate(pass_labels).astype(np.int32)
    pass_ids = np.concatenate(pass_ids).astype(np.int64) if pass_ids else None
    if ids is not None and not np.array_equal(ids, pass_ids):  # A file that read in one pass and not in another.
      raise RuntimeError("The augmented feature passes saw different examples; extract again.")
    ids = pass_ids
  return np.stack(passes), labels, ids


def extract(model: keras.Model, images: tf.data.Dataset, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Features [N, D] of every image without augmentation, and labels [N], in dataset order."""
  features, labels = extract_views(model, images, batch_size)
  return features[0], labels


class FeatureCache:
  """Train features (one or more views) and val features of a classifier, and its head to train on them.

  path: an .npz file of exactly these features (see `load_or_extract`): read when it exists, else written after
  the extraction. '' keeps them in memory only.
  """

  def __init__(self, model: keras.Model, train_images: tf.data.Dataset, val_images: tf.data.Dataset,
               batch_size: int, augmenter: keras.Layer | None = None, views: int = 1, path: str = ""):
    self.head = head_of(model)
    if path and os.path.isfile(path) and self._read(path):
      logging.info("Read the cached features of %d training images (%d views) from %s.",
                   len(self.train_labels), self.views, path)
      return
    self.train_features, self.train_labels, self.train_ids = _extract(model, train_images, batch_size, augmenter,
                                                                      views)
    val_features, self.val_labels, self.val_ids = _extract(model, val_images, batch_size)
    self.val_features = val_features[0]
    if path:
      _save_arrays(path, {name: getattr(self, name) for name in _ARRAYS + _ID_ARRAYS
                          if getattr(self, name) is not None})

  def _read(self, path: str) -> bool:
    """Reads the arrays of `path`; a file that does not read back whole (truncated by a full disk or a copy,
    which failed every rerun with BadZipFile) is set aside in corrupt/ beside it, with one warning: False."""
    try:
      with np.load(path) as stored:
        self.train_features, self.train_labels, self.val_features, self.val_labels = (
            np.asarray(stored[name]) for name in _ARRAYS)
        self.train_ids, self.val_ids = (np.asarray(stored[name]) if name in stored else None for name in _ID_ARRAYS)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
      aside = os.path.join(os.path.dirname(path), "corrupt", os.path.basename(path))
      os.makedirs(os.path.dirname(aside), exist_ok=True)
      os.replace(path, aside)
      logging.warning("The cached features %s do not read back (%s: %s): moved to %s; extracting them again.",
                      path, type(e).__name__, str(e).strip()[:120], aside)
      return False
    return True

  @property
  def views(self) -> int:
    return len(self.train_features)

  def train_batches(self, epoch: int, batch_size: int, shuffle_seed: int) -> tf.data.Dataset:
    """Epoch `epoch`'s batches: view epoch mod K, shuffled exactly like `data.batches` shuffles the images."""
    examples = tf.data.Dataset.from_tensor_slices((self.train_features[epoch % self.views], self.train_labels))
    return data.batches(examples, batch_size, shuffle_seed=shuffle_seed)

  def val_batches(self, batch_size: int) -> tf.data.Dataset:
    return data.batches(tf.data.Dataset.from_tensor_slices((self.val_features, self.val_labels)), batch_size)


def cache_key(config: Config, data_identity: str, dtype_policy: str) -> str:
  """A hash of everything the cached features depend on, for the file name of `load_or_extract`.

  data_identity: the examples and their order (trainer.input.data.InputData.identity). The head, the learning rates and
  the epochs are not part of it: they do not change the features. The batch size is: augmentation draws its
  random transforms batch by batch.
  """
  factors = augment.factors(config.train)
  parts = {"data": data_identity, "backbone": config.model.backbone, "weights": _file_identity(config.model.weights),
           "alpha": config.model.alpha, "image_size": config.data.image_size,
           "feature_layer": config.model.feature_layer, "augment": dataclasses.asdict(factors),
           "views": config.train.feature_views if factors.any() else 1, "seed": config.data.seed,
           "batch_size": config.data.batch_size, "dtype_policy": dtype_policy,
           "format": 2}  # 2: the files hold the examples' ids.
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def folder(cache_dir: str, workdir_cache: str) -> str:
  """Where features are kept: --cache_dir when given (shared by the runs that use it: a sweep of head or fine-tune
  settings extracts once, and the key keeps other features apart), else the run's own cache folder."""
  return cache_dir or workdir_cache


def load_or_extract(model: keras.Model, train_images: tf.data.Dataset, val_images: tf.data.Dataset,
                    batch_size: int, augmenter: keras.Layer | None, views: int, cache_dir: str,
                    key: str) -> FeatureCache:
  """The features in cache_dir/features_<key>.npz, extracted and written there first if the file is missing."""
  _remove_dead_partials(cache_dir)
  return FeatureCache(model, train_images, val_images, batch_size, augmenter, views,
                      os.path.join(cache_dir, f"features_{key}.npz"))


def _file_identity(weights: str) -> str | list:
  """A weights file by path, size and modification time (a file replaced in place gets new features)."""
  if not os.path.isfile(weights):
    return weights  # imagenet or none
  status = os.stat(weights)
  return [os.path.abspath(weights), status.st_size, status.st_mtime_ns]


# A partial file's name says who writes it: runs sharing a --cache_dir (on several hosts) may write one file at once.
_PARTIAL = ".{host}.{pid}.partial.npz"


def _save_arrays(path: str, arrays: dict) -> None:
  """Atomic: a run killed while writing leaves no partial file under the final name. A full disk is no reason to
  stop a run that has its features in memory: one warning names the folder and the bytes needed, the partial
  file is removed, and the next run extracts again."""
  partial = path + _PARTIAL.format(host=socket.gethostname(), pid=os.getpid())
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(partial, **arrays)
    os.replace(partial, path)
  except OSError as e:
    if os.path.exists(partial):
      os.remove(partial)
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
      raise
    needed = sum(array.nbytes for array in arrays.values())
    logging.warning("The disk holding %s is full: the features (%.1f MiB) were not cached there (%.1f MiB free). "
                    "Training goes on with them in memory; free space there so that the next run need not extract "
                    "them again.", os.path.dirname(path), needed / 2**20,
                    shutil.disk_usage(os.path.dirname(path)).free / 2**20)
    return
  logging.info("Cached the features of %d training images in %s.", len(arrays["train_labels"]), path)


def _remove_dead_partials(folder: str) -> None:
  """Partial feature files that a killed run of this host left (its PID no longer runs) would stay forever."""
  host = socket.gethostname()
  for partial in glob.glob(os.path.join(glob.escape(folder), "features_*" + _PARTIAL.format(host=host, pid="*"))):
    pid = partial[:-len(".partial.npz")].rsplit(".", 1)[-1]
    if pid.isdigit() and not workdir_lib.process_runs(int(pid)):
      os.remove(partial)


# This worker's share of the features, padded like its images (the frozen phase's epochs) --------------------


class SharedFeatures:
  """The frozen phase's cached features of this worker's share, padded and weighted like its images."""

  def __init__(self, cache, train: data.Examples, val: data.Examples, dropped: frozenset[int] = frozenset()):
    """dropped: ids of training examples that weigh 0 (--drop_suspects)."""
    self.head, self.dropped = cache.head, dropped
    self._train = padded_arrays(cache.train_features, cache.train_labels, cache.train_ids, train, dropped)
    self._val = padded_arrays(cache.val_features[np.newaxis], cache.val_labels, cache.val_ids, val)

  def train_share(self, epoch: int, seed: int) -> tf.data.Dataset:
    views, labels, weights, ids = self._train
    dataset = tf.data.Dataset.from_tensor_slices((views[epoch % len(views)], labels, weights, ids))
    return dataset.shuffle(max(len(labels), 1), seed=seed, reshuffle_each_iteration=False)

  def val_share(self) -> tf.data.Dataset:
    views, labels, weights, ids = self._val
    return tf.data.Dataset.from_tensor_slices((views[0], labels, weights, ids))


def padded_arrays(views: np.ndarray, labels: np.ndarray, ids: np.ndarray, examples: data.Examples,
                   dropped: frozenset[int] = frozenset()):
  """[views, N, D] features of the share's real examples (ids [N]: which ones; without a cache, a file found
  undecodable is not among them) -> padded to the share's length with weight 0; the `dropped` ids weigh 0 too."""
  count, length = len(labels), examples.padded_length
  if ids is None and count != len(examples):
    raise RuntimeError(f"{count} cached features without ids for {len(examples)} examples: which is which is unknown.")
  order = np.concatenate([np.arange(count), np.resize(np.arange(count), max(length - count, 0))]).astype(int)
  weights = np.concatenate([np.ones(count, np.float32), np.zeros(max(length - count, 0), np.float32)])
  ids = np.asarray(examples.ids if ids is None else ids, np.int64)
  weights[:count][np.isin(ids, sorted(dropped))] = 0.0
  return views[:, order], np.asarray(labels, np.int32)[order], weights, ids[order]
