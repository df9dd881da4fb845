"""The frozen phase computed once: pooled backbone features, and the classifier's head trained on them.

While the backbone is frozen (and BatchNorm in inference mode) its output depends only on the input image, so
every frozen epoch recomputes the same features. `--cache_features` computes them once per image (with
augmentation: `--feature_views=K` augmented views per image, epoch e training on view e mod K) and trains the
head alone on them. The head is the classifier's own layers after the pooling layer, so the fine-tune phase
starts from it, and with augmentation off it receives the same inputs in the same batches as end-to-end frozen
training: the same head comes out, in a fraction of the time.

API, also for hyper-parameter search on cached features:

  feature_model(model) -> keras.Model       images 0..255 [N, S, S, 3] -> pooled features [N, D]
  head_of(model) -> keras.Model             pooled features [N, D] -> probabilities, sharing the model's layers
  extract(model, images, batch_size) -> (features float32 [N, D], labels int32 [N])
  extract_views(model, images, batch_size, augmenter, views) -> (features [views, N, D], labels [N])
  FeatureCache(model, train_images, val_images, batch_size, augmenter, views): both splits, batched per epoch

`images` is an unbatched tf.data.Dataset of (float32 image [S, S, 3] in 0..255, int32 label), as in
`trainer.data.Examples.images`.
"""

import keras
import numpy as np
import tensorflow as tf

from trainer import data

# The layer of the classifier (trainer.model.build_classifier) whose output the head starts from.
POOL_LAYER = "pool"


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
  features_of = feature_model(model)

  @tf.function(reduce_retracing=True)
  def compute(batch):
    if augmenter is not None:
      batch = augmenter(batch, training=True)
    return features_of(batch, training=False)

  batches = images.batch(batch_size).prefetch(tf.data.AUTOTUNE)
  passes, labels = [], None
  for _ in range(views if augmenter is not None else 1):
    outputs, pass_labels = [], []
    for batch, batch_labels in batches:
      outputs.append(compute(batch).numpy())
      pass_labels.append(batch_labels.numpy())
    passes.append(np.concatenate(outputs).astype(np.float32))
    labels = np.concatenate(pass_labels).astype(np.int32)
  return np.stack(passes), labels


def extract(model: keras.Model, images: tf.data.Dataset, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Features [N, D] of every image without augmentation, and labels [N], in dataset order."""
  features, labels = extract_views(model, images, batch_size)
  return features[0], labels


class FeatureCache:
  """Train features (one or more views) and val features of a classifier, and its head to train on them."""

  def __init__(self, model: keras.Model, train_images: tf.data.Dataset, val_images: tf.data.Dataset,
               batch_size: int, augmenter: keras.Layer | None = None, views: int = 1):
    self.head = head_of(model)
    self.train_features, self.train_labels = extract_views(model, train_images, batch_size, augmenter, views)
    self.val_features, self.val_labels = extract(model, val_images, batch_size)

  @property
  def views(self) -> int:
    return len(self.train_features)

  def train_batches(self, epoch: int, batch_size: int, shuffle_seed: int, deterministic: bool) -> tf.data.Dataset:
    """Epoch `epoch`'s batches: view epoch mod K, shuffled exactly like `data.batches` shuffles the images."""
    examples = tf.data.Dataset.from_tensor_slices((self.train_features[epoch % self.views], self.train_labels))
    return data.batches(examples, batch_size, shuffle_seed=shuffle_seed, deterministic=deterministic)

  def val_batches(self, batch_size: int) -> tf.data.Dataset:
    return data.batches(tf.data.Dataset.from_tensor_slices((self.val_features, self.val_labels)), batch_size)
