"""The classifier: raw pixels in, class probabilities out, with the backbone's preprocessing inside the graph.

Phases only change which layers train. BatchNorm always runs in inference mode: the layers themselves are kept
`trainable=False`, because Keras 3 overrides a nested `base(x, training=False)` once layers are unfrozen
(keras-team/keras#20285) and batch statistics would then replace the pretrained ones.
"""

import keras

from trainer import backbones
from trainer.config import ModelConfig
from trainer.errors import UserInputError

FROZEN, FINETUNE = "frozen", "finetune"


@keras.saving.register_keras_serializable(package="transfer_trainer")
class BackbonePreprocessing(keras.layers.Layer):
  """The backbone's own `preprocess_input`, applied to images in 0..255."""

  def __init__(self, backbone: str, **kwargs):
    super().__init__(**kwargs)
    self.backbone = backbone
    self._preprocess = backbones.get(backbone).preprocess_input

  def call(self, images):
    return self._preprocess(images)

  def get_config(self):
    return {**super().get_config(), "backbone": self.backbone}


def build_classifier(config: ModelConfig, num_classes: int, image_size: int, seed: int) -> keras.Model:
  """Images float [N, S, S, 3] in 0..255 -> float32 probabilities [N, num_classes]."""
  base = backbones.build(config.backbone, config.weights, image_size, config.alpha, config.weights_fallback)
  inputs = keras.Input((image_size, image_size, 3), name="images")
  x = BackbonePreprocessing(config.backbone, name="preprocess")(inputs)
  x = base(x, training=False)
  x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
  outputs = classification_head(x, config.head_units, config.dropout, num_classes, seed)
  model = keras.Model(inputs, outputs, name=f"{config.backbone}_classifier")
  set_phase(model, FROZEN, unfreeze_from="")
  return model


def classification_head(features, head_units: int, dropout: float, num_classes: int, seed: int):
  """Pooled features -> Dense(head_units, relu) -> Dropout -> Dense(num_classes) -> float32 softmax."""
  x = features
  if head_units:
    x = keras.layers.Dense(head_units, activation="relu", name="head_dense",
                           kernel_initializer=keras.initializers.GlorotUniform(seed))(x)
  x = keras.layers.Dropout(dropout, seed=seed, name="head_dropout")(x)
  x = keras.layers.Dense(num_classes, name="logits", kernel_initializer=keras.initializers.GlorotUniform(seed + 1))(x)
  # Float32 even under a mixed policy: a float16 softmax loses small probabilities.
  return keras.layers.Activation("softmax", dtype="float32", name="probabilities")(x)


def backbone_of(model: keras.Model) -> keras.Model:
  return model.get_layer("backbone")


def unfreeze_index(base: keras.Model, unfreeze_from: str) -> int:
  names = [layer.name for layer in base.layers]
  if unfreeze_from not in names:
    raise UserInputError(f"--unfreeze_from={unfreeze_from} is not a layer of the backbone {base.name}. "
                         "Run with --list_layers to see the layer names.")
  return names.index(unfreeze_from)


def set_phase(model: keras.Model, phase: str, unfreeze_from: str) -> None:
  """Frozen: only the head trains. Fine-tune: also backbone layers from `unfreeze_from` up. BatchNorm never."""
  base = backbone_of(model)
  if phase == FROZEN:
    base.trainable = False
    return
  if phase != FINETUNE:
    raise ValueError(f"Unknown phase {phase!r}")
  start = unfreeze_index(base, unfreeze_from)
  base.trainable = True
  for index, layer in enumerate(base.layers):
    layer.trainable = index >= start and not isinstance(layer, keras.layers.BatchNormalization)
