"""Hyper-parameter search of the head (width, dropout, frozen learning rate) with KerasTuner.

Trials train the head alone on cached backbone features (`trainer.features`), so a trial costs seconds. The
search lives in WORKDIR/tuning/ (KerasTuner's project directory): rerunning the same command resumes it and
does not repeat finished trials. Each trial is a run in TensorBoard's HParams dashboard
(WORKDIR/tensorboard/tuning/).
"""

import dataclasses
import json
import os

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from trainer import augment, data, distribute, features, model as model_lib
from trainer import workdir as workdir_lib
from trainer.config import Config
from trainer.errors import UserInputError

TUNERS = ("hyperband", "random", "bayesian")
# The search space: (name, low, high, log sampling). The names are Config fields, so the best values apply as is.
SPACE = (("head_units", 32, 1024, True), ("frozen_lr", 1e-5, 1e-2, True), ("dropout", 0.0, 0.6, False))


@dataclasses.dataclass(frozen=True)
class FeatureSplits:
  train_features: np.ndarray  # [views * N, D]: every augmented view of every training image
  train_labels: np.ndarray
  val_features: np.ndarray
  val_labels: np.ndarray
  num_classes: int


class HeadHyperModel:
  """Builds the classifier's own head (trainer.model.classification_head) on pooled features."""

  def __init__(self, feature_dim: int, num_classes: int, seed: int):
    self.feature_dim, self.num_classes, self.seed = feature_dim, num_classes, seed

  def __call__(self, hp) -> keras.Model:
    values = {}
    for name, low, high, log in SPACE:
      sampling = "log" if log else "linear"
      values[name] = (hp.Int(name, low, high, sampling=sampling) if isinstance(low, int)
                      else hp.Float(name, low, high, sampling=sampling))
    inputs = keras.Input((self.feature_dim,), name="features")
    outputs = model_lib.classification_head(inputs, values["head_units"], values["dropout"], self.num_classes,
                                            self.seed)
    head = keras.Model(inputs, outputs, name="head")
    head.compile(optimizer=keras.optimizers.Adam(values["frozen_lr"]), loss="sparse_categorical_crossentropy",
                 metrics=["accuracy"])
    return head


def search(config: Config, workdir: str, strategy: tf.distribute.Strategy | None = None,
           splits: "FeatureSplits | None" = None) -> dict:
  """Runs (or resumes) the search and returns the best values by Config field name; writes best_hparams.json.

  splits: features already computed by `cached_features` (else computed here).
  """
  import keras_tuner  # Imported here: only --tune pays for it.
  _check_tuner(config.tune.tuner)
  tuning_dir = os.path.join(workdir, "tuning")
  _claim_search_space(tuning_dir, config)
  splits = splits or cached_features(config, os.path.join(workdir, "cache"))
  hypermodel = HeadHyperModel(splits.train_features.shape[1], splits.num_classes, config.data.seed)
  tuner = _make_tuner(keras_tuner, config, hypermodel, tuning_dir, strategy)
  tensorboard = keras.callbacks.TensorBoard(os.path.join(workdir, "tensorboard", "tuning"))
  tuner.search(splits.train_features, splits.train_labels, epochs=config.tune.tune_epochs,
               batch_size=config.data.batch_size, validation_data=(splits.val_features, splits.val_labels),
               callbacks=[tensorboard], verbose=0)
  best_trial = best_of(tuner.oracle)
  best = {name: best_trial.hyperparameters.get(name) for name, *_ in SPACE}
  summary = {"hparams": best, "val_accuracy": best_trial.score, "trial_id": best_trial.trial_id,
             "trials": len(tuner.oracle.trials), "tuner": config.tune.tuner}
  workdir_lib.write_json(os.path.join(tuning_dir, "best_hparams.json"), summary)
  logging.info("Tuning: best of %d trials: %s (val_accuracy %.4f)", summary["trials"], best, best_trial.score)
  return best


def best_of(oracle):
  """The trial with the best val_accuracy; ties (common on small validation sets) go to the lower val_loss, so
  that the choice does not depend on the order in which the oracle lists its trials."""
  completed = [t for t in oracle.trials.values() if t.score is not None]
  return max(completed, key=lambda t: (t.score, -t.metrics.get_best_value("val_loss"), t.trial_id))


def cached_features(config: Config, cache_root: str) -> FeatureSplits:
  """Pooled features of the frozen backbone: augmented views for training (as --cache_features), plain for val."""
  input_data = data.load(config.data, config.data.image_size, cache_root)
  classifier = model_lib.build_classifier(config.model, len(input_data.classes), config.data.image_size,
                                          config.data.seed)
  augmenter = augment.build(config.train, config.data.seed)
  train_views, train_labels = features.extract_views(classifier, input_data.train.images, config.data.batch_size,
                                                     augmenter, config.train.feature_views)
  val_features, val_labels = features.extract(classifier, input_data.val.images, config.data.batch_size)
  return FeatureSplits(train_views.reshape(-1, train_views.shape[-1]), np.tile(train_labels, len(train_views)),
                       val_features, val_labels, len(input_data.classes))


def _check_tuner(name: str) -> None:
  if name not in TUNERS:
    raise UserInputError(f"--tuner={name} is not known. Choose one of: {', '.join(TUNERS)}.")
  if name == "bayesian":
    try:
      import scipy  # noqa: F401 - KerasTuner's Gaussian process needs it and would fail only mid-search.
    except ImportError:
      raise UserInputError("--tuner=bayesian needs scipy: pip install 'transfer-trainer[bayesian]' (or "
                           "pip install scipy), or choose --tuner=hyperband or random.") from None


def _make_tuner(keras_tuner, config: Config, hypermodel, directory: str, strategy):
  common = dict(objective="val_accuracy", directory=directory, project_name="search", overwrite=False,
                seed=config.data.seed, distribution_strategy=strategy)
  if config.tune.tuner == "hyperband":
    return keras_tuner.Hyperband(hypermodel, max_epochs=config.tune.tune_epochs, factor=3, **common)
  if config.tune.tuner == "random":
    return keras_tuner.RandomSearch(hypermodel, max_trials=config.tune.max_trials, **common)
  return keras_tuner.BayesianOptimization(hypermodel, max_trials=config.tune.max_trials, **common)


def _claim_search_space(tuning_dir: str, config: Config) -> None:
  """Records what the search in tuning_dir searches; refuses to resume it with another space or other features."""
  space = {"tuner": config.tune.tuner, "space": [list(entry) for entry in SPACE],
           "tune_epochs": config.tune.tune_epochs, "max_trials": config.tune.max_trials,
           "features": {"data": dataclasses.asdict(config.data), "backbone": config.model.backbone,
                        "weights": config.model.weights, "alpha": config.model.alpha,
                        "augment": config.train.augment, "feature_views": config.train.feature_views}}
  space = json.loads(json.dumps(space))  # As read back from the file: tuples become lists.
  path = os.path.join(tuning_dir, "search_space.json")
  if not os.path.isfile(path):
    workdir_lib.write_json(path, space)
    return
  previous = workdir_lib.read_json(path)
  if previous != space:
    changed = sorted(k for k in space if previous.get(k) != space[k])
    raise UserInputError(f"{tuning_dir} holds a search with other settings ({', '.join(changed)} differ). "
                         "Use a new --workdir, or delete that folder to start the search again.")


def strategy_for_search(config: Config) -> tf.distribute.Strategy | None:
  """KerasTuner's distribution_strategy for --strategy=mirrored and one_device; None (Keras' default) else."""
  if config.runtime.strategy in ("mirrored", "one_device"):
    return distribute.create_strategy(config.runtime)
  return None
