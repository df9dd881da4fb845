"""Every numeric and choice flag checked in one place, before any file is read or anything is built: a bad value
ends the command in one line that names the flag and the allowed range (trainer.errors.UserInputError). Every
command that takes a config calls `validate` first (train, evaluate, export, data service, to_tfrecord).

Choices are declared on the config fields (`choices` metadata in trainer.config); ranges are here."""

import importlib
import importlib.util
import math
import os
from typing import Collection

from trainer.config import Config, section_fields
from trainer.errors import UserInputError

# The smallest input Keras' applications accept (InceptionV3's stem needs 75 px; the others 32).
_MIN_IMAGE_SIZE = {"inception_v3": 75}
# The largest input: a batch of 32 float32 images of 2048 px is 1.6 GB before the first convolution; past that a
# run fails minutes later, out of memory or in an op's size limit (100000 px: an InvalidArgumentError after 7 min).
MAX_IMAGE_SIZE = 2048
# Augmentation factors given as numbers: -1 keeps the preset's, else at least 0 (rand_augment at most 1).
_AUGMENT_FACTORS = ("rotation", "shift", "shear", "zoom", "brightness", "contrast", "rand_augment")
_UNITS = {"": 1, "B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


def validate(config: Config, given: Collection[str] = ()) -> None:
  """Raises UserInputError for the first flag outside its range. `given`: the names of the flags on the command
  line, for combinations refused only when asked for (a default that does not apply is no mistake)."""
  data, model, train, tune = config.data, config.model, config.train, config.tune
  _check_choices(config)
  if model.weights == "none" and train.cache_features and "cache_features" in given:
    raise UserInputError("--cache_features with --weights=none: a run from scratch has no frozen phase whose "
                         "features could be cached; drop --cache_features.")
  if train.drop_suspects and (model.weights == "none" or not train.cache_features or not train.frozen_epochs):
    raise UserInputError("--drop_suspects finds the suspects on the frozen phase's cached features: it needs "
                         "pretrained --weights, --cache_features and --frozen_epochs >= 1.")
  _at_least("frozen_epochs", train.frozen_epochs, 0)
  _at_least("finetune_epochs", train.finetune_epochs, 0)
  if train.frozen_epochs + train.finetune_epochs == 0:
    raise UserInputError("--frozen_epochs=0 and --finetune_epochs=0 train nothing: give at least one of them a "
                         "number of epochs >= 1.")
  for name in ("frozen_lr", "finetune_lr"):
    value = getattr(train, name)
    if not (math.isfinite(value) and value > 0):
      raise UserInputError(f"--{name}={value}: a learning rate must be a number > 0 (e.g. 1e-3).")
  if not 0.0 <= model.dropout < 1.0:
    raise UserInputError(f"--dropout={model.dropout}: the dropout rate must be in [0, 1).")
  if not 0.0 <= train.label_smoothing < 1.0:
    raise UserInputError(f"--label_smoothing={train.label_smoothing}: the smoothed fraction must be in [0, 1) "
                         "(e.g. 0.1).")
  if not (train.finetune_label_smoothing == -1.0 or 0.0 <= train.finetune_label_smoothing < 1.0):
    raise UserInputError(f"--finetune_label_smoothing={train.finetune_label_smoothing}: the smoothed fraction must "
                         "be in [0, 1), or -1 for --label_smoothing's.")
  _at_least("head_units", model.head_units, 0)
  _at_least("batch_size", data.batch_size, 1)
  if data.image_size:
    _at_least("image_size", data.image_size, _MIN_IMAGE_SIZE.get(model.backbone, 32))
    if data.image_size > MAX_IMAGE_SIZE:
      raise UserInputError(f"--image_size={data.image_size}: must be <= {MAX_IMAGE_SIZE} (0: the backbone's own "
                           "size); larger inputs do not fit a training step's memory.")
  for name in _AUGMENT_FACTORS:
    value = getattr(train, name)
    if value != -1.0 and not (math.isfinite(value) and value >= 0):
      raise UserInputError(f"--{name}={value}: give a value >= 0, or -1 for the --augment preset's.")
  if train.rand_augment > 1.0:
    raise UserInputError(f"--rand_augment={train.rand_augment}: RandAugment's strength is between 0 and 1.")
  _at_least("feature_views", train.feature_views, 1)
  _at_least("lr_base_batch_size", train.lr_base_batch_size, 0)
  _at_least("max_image_pixels", data.max_image_pixels, 1)
  if not 0.0 <= data.validation_split < 1.0:
    raise UserInputError(f"--validation_split={data.validation_split}: the held-out fraction must be in [0, 1).")
  if not model.alpha > 0:
    raise UserInputError(f"--alpha={model.alpha}: the width multiplier must be > 0 (e.g. 0.25, 0.5, 1.0).")
  memory_budget(data.memory_budget)
  _at_least("top_k", config.export.top_k, 1)
  export = config.export
  if not (math.isfinite(export.tflite_max_accuracy_drop) and 0.0 <= export.tflite_max_accuracy_drop <= 1.0):
    raise UserInputError(f"--tflite_max_accuracy_drop={export.tflite_max_accuracy_drop}: a fraction of accuracy in "
                         "[0, 1] (0.01: one point; 1 accepts any loss).")
  if export.tflite and not all(importlib.util.find_spec(name) for name in ("ai_edge_litert", "mediapipe")):
    # The export needs both at the end of training: refused now rather than after the run (found, not imported:
    # importing mediapipe takes seconds).
    raise UserInputError("--tflite needs LiteRT (the interpreter that judges model.tflite) and MediaPipe (its "
                         "metadata writer): pip install 'transfer-trainer[tflite]'.")
  if not (math.isfinite(config.runtime.peer_timeout) and config.runtime.peer_timeout > 0):
    raise UserInputError(f"--peer_timeout={config.runtime.peer_timeout}: seconds to wait for the other workers must "
                         "be a number > 0 (e.g. 600).")
  if tune.tune:
    if tune.tuner == "bayesian" and not all(_importable(name) for name in ("scipy", "sklearn")):
      # KerasTuner's Gaussian process needs both; without them it would fail only mid-search.
      raise UserInputError("--tuner=bayesian needs scipy and scikit-learn: pip install "
                           "'transfer-trainer[bayesian]' (or pip install scipy scikit-learn), or choose "
                           "--tuner=hyperband or random.")
    _at_least("max_trials", tune.max_trials, 1)
    _at_least("tune_epochs", tune.tune_epochs, 1)
    _at_least("tune_folds", tune.tune_folds, 2)


def _check_choices(config: Config) -> None:
  """Every field that declares its choices holds one of them."""
  for section, field in section_fields():
    choices = field.metadata.get("choices")
    value = getattr(getattr(config, section), field.name)
    if choices and value not in choices:
      allowed = ", ".join(repr(choice) if choice == "" else choice for choice in choices)
      raise UserInputError(f"--{field.name}={value} is not known. Choose one of: {allowed}.")


def _importable(module: str) -> bool:
  try:
    importlib.import_module(module)
  except ImportError:
    return False
  return True


def memory_budget(text: str) -> int | None:
  """--memory_budget in bytes ('4GB', '512MB', '1000000'), or None for the default (a share of RAM)."""
  text = text.strip().upper().replace(" ", "")
  if not text:
    return None
  number = text.rstrip("KMGTB")
  unit = text[len(number):]
  try:
    value = float(number)
  except ValueError:
    value = -1.0
  if unit not in _UNITS or not (math.isfinite(value) and value >= 0):
    raise UserInputError(f"--memory_budget={text}: give bytes or a size with a unit, e.g. 4GB or 512MB.")
  return int(value * _UNITS[unit])


def _at_least(name: str, value: int, low: int) -> None:
  if value < low:
    raise UserInputError(f"--{name}={value}: must be >= {low}" + (" (0: the backbone's own size)." if name ==
                                                                  "image_size" else "."))


# Fields that name files or folders: stored absolute, so that a run's config.json works from any directory and a
# resume that names the same data by another path is the same run.
_PATH_FIELDS = ("data_dir", "csv", "tfds_data_dir", "tfrecord", "tfrecord_val", "cache_dir", "example_log")
_NOT_PATHS = ("imagenet", "none")


def absolute_paths(config: Config) -> Config:
  """The config with every path field (and a --weights file) absolute and normalised."""
  flat = {section: getattr(config, section) for section in ("data", "runtime")}
  changed = {name: os.path.abspath(os.path.expanduser(getattr(flat[section], name)))
             for section in flat for name in _PATH_FIELDS
             if hasattr(flat[section], name) and getattr(flat[section], name)}
  if config.model.weights and config.model.weights not in _NOT_PATHS:
    changed["weights"] = os.path.abspath(os.path.expanduser(config.model.weights))
  return config.replace(**changed)
