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


def write_color_dataset(root: pathlib.Path, per_class: int, fmt: str = "JPEG", widths=None) -> pathlib.Path:
  """root/{red,green,blue}/ with `per_class` small images each (of the given widths, else 40 px wide)."""
  extension = {"JPEG": "jpg", "PNG": "png"}[fmt]
  for name, color in CLASS_COLORS.items():
    for i in range(per_class):
      write_image(root / name / f"{name}_{i}.{extension}", color, fmt=fmt,
                  size=(widths[i] if widths else 40, 32))
  return root


@pytest.fixture
def color_folder(tmp_path) -> pathlib.Path:
  """class folders directly: red/, green/, blue/ with 6 JPEGs each."""
  return write_color_dataset(tmp_path / "colors", 6)


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory, mobilenet_025_weights) -> pathlib.Path:
  """One frozen epoch of MobileNet alpha 0.25 at 32 px on red/green/blue JPEGs of several sizes, exported once:
  the run shared by the export, serving, predict and evaluate tests."""
  from trainer import train
  root = tmp_path_factory.mktemp("trained_run")
  write_color_dataset(root / "data", 6, widths=[40 + 4 * i for i in range(6)])
  config = Config().replace(backbone="mobilenet", alpha=0.25, weights=mobilenet_025_weights, image_size=32,
                            batch_size=8, frozen_epochs=1, finetune_epochs=0, head_units=8, augment="none",
                            verbosity=-1, data_dir=str(root / "data"), validation_split=0.34)
  train.train_and_evaluate(config, str(root / "run"))
  return root / "run"


@pytest.fixture(scope="session")
def trained_export_dir(trained_workdir) -> pathlib.Path:
  return trained_workdir / "export" / "classifier" / "1"


@pytest.fixture(scope="session")
def trained(trained_workdir):
  """The trained run's model, restored from its workdir."""
  from trainer import restore
  return restore.restore(str(trained_workdir))


@pytest.fixture
def tiny_config(mobilenet_025_weights) -> Config:
  """MobileNet alpha 0.25 with the shared ImageNet weights, at 32 px: a whole run takes seconds."""
  return Config().replace(backbone="mobilenet", alpha=0.25, weights=mobilenet_025_weights, image_size=32,
                          batch_size=8, frozen_epochs=1, finetune_epochs=1, head_units=8, augment="none",
                          verbosity=-1)
