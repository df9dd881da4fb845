"""Augmentation presets and overrides: they change pixels in training and are the identity at inference."""

import numpy as np
import pytest

from trainer import augment
from trainer.config import Config
from trainer.errors import UserInputError


def _images(seed=0):
  """A batch with structure (gradients and noise), so every geometric and colour change shows."""
  rng = np.random.default_rng(seed)
  ramp = np.linspace(0, 255, 32, dtype=np.float32)
  base = np.stack([ramp[None, :].repeat(32, 0), ramp[:, None].repeat(32, 1), np.full((32, 32), 90.0)], axis=-1)
  return np.clip(base[None] + rng.normal(0, 25, (4, 32, 32, 3)), 0, 255).astype(np.float32)


def _train(**values):
  return Config().replace(**values).train


@pytest.mark.parametrize("preset", ["light", "classic", "strong"])
def test_presets_change_pixels_in_training_and_are_the_identity_at_inference(preset):
  augmenter = augment.build(_train(augment=preset), seed=1)
  images = _images()
  trained = np.asarray(augmenter(images, training=True))
  assert trained.shape == images.shape
  assert np.abs(trained - images).mean() > 1.0
  np.testing.assert_array_equal(np.asarray(augmenter(images, training=False)), images)


def test_none_builds_nothing_and_an_override_alone_builds_that_layer():
  assert augment.build(_train(augment="none"), seed=1) is None
  only_flip = augment.build(_train(augment="none", flip="horizontal"), seed=1)
  assert [type(layer).__name__ for layer in only_flip.layers] == ["RandomFlip"]


def test_classic_is_the_reference_image_data_generator_set():
  assert augment.factors(_train(augment="classic")) == augment.Factors(
      flip="horizontal", rotation=40.0, shift=0.2, shear=0.2, zoom=0.2)
  strong = augment.factors(_train(augment="strong"))
  assert strong.brightness > 0 and strong.contrast > 0 and strong.rand_augment > 0
  assert [type(layer).__name__ for layer in augment.build(_train(augment="strong"), seed=0).layers] == [
      "RandomFlip", "RandomRotation", "RandomTranslation", "RandomShear", "RandomZoom", "RandomBrightness",
      "RandomContrast", "RandAugment"]


def test_overrides_replace_only_their_factor():
  chosen = augment.factors(_train(augment="classic", rotation=0.0, zoom=0.5, flip="vertical"))
  assert chosen == augment.Factors(flip="vertical", rotation=0.0, shift=0.2, shear=0.2, zoom=0.5)
  layers = augment.build(_train(augment="classic", rotation=0.0, zoom=0.5), seed=0).layers
  assert "RandomRotation" not in [type(layer).__name__ for layer in layers]
  assert next(layer for layer in layers if type(layer).__name__ == "RandomZoom").height_factor == 0.5


@pytest.mark.parametrize("values, flag", [
    ({"augment": "heavy"}, "--augment"), ({"flip": "diagonal"}, "--flip"), ({"zoom": -0.3}, "--zoom"),
    ({"rand_augment": 2.0}, "--rand_augment")])
def test_bad_values_name_their_flag(values, flag):
  with pytest.raises(UserInputError, match=flag):
    augment.factors(_train(**values))


def test_same_seed_same_augmentation():
  images = _images()
  first = augment.build(_train(augment="classic"), seed=3)(images, training=True)
  again = augment.build(_train(augment="classic"), seed=3)(images, training=True)
  np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
