"""Shared fixtures: the real data in ../shared (one place finds it), tiny generated datasets, a tiny model config."""

import os
import pathlib

import numpy as np
import pytest
from PIL import Image

from trainer.config import Config

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
  """../shared beside the checkout (override with TRANSFER_TRAINER_SHARED). Missing under CI is a failure."""
  path = pathlib.Path(os.environ.get("TRANSFER_TRAINER_SHARED", REPO.parent / "shared"))
  if not (path / "weights").is_dir():
    message = f"shared test data not found at {path} (set TRANSFER_TRAINER_SHARED)"
    if os.environ.get("CI"):
      pytest.fail(message)
    pytest.skip(message)
  return path


@pytest.fixture(scope="session")
def mobilenet_025_weights(shared_dir) -> str:
  return str(shared_dir / "weights" / "mobilenet_2_5_224_tf_no_top.h5")


def write_image(path: pathlib.Path, color, size=(40, 32), fmt=None, mode="RGB") -> pathlib.Path:
  """A small real image file: a solid colour with a noise texture, so classes differ visibly."""
  rng = np.random.default_rng(abs(hash((str(path.name), tuple(color)))) % 2**32)
  pixels = np.clip(np.array(color, np.float32) + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
  image = Image.fromarray(pixels, "RGB").convert(mode)
  path.parent.mkdir(parents=True, exist_ok=True)
  image.save(path, format=fmt)
  return path


CLASS_COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}


@pytest.fixture
def color_folder(tmp_path) -> pathlib.Path:
  """class folders directly: red/, green/, blue/ with 6 JPEGs each."""
  root = tmp_path / "colors"
  for name, color in CLASS_COLORS.items():
    for i in range(6):
      write_image(root / name / f"{name}_{i}.jpg", color)
  return root


@pytest.fixture
def tiny_config(mobilenet_025_weights) -> Config:
  """MobileNet alpha 0.25 with the shared ImageNet weights, at 32 px: a whole run takes seconds."""
  return Config().replace(backbone="mobilenet", alpha=0.25, weights=mobilenet_025_weights, image_size=32,
                          batch_size=8, frozen_epochs=1, finetune_epochs=1, head_units=8, augment="none",
                          verbosity=-1)
