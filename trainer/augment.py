"""Augmentation as Keras preprocessing layers, applied inside the train step on the replica's device.

Never part of the tf.data pipeline (that would put it on the CPU) and never part of the exported model; the
layers are the identity when called with training=False. A preset names a set of factors (`PRESETS`); each factor
can be overridden on its own (--rotation, --zoom, ...).
"""

import dataclasses

import keras

from trainer.config import TrainConfig
from trainer.errors import UserInputError

FLIPS = ("none", "horizontal", "vertical", "horizontal_and_vertical")


@dataclasses.dataclass(frozen=True)
class Factors:
  flip: str = "none"
  rotation: float = 0.0  # degrees
  shift: float = 0.0  # fraction of width and of height
  shear: float = 0.0
  zoom: float = 0.0
  brightness: float = 0.0  # fraction of the 0..255 range
  contrast: float = 0.0
  rand_augment: float = 0.0  # RandAugment's factor; 0 leaves it out

  def any(self) -> bool:
    return self != Factors()


# classic is the reference tutorials' ImageDataGenerator(rotation_range=40, width_shift_range=0.2,
# height_shift_range=0.2, shear_range=0.2, zoom_range=0.2, horizontal_flip=True).
_CLASSIC = Factors(flip="horizontal", rotation=40.0, shift=0.2, shear=0.2, zoom=0.2)
PRESETS = {
    "none": Factors(),
    "light": Factors(flip="horizontal", rotation=10.8, zoom=0.1),
    "classic": _CLASSIC,
    "strong": dataclasses.replace(_CLASSIC, brightness=0.2, contrast=0.2, rand_augment=0.5),
}


def factors(config: TrainConfig) -> Factors:
  """The preset's factors with the ones given on the command line (a flip name, or a number >= 0) replacing them."""
  if config.augment not in PRESETS:
    raise UserInputError(f"--augment={config.augment} is not known. Choose one of: {', '.join(PRESETS)}.")
  overrides = {field.name: getattr(config, field.name) for field in dataclasses.fields(Factors)}
  overrides = {name: value for name, value in overrides.items() if value != "" and value != -1.0}
  if overrides.get("flip", "none") not in FLIPS:
    raise UserInputError(f"--flip={overrides['flip']} is not known. Choose one of: {', '.join(FLIPS)}.")
  for name, value in overrides.items():
    if name != "flip" and value < 0:
      raise UserInputError(f"--{name}={value}: give a value >= 0, or -1 for the --augment preset's.")
  if overrides.get("rand_augment", 0.0) > 1.0:
    raise UserInputError(f"--rand_augment={overrides['rand_augment']}: RandAugment's strength is between 0 and 1.")
  return dataclasses.replace(PRESETS[config.augment], **overrides)


def build(config: TrainConfig, seed: int) -> keras.Sequential | None:
  """The augmentation layers of the configured factors, or None when there is nothing to do."""
  return build_from_factors(factors(config), seed)


def build_from_factors(chosen: Factors, seed: int) -> keras.Sequential | None:
  """Layers for images in 0..255; each layer has its own seed, so a run's augmentation replays."""
  if not chosen.any():
    return None
  layers = []
  if chosen.flip != "none":
    layers.append(keras.layers.RandomFlip(chosen.flip, seed=seed))
  if chosen.rotation:
    layers.append(keras.layers.RandomRotation(chosen.rotation / 360, seed=seed + 1))
  if chosen.shift:
    layers.append(keras.layers.RandomTranslation(chosen.shift, chosen.shift, seed=seed + 2))
  if chosen.shear:
    layers.append(keras.layers.RandomShear(x_factor=chosen.shear, y_factor=chosen.shear, seed=seed + 3))
  if chosen.zoom:
    layers.append(keras.layers.RandomZoom(chosen.zoom, seed=seed + 4))
  if chosen.brightness:
    layers.append(keras.layers.RandomBrightness(chosen.brightness, value_range=(0, 255), seed=seed + 5))
  if chosen.contrast:
    layers.append(keras.layers.RandomContrast(chosen.contrast, value_range=(0, 255), seed=seed + 6))
  if chosen.rand_augment:
    layers.append(keras.layers.RandAugment(value_range=(0, 255), factor=chosen.rand_augment, seed=seed + 7))
  return keras.Sequential(layers, name="augment")
