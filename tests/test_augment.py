"""Augmentation presets and overrides: they change pixels in training and are the identity at inference."""

import dataclasses

import numpy as np
import pytest

from trainer import config_checks
from trainer.config import Config
from trainer.errors import UserInputError
from trainer.modeling import augment


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


def test_strong_adds_colour_and_rand_augment_after_the_geometric_layers():
  assert [type(layer).__name__ for layer in augment.build(_train(augment="strong"), seed=0).layers] == [
      "RandomFlip", "RandomRotation", "RandomTranslation", "RandomShear", "RandomZoom", "RandomBrightness",
      "RandomContrast", "RandAugment"]


# The reference tutorials' generator: the truth `classic` is compared with.
_TUTORIAL_GENERATOR = dict(rotation_range=40, width_shift_range=0.2, height_shift_range=0.2, shear_range=0.2,
                           zoom_range=0.2, horizontal_flip=True)
_DRAWS, _HEIGHT, _WIDTH = 2000, 40, 30


def _generator(**arguments):
  from keras.src.legacy.preprocessing.image import ImageDataGenerator  # Keras 3 keeps it only here.
  return ImageDataGenerator(**arguments)


def _legacy_draws(generator, count: int) -> list[dict]:
  """`count` transforms of ImageDataGenerator.get_random_transform, which draws from numpy's global generator."""
  state = np.random.get_state()
  np.random.seed(0)
  try:
    return [generator.get_random_transform((_HEIGHT, _WIDTH, 3)) for _ in range(count)]
  finally:
    np.random.set_state(state)


def _classic_draws(count: int) -> dict[str, np.ndarray]:
  """The same quantities drawn by the classic preset's layers, for a batch of `count` images."""
  images = np.zeros((count, _HEIGHT, _WIDTH, 3), np.float32)
  layers = {type(layer).__name__: layer for layer in augment.build(_train(augment="classic"), seed=5).layers}
  draw = {name: layer.get_random_transformation(images, training=True) for name, layer in layers.items()}
  translations = np.asarray(draw["RandomTranslation"]["translations"])  # pixels, [x, y]
  return {"theta": np.asarray(draw["RandomRotation"]["angle"]).ravel(),
          "tx": translations[:, 1] / _HEIGHT, "ty": translations[:, 0] / _WIDTH,
          "zx": np.asarray(draw["RandomZoom"]["width_zoom"]).ravel(),
          "zy": np.asarray(draw["RandomZoom"]["height_zoom"]).ravel(),
          "flip_horizontal": np.asarray(draw["RandomFlip"]["flips"]).ravel().astype(np.float32)}


def test_classic_draws_rotations_shifts_zooms_and_flips_as_image_data_generator_does():
  from scipy import stats
  legacy = _legacy_draws(_generator(**_TUTORIAL_GENERATOR), _DRAWS)
  reference = {name: np.array([draw[name] for draw in legacy], np.float64) for name in legacy[0] if name != "shear"
               and legacy[0][name] is not None}
  reference["tx"] /= _HEIGHT  # ImageDataGenerator's shifts are in pixels
  reference["ty"] /= _WIDTH
  ours = _classic_draws(_DRAWS)
  for name in ("theta", "tx", "ty", "zx", "zy"):
    # Same distribution: the two-sample Kolmogorov-Smirnov test does not tell them apart...
    assert stats.ks_2samp(np.abs(reference[name]), np.abs(ours[name])).pvalue > 1e-3, name
    # ... up to the sign, which neither cares about (the range is symmetric about 0, or 1 for zooms).
    assert np.mean(ours[name]) == pytest.approx(np.mean(reference[name]), abs=0.05 * np.ptp(reference[name])), name
    assert np.ptp(ours[name]) == pytest.approx(np.ptp(reference[name]), rel=0.02), name
  # Width and height zoom independently, as zx and zy do: neither their correlation nor their difference shows it.
  assert abs(np.corrcoef(ours["zx"], ours["zy"])[0, 1]) < 0.1
  assert stats.ks_2samp(reference["zx"] - reference["zy"], ours["zx"] - ours["zy"]).pvalue > 1e-3
  assert np.mean(ours["flip_horizontal"]) == pytest.approx(np.mean(reference["flip_horizontal"]), abs=0.05)


def _sheared_line_slopes(shear_images, width: int = _WIDTH) -> np.ndarray:
  """How far a vertical line moves sideways per row, in pixels, in each sheared image: the shear's magnitude.
  (Wide enough images keep the line inside: Keras shears about the corner, ImageDataGenerator about the centre.)"""
  columns = np.arange(width, dtype=np.float64)
  line = np.exp(-0.5 * ((columns - width / 2) / 2.0) ** 2)
  image = np.repeat(np.repeat(line[None, :, None], _HEIGHT, axis=0), 3, axis=2).astype(np.float32)
  sheared = shear_images(image)[..., 0].astype(np.float64)  # [N, H, W]
  rows = slice(_HEIGHT // 4, 3 * _HEIGHT // 4)  # away from the fill at the top and bottom
  centres = (sheared[:, rows] * columns).sum(-1) / sheared[:, rows].sum(-1)
  return np.abs(np.polyfit(np.arange(centres.shape[1]), centres.T, 1)[0])


def test_classic_shears_by_image_data_generators_angle_in_degrees():
  """shear_range=0.2 is 0.2 degrees: a line tilts by at most tan(0.2 deg) px per row, not by 0.2 px per row."""
  from scipy import stats
  generator = _generator(shear_range=_TUTORIAL_GENERATOR["shear_range"], fill_mode="nearest")
  reference = _sheared_line_slopes(lambda image: np.stack(
      [generator.apply_transform(image, draw) for draw in _legacy_draws(generator, 500)]))
  only_shear = dataclasses.replace(augment.factors(_train(augment="classic")), flip="none", rotation=0.0, shift=0.0,
                                   zoom=0.0)
  layer = augment.build_from_factors(only_shear, seed=2)
  ours = _sheared_line_slopes(lambda image: np.asarray(layer(np.repeat(image[None], 500, 0), training=True)))
  assert reference.max() < 0.01 and ours.max() == pytest.approx(reference.max(), rel=0.1)
  assert stats.ks_2samp(reference, ours).pvalue > 1e-3


@pytest.mark.parametrize("degrees", [10.0, 30.0])
def test_a_shear_angle_tilts_the_image_as_image_data_generator_does(degrees):
  generator = _generator(fill_mode="nearest")
  reference = _sheared_line_slopes(lambda image: generator.apply_transform(image, {"shear": degrees})[None], 4 * _WIDTH)
  layer = augment.build_from_factors(augment.Factors(shear=degrees, fill_mode="nearest"), seed=0).layers[0]
  strongest = np.array([[max(layer.x_factor), 0.0]], np.float32)
  ours = _sheared_line_slopes(lambda image: np.asarray(layer.transform_images(
      image[None], {"shear_factor": strongest, "input_shape": image[None].shape}, training=True)), 4 * _WIDTH)
  assert ours[0] == pytest.approx(reference[0], rel=0.03)


def test_overrides_replace_only_their_factor():
  chosen = augment.factors(_train(augment="classic", rotation=0.0, zoom=0.5, flip="vertical"))
  preset = augment.factors(_train(augment="classic"))
  assert chosen == dataclasses.replace(preset, flip="vertical", rotation=0.0, zoom=0.5)
  layers = augment.build(_train(augment="classic", rotation=0.0, zoom=0.5), seed=0).layers
  assert "RandomRotation" not in [type(layer).__name__ for layer in layers]
  assert next(layer for layer in layers if type(layer).__name__ == "RandomZoom").height_factor == 0.5


@pytest.mark.parametrize("values, flag", [
    ({"augment": "heavy"}, "--augment"), ({"flip": "diagonal"}, "--flip"), ({"zoom": -0.3}, "--zoom"),
    ({"rand_augment": 2.0}, "--rand_augment")])
def test_bad_values_name_their_flag(values, flag):
  with pytest.raises(UserInputError, match=flag):
    config_checks.validate(Config().replace(**values))


def test_same_seed_same_augmentation():
  images = _images()
  first = augment.build(_train(augment="classic"), seed=3)(images, training=True)
  again = augment.build(_train(augment="classic"), seed=3)(images, training=True)
  np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
