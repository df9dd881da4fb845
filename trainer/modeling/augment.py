"""Augmentation as Keras preprocessing layers, applied inside the train step on the replica's device.

Never part of the tf.data pipeline (that would put it on the CPU) and never part of the exported model; the
layers are the identity when called with training=False. A preset names a set of factors (`PRESETS`); each factor
can be overridden on its own (--rotation, --zoom, ...).

Factors follow ImageDataGenerator's meaning, so the tutorials' numbers carry over: rotation and shear are angles in
degrees (its legacy code converts both with np.deg2rad), shift and zoom fractions of the size.
"""

import dataclasses
import math

import keras
import numpy as np
import tensorflow as tf

from trainer.config import Config, TrainConfig
from trainer.input import data

FLIPS = ("none", "horizontal", "vertical", "horizontal_and_vertical")


@dataclasses.dataclass(frozen=True)
class Factors:
  flip: str = "none"
  rotation: float = 0.0  # degrees
  shift: float = 0.0  # fraction of width and of height
  shear: float = 0.0  # degrees, ImageDataGenerator's shear_range: x moves by sin(angle) * y
  zoom: float = 0.0
  brightness: float = 0.0  # fraction of the 0..255 range
  contrast: float = 0.0
  rand_augment: float = 0.0  # RandAugment's factor; 0 leaves it out
  # Not flags, properties of a preset: width and height zoomed by separate draws (ImageDataGenerator's zx and zy)
  # rather than one that keeps the aspect ratio; how pixels shifted in from outside the image are filled.
  zoom_independent: bool = False
  fill_mode: str = "reflect"

  def any(self) -> bool:
    return dataclasses.replace(self, zoom_independent=False, fill_mode="reflect") != Factors()


# The factors a flag of the same name overrides.
FLAG_FACTORS = ("flip", "rotation", "shift", "shear", "zoom", "brightness", "contrast", "rand_augment")

# classic is the reference tutorials' ImageDataGenerator(rotation_range=40, width_shift_range=0.2,
# height_shift_range=0.2, shear_range=0.2, zoom_range=0.2, horizontal_flip=True), with its fill_mode="nearest".
# Its shear_range is 0.2 degrees, not 20% of the image: a shift of 0.35% of the height across the image.
_CLASSIC = Factors(flip="horizontal", rotation=40.0, shift=0.2, shear=0.2, zoom=0.2, zoom_independent=True,
                   fill_mode="nearest")
PRESETS = {
    "none": Factors(),
    "light": Factors(flip="horizontal", rotation=10.8, zoom=0.1),
    "classic": _CLASSIC,
    "strong": dataclasses.replace(_CLASSIC, brightness=0.2, contrast=0.2, rand_augment=0.5),
}


def factors(config: TrainConfig) -> Factors:
  """The preset's factors with the ones given on the command line (a flip name, or a number >= 0) replacing them.
  Names and ranges were checked when the command started (trainer.config_checks)."""
  overrides = {name: getattr(config, name) for name in FLAG_FACTORS}
  overrides = {name: value for name, value in overrides.items() if value != "" and value != -1.0}
  return dataclasses.replace(PRESETS[config.augment], **overrides)


def build(config: TrainConfig, seed: int) -> keras.Sequential | None:
  """The augmentation layers of the configured factors, or None when there is nothing to do."""
  return build_from_factors(factors(config), seed)


def build_from_factors(chosen: Factors, seed: int) -> keras.Sequential | None:
  """Layers for images in 0..255; each layer has its own seed, so a run's augmentation replays.

  The geometric layers come in ImageDataGenerator's order (rotation, shift, shear, zoom), so their composition is
  its one affine transform; each layer resamples the image once, where ImageDataGenerator resamples once in all."""
  if not chosen.any():
    return None
  layers = []
  fill = dict(fill_mode=chosen.fill_mode)
  if chosen.flip != "none":
    layers.append(keras.layers.RandomFlip(chosen.flip, seed=seed))
  if chosen.rotation:
    layers.append(keras.layers.RandomRotation(chosen.rotation / 360, seed=seed + 1, **fill))
  if chosen.shift:
    layers.append(keras.layers.RandomTranslation(chosen.shift, chosen.shift, seed=seed + 2, **fill))
  if chosen.shear:
    # RandomShear's factor is the shift of x per unit of y; ImageDataGenerator shears x only, by sin(angle).
    layers.append(keras.layers.RandomShear(x_factor=math.sin(math.radians(chosen.shear)), y_factor=0.0,
                                           seed=seed + 3, **fill))
  if chosen.zoom:
    width_factor = chosen.zoom if chosen.zoom_independent else None
    layers.append(keras.layers.RandomZoom(chosen.zoom, width_factor, seed=seed + 4, **fill))
  if chosen.brightness:
    layers.append(keras.layers.RandomBrightness(chosen.brightness, value_range=(0, 255), seed=seed + 5))
  if chosen.contrast:
    layers.append(keras.layers.RandomContrast(chosen.contrast, value_range=(0, 255), seed=seed + 6))
  if chosen.rand_augment:
    layers.append(keras.layers.RandAugment(value_range=(0, 255), factor=chosen.rand_augment, seed=seed + 7))
  return keras.Sequential(layers, name="augment")


def first_batch(config: Config, train_images: tf.data.Dataset, count: int) -> tuple[np.ndarray, np.ndarray]:
  """The first `count` images of the first epoch through a new augmenter of the run's preset and seed: what the
  model sees (a TensorBoard grid), without drawing from the random state of the trainer's own augmenter."""
  images, labels = next(iter(data.batches(train_images, count, shuffle_seed=config.data.seed)))
  augmenter = build(config.train, config.data.seed)
  if augmenter is not None:
    images = augmenter(images, training=True)
  return np.asarray(images), labels.numpy()
