"""Shared fixtures: the real data in ../shared (one place finds it), tiny generated datasets, a tiny model config.

Tests of mechanics (export, resume, strategies, reporting, ...) use `random_mobilenet_025_weights`, made here, and
run on any machine; only tests of transfer quality need real ImageNet weights (`mobilenet_025_weights`).
"""

import os
import pathlib
import zlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from trainer.config import Config

REPO = pathlib.Path(__file__).resolve().parent.parent

# Two logical CPUs, set before TensorFlow initialises its devices: MirroredStrategy runs in-process over them
# (default-strategy code runs on the first).
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                           [tf.config.LogicalDeviceConfiguration()] * 2)

# The one tiny run of the mechanics tests: MobileNet alpha 0.25 at 32 px, a frozen and a fine-tune epoch, with the
# defaults' randomness (augmentation, dropout, shuffled non-deterministic input) left on.
TINY_RUN = {"backbone": "mobilenet", "alpha": 0.25, "image_size": 32, "batch_size": 4, "frozen_epochs": 1,
            "finetune_epochs": 1, "head_units": 8, "verbosity": -1}


def tiny_run(weights: str, **overrides) -> Config:
  return Config().replace(**{**TINY_RUN, "weights": weights, **overrides})


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
  """../shared beside the checkout (override with TRANSFER_TRAINER_SHARED). Missing under CI is a failure."""
  path = pathlib.Path(os.environ.get("TRANSFER_TRAINER_SHARED", REPO.parent / "shared"))
  if not (path / "weights").is_dir():
    _missing(f"shared test data (real photos, ImageNet weights) not found at {path}: put the project's shared "
             "folder beside the checkout or set TRANSFER_TRAINER_SHARED to it")
  return path


def _missing(message: str):
  """Skips a test that needs real data or weights; under CI, where they are provided, their absence fails it."""
  if os.environ.get("CI"):
    pytest.fail(message)
  pytest.skip(message)


@pytest.fixture(scope="session")
def mobilenet_025_weights() -> str:
  """ImageNet MobileNet alpha 0.25 (no top), for tests of transfer quality: ../shared's file, else Keras' download
  (cached in ~/.keras/models where there is a network)."""
  shared = pathlib.Path(os.environ.get("TRANSFER_TRAINER_SHARED", REPO.parent / "shared"))
  name = "mobilenet_2_5_224_tf_no_top.h5"
  if (shared / "weights" / name).is_file():
    return str(shared / "weights" / name)
  import keras
  from keras.src.applications.mobilenet import BASE_WEIGHT_PATH
  try:
    return keras.utils.get_file(name, BASE_WEIGHT_PATH + name, cache_subdir="models")
  except Exception as e:  # Whatever the download layer raises (URLError, HTTPError, OSError, ...).
    _missing(f"ImageNet MobileNet weights: not in {shared / 'weights'} and the download failed ({type(e).__name__})"
             f"; set TRANSFER_TRAINER_SHARED to the shared folder, or run once with a network")


@pytest.fixture(scope="session")
def random_mobilenet_025_weights(tmp_path_factory) -> str:
  """A MobileNet alpha 0.25 no-top weights file of random init, made once: the transfer path (a weights file, a
  frozen phase, fine-tuning) on any machine. Its BatchNorm statistics are those of one batch of noise images, so
  its features have a real scale (with the initial ones, each layer shrinks them: ~1e-17 at the pool)."""
  import keras
  base = keras.applications.MobileNet(alpha=0.25, include_top=False, weights=None, input_shape=(32, 32, 3))
  batchnorms = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
  for layer in batchnorms:
    layer.momentum = 0.0  # The moving statistics become this batch's.
  base(np.random.default_rng(0).uniform(-1, 1, (32, 32, 32, 3)).astype(np.float32), training=True)
  for layer in batchnorms:
    layer.momentum = 0.99
  # The Keras 2 HDF5 layout of Keras' own downloads and of ../shared's files (save_weights writes Keras 3's).
  import h5py
  from keras.src.legacy.saving import legacy_h5_format
  path = tmp_path_factory.mktemp("random_weights") / "mobilenet_025_random_no_top.h5"
  with h5py.File(path, "w") as f:
    legacy_h5_format.save_weights_to_hdf5_group(f, base)
  return str(path)


def write_image(path: pathlib.Path, color, size=(40, 32), fmt=None, mode="RGB") -> pathlib.Path:
  """A small real image file: a solid colour with a noise texture, so classes differ visibly."""
  # crc32, not hash(): Python salts string hashes per process, and the same test must see the same pixels.
  rng = np.random.default_rng(zlib.crc32(f"{path.name}{tuple(color)}".encode()))
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
def trained_workdir(tmp_path_factory, random_mobilenet_025_weights) -> pathlib.Path:
  """One frozen epoch of MobileNet alpha 0.25 (random init) at 32 px on red/green/blue JPEGs of several sizes,
  exported once: the run shared by the export, serving, predict and evaluate tests."""
  from export import end_of_run
  from trainer.loop import train
  root = tmp_path_factory.mktemp("trained_run")
  write_color_dataset(root / "data", 6, widths=[40 + 4 * i for i in range(6)])
  config = tiny_run(random_mobilenet_025_weights, batch_size=8, finetune_epochs=0, augment="none",
                    data_dir=str(root / "data"), validation_split=0.34)
  train.train_and_evaluate(config, str(root / "run"), exporter=end_of_run.SavedModelExport())
  return root / "run"


@pytest.fixture(scope="session")
def trained_export_dir(trained_workdir) -> pathlib.Path:
  return trained_workdir / "export" / "classifier" / "1"


@pytest.fixture(scope="session")
def trained(trained_workdir):
  """The trained run's model, restored from its workdir."""
  from trainer.loop import restore
  return restore.restore(str(trained_workdir))


@pytest.fixture
def tiny_config(random_mobilenet_025_weights) -> Config:
  """MobileNet alpha 0.25 from a random-init weights file, at 32 px: a whole transfer run takes seconds."""
  return tiny_run(random_mobilenet_025_weights, batch_size=8, augment="none")
