"""Augmentation as Keras preprocessing layers, applied inside the train step on the replica's device.

Never part of the tf.data pipeline (that would put it on the CPU) and never part of the exported model.
"""

import keras

from trainer.errors import UserInputError

PRESETS = ("none", "light", "classic", "strong")


def build(preset: str, seed: int) -> keras.Sequential | None:
  """The augmentation layers of a preset, or None for "none". Inputs are float images in 0..255."""
  if preset not in PRESETS:
    raise UserInputError(f"--augment={preset} is not known. Choose one of: {', '.join(PRESETS)}.")
  if preset == "none":
    return None
  layers = [keras.layers.RandomFlip("horizontal", seed=seed)]
  if preset == "light":
    layers += [keras.layers.RandomRotation(0.03, seed=seed + 1), keras.layers.RandomZoom(0.1, seed=seed + 2)]
  else:
    # The reference tutorials' ImageDataGenerator: rotation 40 degrees, shifts 0.2, shear 0.2, zoom 0.2, flip.
    layers += [keras.layers.RandomRotation(40 / 360, seed=seed + 1),
               keras.layers.RandomTranslation(0.2, 0.2, seed=seed + 2),
               keras.layers.RandomShear(x_factor=0.2, y_factor=0.2, seed=seed + 3),
               keras.layers.RandomZoom(0.2, seed=seed + 4)]
  if preset == "strong":
    layers += [keras.layers.RandomBrightness(0.2, value_range=(0, 255), seed=seed + 5),
               keras.layers.RandomContrast(0.2, value_range=(0, 255), seed=seed + 6),
               keras.layers.RandAugment(value_range=(0, 255), seed=seed + 7)]
  return keras.Sequential(layers, name=f"augment_{preset}")
