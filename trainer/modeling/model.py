"""The classifier: raw pixels in, class probabilities out, with the backbone's preprocessing inside the graph.

A run trains in phases (`phases`), which only change which layers train:
  pretrained weights: frozen (only the head trains), then finetune (the backbone from --unfreeze_from up, or all of
    it with --unfreeze_from=all, trains too);
  --weights=none: one phase, scratch, where every layer trains from the first epoch (a frozen phase would train a
    head on random features).

BatchNorm: Keras 3 ignores a nested `base(x, training=False)` once the outer model is called with training=True
(keras-team/keras#20285); a BatchNormalization layer uses (and updates) batch statistics exactly when it is
trainable. So --batchnorm=frozen keeps every BatchNorm layer trainable=False (inference mode, the pretrained
statistics, gamma and beta fixed) and --batchnorm=train makes the BatchNorm layers among the training ones trainable.
"""

import dataclasses

import keras
from absl import logging

from trainer.config import Config, ModelConfig
from trainer.errors import UserInputError
from trainer.modeling import backbones

FROZEN, FINETUNE, SCRATCH = "frozen", "finetune", "scratch"
UNFREEZE_ALL = "all"
# Fewer examples per replica than this make BatchNorm's batch statistics too noisy to train on.
MIN_BATCHNORM_BATCH = 8
# The momentum of the moving statistics of BatchNorm layers that train (PyTorch's default): the Keras applications'
# 0.99 (MobileNet) and 0.999 (MobileNetV2) average over ~100 and ~1000 steps, longer than a whole run on a small
# dataset, and evaluation would normalise with statistics still near their initial values (measured: chance
# accuracy after 120 steps from scratch).
TRAINING_BATCHNORM_MOMENTUM = 0.9


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


def from_scratch(config: ModelConfig) -> bool:
  return config.weights == "none"


def batchnorm_mode(config: ModelConfig) -> str:
  """--batchnorm, or its default: pretrained statistics stay (frozen); random ones must be learned (train)."""
  return config.batchnorm or ("train" if from_scratch(config) else "frozen")


def phases(config: Config) -> list[tuple[str, int]]:
  """(phase, epochs) in training order. From scratch, the run's frozen_epochs + finetune_epochs epochs are one
  scratch phase at --frozen_lr: the same number of epochs as the transfer run of the same flags."""
  epochs = config.train.frozen_epochs, config.train.finetune_epochs
  if from_scratch(config.model):
    return [(SCRATCH, sum(epochs))]
  return [(FROZEN, epochs[0]), (FINETUNE, epochs[1])]


def phase_of_epoch(epoch: int, config: Config) -> str:
  """Phase of the 0-based epoch index; epochs are numbered continuously across the phases."""
  for phase, epochs in phases(config):
    if epoch < epochs:
      return phase
    epoch -= epochs
  raise ValueError(f"Epoch index {epoch} is past the run's {phases(config)}")


def announce_plan(config: Config, per_replica_batch_size: int) -> None:
  """Logs the one line of a from-scratch run about its phases, and warns when --batchnorm=train would normalise
  with the statistics of batches too small for them."""
  if from_scratch(config.model):
    logging.info("--weights=none: training from scratch, every layer from the first epoch, %d epochs at "
                 "--frozen_lr=%g; no frozen phase (its features would be random).", phases(config)[0][1],
                 config.train.frozen_lr)
  trains_batchnorm = batchnorm_mode(config.model) == "train" and any(
      epochs and phase != FROZEN for phase, epochs in phases(config))
  if trains_batchnorm and per_replica_batch_size < MIN_BATCHNORM_BATCH:
    logging.warning("--batchnorm=train with %d examples per replica: BatchNorm's batch statistics will be noisy; "
                    "use a --batch_size of at least %d per replica, or --batchnorm=frozen.", per_replica_batch_size,
                    MIN_BATCHNORM_BATCH)


def build_backbone(config: ModelConfig, image_size: int, seed: int) -> keras.Model:
  """The backbone (named "backbone"), cut at --feature_layer when given."""
  if from_scratch(config):
    # Its random init is where the run starts: seeded like the rest of the run (--seed).
    keras.utils.set_random_seed(seed)
  base = backbones.build(config.backbone, config.weights, image_size, config.alpha, config.weights_fallback)
  if not config.feature_layer:
    return base
  _check_layer_name(base, "feature_layer", config.feature_layer, "and the same --backbone and --alpha")
  return keras.Model(base.input, base.get_layer(config.feature_layer).output, name="backbone")


def build_classifier(config: ModelConfig, num_classes: int, image_size: int, seed: int) -> keras.Model:
  """Images float [N, S, S, 3] in 0..255 -> float32 probabilities [N, num_classes]."""
  base = build_backbone(config, image_size, seed)
  inputs = keras.Input((image_size, image_size, 3), name="images")
  x = BackbonePreprocessing(config.backbone, name="preprocess")(inputs)
  # No training=False here: Keras 3 overrides it (see the module docstring); `set_phase` decides BatchNorm's mode.
  x = base(x)
  x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
  outputs = classification_head(x, config.head_units, config.dropout, num_classes, seed)
  model = keras.Model(inputs, outputs, name=f"{config.backbone}_classifier")
  set_phase(model, SCRATCH if from_scratch(config) else FROZEN, config.unfreeze_from, batchnorm_mode(config))
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


def _check_layer_name(base: keras.Model, flag: str, name: str, listed_with: str) -> None:
  if name not in [layer.name for layer in base.layers]:
    raise UserInputError(f"--{flag}={name} is not a layer of the backbone. List its layers with: python -m "
                         f"trainer.main --list_layers {listed_with}.")


def unfreeze_index(base: keras.Model, unfreeze_from: str) -> int:
  """Index of the first backbone layer the fine-tune phase trains (0 for --unfreeze_from=all)."""
  if unfreeze_from == UNFREEZE_ALL:
    return 0
  _check_layer_name(base, "unfreeze_from", unfreeze_from, "and the same --backbone, --alpha and --feature_layer")
  return [layer.name for layer in base.layers].index(unfreeze_from)


def set_phase(model: keras.Model, phase: str, unfreeze_from: str, batchnorm: str = "frozen") -> None:
  """Makes the classifier's layers of `phase` trainable (see `set_backbone_phase`); the head always trains."""
  set_backbone_phase(backbone_of(model), phase, unfreeze_from, batchnorm)


def set_backbone_phase(base: keras.Model, phase: str, unfreeze_from: str, batchnorm: str) -> None:
  """Frozen: no backbone layer trains. Fine-tune: the layers from `unfreeze_from` up. Scratch: every layer.
  BatchNorm layers among them train (batch statistics) only with batchnorm == "train"."""
  if phase == FROZEN:
    base.trainable = False
    return
  if phase not in (FINETUNE, SCRATCH):
    raise ValueError(f"Unknown phase {phase!r}")
  start = unfreeze_index(base, unfreeze_from) if phase == FINETUNE else 0
  base.trainable = True
  for index, layer in enumerate(base.layers):
    is_batchnorm = isinstance(layer, keras.layers.BatchNormalization)
    layer.trainable = index >= start and (batchnorm == "train" or not is_batchnorm)
    if is_batchnorm and layer.trainable:
      layer.momentum = TRAINING_BATCHNORM_MOMENTUM


def describe_layers(config: Config) -> str:
  """--list_layers: the (cut) backbone's layers, one a line, with what trains in each phase of the run."""
  model = config.model
  base = build_backbone(dataclasses.replace(model, weights_fallback=True), config.data.image_size, config.data.seed)
  names = [layer.name for layer in base.layers]
  plan = [(phase, epochs) for phase, epochs in phases(config) if epochs]
  header = [f"Backbone {model.backbone} at {config.data.image_size} px"
            + (f", cut at --feature_layer={model.feature_layer}" if model.feature_layer else "")
            + f", --batchnorm={batchnorm_mode(model)}. The head trains in every phase; a column per phase says "
            "whether the layer trains in it."]
  if model.unfreeze_from not in (*names, UNFREEZE_ALL):
    header.append(f"--unfreeze_from={model.unfreeze_from} is not among these layers: pick one of them (or all).")
    plan = [(phase, epochs) for phase, epochs in plan if phase != FINETUNE]
  marks = {}
  for phase, _ in plan:
    set_backbone_phase(base, phase, model.unfreeze_from, batchnorm_mode(model))
    marks[phase] = [_trains_mark(layer) for layer in base.layers]
  columns = [f"{phase} ({epochs} ep.)" for phase, epochs in plan]
  lines = header + [f"{'idx':>4}  {'name':<32} {'type':<26} {'params':>10}" + "".join(f"  {c:<16}" for c in columns)]
  fine_tunes = any(phase == FINETUNE for phase, _ in plan)
  for index, layer in enumerate(base.layers):
    mark = ("  <- fine-tuning starts here (--unfreeze_from)" if fine_tunes and layer.name == model.unfreeze_from
            else "")
    trains = "".join(f"  {marks[phase][index]:<16}" for phase, _ in plan)
    lines.append(f"{index:>4}  {layer.name:<32} {type(layer).__name__:<26} {layer.count_params():>10,}{trains}{mark}")
  return "\n".join(line.rstrip() for line in lines)


def _trains_mark(layer: keras.Layer) -> str:
  """yes / no for a layer with weights; blank for one without (nothing to train)."""
  if not layer.weights:
    return ""
  return "yes" if layer.trainable else "no"
