"""Hyper-parameter search of the head (width, dropout, frozen learning rate), scored by cross-validation.

Trials train the head alone on the cached backbone features of the training split (`trainer.loop.features`, the same
file the training after the search reads), so a trial costs seconds. Each trial is scored by stratified, seeded
K-fold cross-validation (`--tune_folds`) inside the training split, folds split by image (every augmented view of
a held-out image is held out): the validation split is never seen by the search and stays the honest final
number. The run's own values are always trial 0 ("the defaults"), and the best trial replaces them only when its
fold mean beats theirs by more than one standard error of the difference of the two fold means (in the spirit of
the one-standard-error rule of Hastie, Tibshirani & Friedman, ESL 7.10): the best of many noisy scores is biased
upwards, and a lead smaller than the noise is more likely luck than a better setting.

The search lives in WORKDIR/tuning/ (KerasTuner's project directory): rerunning the same command resumes it
without repeating finished trials, and a larger --max_trials continues it; another search space is refused. Each
trial is a run in TensorBoard's HParams dashboard (WORKDIR/tensorboard/tuning/trial_N, named WORKDIR_NAME/trial_N)
with its fold mean, and the decision is text there (tag tuning_decision). Under --strategy=multi_worker only the
chief searches; the other workers wait for its tuning/best_hparams.json.

Over 400 lines on purpose: the search, its scoring, its decision and its resumable state are one contract (what a
rerun may repeat, what the workers read), and split across modules each part would need the others' internals.
"""

import dataclasses
import hashlib
import json
import math
import os
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from trainer.config import Config
from trainer.errors import UserInputError
from trainer.input import data
from trainer.loop import features
from trainer.modeling import augment, optimization
from trainer.modeling import model as model_lib
from trainer.runtime import distribute
from trainer.runtime import workdir as workdir_lib

# The search space: (name, low, high, log sampling). The names are Config fields, so the best values apply as is.
# frozen_lr is searched and recorded unscaled: the trials train at frozen_lr * lr_scale, as the run's Trainer does.
SPACE = (("head_units", 32, 1024, True), ("frozen_lr", 1e-5, 1e-2, True), ("dropout", 0.0, 0.6, False))
OBJECTIVE = "cv_accuracy"
_FOLD_SCORES = ("fold_accuracy", "fold_loss")
# Data settings that say where decoded images are kept, not which features a trial sees.
_STORAGE_ONLY = ("cache", "memory_budget", "cache_dir", "data_service")
# How long a non-chief worker waits for the chief's search before giving up.
WORKER_WAIT_SECONDS = 6 * 3600
_POLL_SECONDS = 2.0


def search(config: Config, workdir: str, strategy: tf.distribute.Strategy | None = None,
           inputs: data.InputData | None = None, feature_cache: features.FeatureCache | None = None) -> dict:
  """Runs (or resumes, or continues) the search; returns the chosen values by Config field name.

  Writes tuning/best_hparams.json. inputs: the run's loaded data, so that it is decoded once (else loaded here);
  feature_cache: its features, if already computed (else read from, or extracted into, WORKDIR/cache).
  """
  import keras_tuner  # Imported here: only --tune pays for it.
  tuning_dir = os.path.join(workdir, "tuning")
  space = _search_space(config)
  fingerprint = hashlib.sha256(json.dumps([space, config.tune.max_trials]).encode()).hexdigest()[:16]
  if not _is_chief_process(config):
    return _wait_for_chief(os.path.join(tuning_dir, "best_hparams.json"), fingerprint)
  _claim_search_space(tuning_dir, space)
  distribute.set_precision(distribute.resolve_precision(config.runtime, strategy or tf.distribute.get_strategy()))
  cache = feature_cache or cached_features(config, workdir, inputs)
  scorer = FoldScorer(cache.train_features, cache.train_labels, config.tune.tune_folds, config.data.seed,
                      HeadHyperModel(cache.train_features.shape[-1], cache.head.output.shape[-1], config.data.seed,
                                     _lr_scale(config, strategy), config.train.label_smoothing),
                      config.data.batch_size, strategy)
  log = _TrialLog(os.path.join(workdir, "tensorboard", "tuning"), os.path.basename(os.path.normpath(workdir)), config,
                  verbose=config.runtime.verbosity >= 0)
  defaults = _defaults_candidate(config, tuning_dir, scorer, log)
  tuner = _make_tuner(keras_tuner, config, scorer, tuning_dir, log)
  tuner.oracle.verbose = 0  # Its tables repeat what _TrialLog prints in one line.
  tuner.search()
  candidates = [defaults] + [_trial_candidate(trial, config.tune.tune_folds, config.tune.tune_epochs)
                             for trial in sorted(tuner.oracle.trials.values(), key=lambda t: int(t.trial_id))
                             if trial.status == "COMPLETED"]
  summary = decide(candidates, config.tune.tune_epochs)
  summary.update({"search": fingerprint, "tuner": config.tune.tuner, "trials": len(candidates) - 1,
                  "folds": config.tune.tune_folds, "lr_scale": scorer.hypermodel.lr_scale,
                  "candidates": candidates})
  workdir_lib.write_json(os.path.join(tuning_dir, "best_hparams.json"), summary)
  log.decision(summary)
  logging.info("Tuning: %s", summary["reason"])
  return summary["hparams"]


def decide(candidates: list[dict], full_epochs: int) -> dict:
  """The best full-budget trial's values if its fold mean beats the defaults' (candidates[0]) by more than one
  standard error of the difference of the two fold means, else the defaults."""
  defaults = candidates[0]
  searched = [c for c in candidates[1:] if c["epochs"] == full_epochs]
  rule = ("tuned values replace the defaults only if the best trial's fold mean exceeds the defaults' by more "
          "than one standard error of the difference, sqrt(se_best^2 + se_defaults^2)")
  if not searched:
    return {"hparams": defaults["hparams"], "decision": "defaults", "chosen_trial": 0, "rule": rule,
            "reason": "no trial finished with the full budget; kept the defaults"}
  best = max(searched, key=lambda c: (c["fold_mean"], -float(np.mean(c["fold_loss"])), -c["trial"]))
  margin = best["fold_mean"] - defaults["fold_mean"]
  threshold = math.hypot(best["fold_standard_error"], defaults["fold_standard_error"])
  tuned = margin > threshold
  chosen = best if tuned else defaults
  outcome = f"used trial {best['trial']}" if tuned else "kept the defaults"
  reason = (f"best trial {best['trial']} fold mean {best['fold_mean']:.4f} vs the defaults' "
            f"{defaults['fold_mean']:.4f}: {margin:+.4f}, {'more' if tuned else 'not more'} than one standard "
            f"error of the difference ({threshold:.4f}); {outcome}")
  return {"hparams": chosen["hparams"], "decision": "tuned" if tuned else "defaults", "chosen_trial": chosen["trial"],
          "rule": rule, "threshold": threshold, "reason": reason}


def cached_features(config: Config, workdir: str, inputs: data.InputData | None = None) -> features.FeatureCache:
  """The run's cached frozen-backbone features (WORKDIR/cache/features_<key>.npz)."""
  cache_dir = os.path.join(workdir, "cache")
  inputs = inputs or data.load(config.data, config.data.image_size, cache_dir)
  classifier = model_lib.build_classifier(config.model, len(inputs.classes), config.data.image_size,
                                          config.data.seed)
  key = features.cache_key(config, inputs.identity, keras.config.dtype_policy().name)
  return features.load_or_extract(classifier, inputs.train.images_with_ids, inputs.val.images_with_ids,
                                   config.data.batch_size, augment.build(config.train, config.data.seed),
                                   config.train.feature_views, features.folder(config.data.cache_dir, cache_dir), key)


class HeadHyperModel:
  """Builds the classifier's own head (trainer.modeling.model.classification_head) on pooled features, compiled with the
  run's effective frozen learning rate (the value times lr_scale) and training loss (trainer.modeling.optimization)."""

  def __init__(self, feature_dim: int, num_classes: int, seed: int, lr_scale: float = 1.0,
               label_smoothing: float = 0.0):
    self.feature_dim, self.num_classes, self.seed, self.lr_scale = feature_dim, num_classes, seed, lr_scale
    self.label_smoothing = label_smoothing

  def __call__(self, hp) -> keras.Model:
    values = {}
    for name, low, high, log in SPACE:
      sampling = "log" if log else "linear"
      values[name] = (hp.Int(name, low, high, sampling=sampling) if isinstance(low, int)
                      else hp.Float(name, low, high, sampling=sampling))
    return self.build(values)

  def build(self, values: dict) -> keras.Model:
    inputs = keras.Input((self.feature_dim,), name="features")
    outputs = model_lib.classification_head(inputs, values["head_units"], values["dropout"], self.num_classes,
                                            self.seed)
    head = keras.Model(inputs, outputs, name="head")
    # Many small steps: one call runs 32 of them (Python's per-step cost dominated); XLA measured slower here.
    head.compile(optimizer=keras.optimizers.Adam(values["frozen_lr"] * self.lr_scale),
                 loss=optimization.training_loss(self.label_smoothing), steps_per_execution=32, jit_compile=False)
    return head


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
  """The fold (0..folds-1) of each example: every class dealt round-robin over the folds in a seeded order, so
  each fold gets its share of every class and the folds' sizes differ by at most one."""
  rng = np.random.default_rng(seed)
  assignment = np.empty(len(labels), np.int64)
  dealt = 0
  for label in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == label))
    assignment[members] = (dealt + np.arange(len(members))) % folds
    dealt += len(members)
  return assignment


class FoldScorer:
  """Scores head settings by K-fold cross-validation on cached training features [views, N, D].

  A fold's training part is every view of the images outside the fold, trained like the run's frozen phase (epoch
  e on view e mod views, shuffled, the run's batch size); it is scored on every view of the fold's own images.
  """

  def __init__(self, train_features: np.ndarray, labels: np.ndarray, folds: int, seed: int,
               hypermodel: HeadHyperModel, batch_size: int, strategy: tf.distribute.Strategy | None = None):
    _check_folds(labels, folds)
    self.views, self.num_images = train_features.shape[:2]
    self.flat_features = train_features.reshape(self.views * self.num_images, -1)
    self.flat_labels = np.tile(labels, self.views)
    self.assignment = stratified_folds(labels, folds, seed)
    self.folds, self.seed, self.hypermodel, self.batch_size = folds, seed, hypermodel, batch_size
    self.strategy = strategy or tf.distribute.get_strategy()
    self._features_tensor = tf.constant(self.flat_features)
    self._labels_tensor = tf.constant(self.flat_labels)

  def score(self, values: dict, epochs: int) -> dict:
    """{"fold_accuracy": [K floats], "fold_loss": [K floats]} of a head with `values` trained `epochs` epochs."""
    with self.strategy.scope():
      head = self.hypermodel.build(values)
      head.optimizer.build(head.trainable_variables)
    # One head per candidate, reset before every fold: rebuilding it would retrace the train step K times.
    start_weights = head.get_weights()
    start_optimizer = [variable.numpy() for variable in head.optimizer.variables]
    accuracies, losses = [], []
    for fold in range(self.folds):
      head.set_weights(start_weights)
      for variable, value in zip(head.optimizer.variables, start_optimizer):
        variable.assign(value)
      held_out = np.flatnonzero(self.assignment == fold)
      head.fit(self._batches(np.flatnonzero(self.assignment != fold), epochs, self.seed + fold), verbose=0)
      rows = (np.arange(self.views)[:, None] * self.num_images + held_out).ravel()
      probabilities = np.asarray(head(self.flat_features[rows], training=False))
      labels = self.flat_labels[rows]
      accuracies.append(float(np.mean(np.argmax(probabilities, -1) == labels)))
      losses.append(float(np.mean(keras.losses.sparse_categorical_crossentropy(labels, probabilities))))
    return {"fold_accuracy": accuracies, "fold_loss": losses}

  def _batches(self, images: np.ndarray, epochs: int, seed: int) -> tf.data.Dataset:
    """All epochs of a fold as one stream of full batches (one fit call per fold, one shape to trace): epoch e
    is view e mod views of the images in a fresh order; the stream's last partial batch is dropped."""
    rng = np.random.default_rng(seed)
    order = np.concatenate([(epoch % self.views) * self.num_images + rng.permutation(images)
                            for epoch in range(epochs)])
    features_tensor, labels_tensor = self._features_tensor, self._labels_tensor
    rows = tf.data.Dataset.from_tensor_slices(order).batch(self.batch_size, drop_remainder=True)
    return rows.map(lambda index: (tf.gather(features_tensor, index), tf.gather(labels_tensor, index))).prefetch(
        tf.data.AUTOTUNE)


def _check_folds(labels: np.ndarray, folds: int) -> None:
  counts = np.bincount(labels)
  if folds > counts[counts > 0].min():
    raise UserInputError(f"--tune_folds={folds} is more than the {counts[counts > 0].min()} training images of the "
                         "smallest class: every fold needs an image of every class. Use a smaller --tune_folds.")


def _candidate(trial: int, values: dict, scores: dict, epochs: int, default: bool) -> dict:
  accuracies = scores["fold_accuracy"]
  spread = float(np.std(accuracies, ddof=1))
  return {"trial": trial, "default": default, "hparams": values, "epochs": epochs, **scores,
          "fold_mean": float(np.mean(accuracies)), "fold_std": spread,
          "fold_standard_error": spread / math.sqrt(len(accuracies))}


def _defaults_candidate(config: Config, tuning_dir: str, scorer: FoldScorer, log: "_TrialLog") -> dict:
  """Trial 0, the run's own values, scored like every trial; kept in tuning/defaults.json for resumed searches."""
  path = os.path.join(tuning_dir, "defaults.json")
  if os.path.isfile(path):
    return workdir_lib.read_json(path)
  values = {"head_units": config.model.head_units, "frozen_lr": config.train.frozen_lr,
            "dropout": config.model.dropout}
  start = time.perf_counter()
  candidate = _candidate(0, values, scorer.score(values, config.tune.tune_epochs), config.tune.tune_epochs, True)
  log.trial(candidate, time.perf_counter() - start)
  workdir_lib.write_json(path, candidate)
  return candidate


def _trial_candidate(trial, folds: int, full_epochs: int) -> dict:
  """A finished KerasTuner trial as a candidate; its number counts from 1 (0 is the defaults)."""
  scores = {kind: [trial.metrics.get_last_value(f"{kind}_{k}") for k in range(folds)] for kind in _FOLD_SCORES}
  return _candidate(int(trial.trial_id) + 1, {name: trial.hyperparameters.get(name) for name, *_ in SPACE},
                    scores, _epochs_of(trial, full_epochs), False)


def _epochs_of(trial, full_epochs: int) -> int:
  """Hyperband gives each trial its own budget; the other tuners train every trial for --tune_epochs."""
  return int(trial.hyperparameters.values.get("tuner/epochs", full_epochs))


class _TrialLog:
  """One printed line and one TensorBoard HParams session per scored candidate, and the decision as text.

  Each trial is named `WORKDIR_NAME/trial_N` (its run is tuning/trial_N): the HParams dashboard merges the runs of
  one name into one row (the mean of their metrics), so the trials of two workdirs in one logdir stay apart. No
  hparams_config: the first one in a logdir sets the dashboard's columns for every run in it, and the training
  runs' metrics would disappear (see trainer.reporting.HPARAMS_DIR)."""

  def __init__(self, folder: str, run_name: str, config: Config, verbose: bool):
    self.folder, self.run_name, self.verbose = folder, run_name, verbose
    # Hyperband sizes itself from --tune_epochs; --max_trials counts the other tuners' trials.
    self.of_trials = "" if config.tune.tuner == "hyperband" else f"/{config.tune.max_trials}"

  def trial(self, candidate: dict, seconds: float) -> None:
    from tensorboard.plugins.hparams import api as hparams_api  # Imported here, as keras_tuner: only --tune.
    name = f"trial_{candidate['trial']}"
    with tf.summary.create_file_writer(os.path.join(self.folder, name)).as_default():
      hparams_api.hparams({**candidate["hparams"], "trial_kind": "defaults" if candidate["default"] else "searched"},
                          trial_id=f"{self.run_name}/{name}")
      # Tags that sort after the training runs' epoch_* charts, which TensorBoard opens first.
      tf.summary.scalar("fold_mean_accuracy", candidate["fold_mean"], step=candidate["epochs"],
                        description="Mean validation accuracy over the cross-validation folds (step: epochs).")
      tf.summary.scalar("fold_accuracy_std", candidate["fold_std"], step=candidate["epochs"],
                        description="Standard deviation of the folds' accuracies (step: epochs).")
    if self.verbose:
      values = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in candidate["hparams"].items())
      label = "0 (defaults)" if candidate["default"] else f"{candidate['trial']}{self.of_trials}"
      print(f"tuning trial {label}: {values}: fold accuracy {candidate['fold_mean']:.4f} +- "
            f"{candidate['fold_std']:.4f} ({len(candidate['fold_accuracy'])} folds, {candidate['epochs']} epochs), "
            f"{seconds:.1f}s", flush=True)

  def decision(self, summary: dict) -> None:
    """What the search decided and why, with every candidate's values and fold scores, as Markdown text in the
    tuning folder's own run, at the step of the number of trials (a continued search adds a step)."""
    head = "| trial | " + " | ".join(name for name, *_ in SPACE) + " | fold mean accuracy | std | epochs |"
    rows = [head, "|" + " --- |" * (len(SPACE) + 4)]
    for candidate in summary["candidates"]:
      label = f"{candidate['trial']} (defaults)" if candidate["default"] else str(candidate["trial"])
      if candidate["trial"] == summary["chosen_trial"]:
        label = f"**{label}, chosen**"
      values = " | ".join(f"{candidate['hparams'][name]:.3g}" for name, *_ in SPACE)
      rows.append(f"| {label} | {values} | {candidate['fold_mean']:.4f} | {candidate['fold_std']:.4f} | "
                  f"{candidate['epochs']} |")
    outcome = "Tuned values used" if summary["decision"] == "tuned" else "Defaults kept"
    text = f"**{outcome}.** {summary['reason']}.\n\nRule: {summary['rule']}.\n\n" + "\n".join(rows)
    with tf.summary.create_file_writer(self.folder).as_default(step=summary["trials"]):
      tf.summary.text("tuning_decision", text)


def _make_tuner(keras_tuner, config: Config, scorer: FoldScorer, directory: str, log: _TrialLog):
  """A KerasTuner BaseTuner whose trials are scored by `scorer`; the oracle is the --tuner's."""
  objective = keras_tuner.Objective(OBJECTIVE, direction="max")
  common = dict(objective=objective, seed=config.data.seed)
  if config.tune.tuner == "hyperband":
    oracle = keras_tuner.oracles.HyperbandOracle(max_epochs=config.tune.tune_epochs, factor=3, **common)
  elif config.tune.tuner == "random":
    oracle = keras_tuner.oracles.RandomSearchOracle(max_trials=config.tune.max_trials, **common)
  else:
    oracle = keras_tuner.oracles.BayesianOptimizationOracle(max_trials=config.tune.max_trials, **common)
  full_epochs = config.tune.tune_epochs

  class CrossValidationTuner(keras_tuner.engine.base_tuner.BaseTuner):
    def run_trial(self, trial):
      start = time.perf_counter()
      values = {name: trial.hyperparameters.get(name) for name, *_ in SPACE}
      epochs = _epochs_of(trial, full_epochs)
      scores = scorer.score(values, epochs)
      log.trial(_candidate(int(trial.trial_id) + 1, values, scores, epochs, False), time.perf_counter() - start)
      # The fold scores go into the oracle's own record of the trial, one metric per fold.
      return {OBJECTIVE: float(np.mean(scores["fold_accuracy"])),
              **{f"{kind}_{k}": value for kind in _FOLD_SCORES for k, value in enumerate(scores[kind])}}

  return CrossValidationTuner(oracle, hypermodel=scorer.hypermodel, directory=directory, project_name="search",
                              overwrite=False)


def _lr_scale(config: Config, strategy: tf.distribute.Strategy | None) -> float:
  """The factor the run's Trainer multiplies the learning rates by (distribute.plan_batches)."""
  replicas = strategy.num_replicas_in_sync if strategy is not None else 1
  return distribute.plan_batches(config.data.batch_size, replicas, config.train.lr_base_batch_size).lr_scale


def _search_space(config: Config) -> dict:
  """What a search searches and on which features; everything but --max_trials, which may grow."""
  data_settings = {k: v for k, v in dataclasses.asdict(config.data).items() if k not in _STORAGE_ONLY}
  space = {"tuner": config.tune.tuner, "space": [list(entry) for entry in SPACE],
           "tune_epochs": config.tune.tune_epochs, "tune_folds": config.tune.tune_folds,
           "defaults": {"head_units": config.model.head_units, "frozen_lr": config.train.frozen_lr,
                        "dropout": config.model.dropout},
           "lr_base_batch_size": config.train.lr_base_batch_size,
           "features": {"data": data_settings, "backbone": config.model.backbone, "weights": config.model.weights,
                        "alpha": config.model.alpha, "feature_layer": config.model.feature_layer,
                        "augment": dataclasses.asdict(augment.factors(config.train)),
                        "feature_views": config.train.feature_views,
                        "mixed_precision": config.runtime.mixed_precision}}
  return json.loads(json.dumps(space))  # As read back from the file: tuples become lists.


def _claim_search_space(tuning_dir: str, space: dict) -> None:
  """Records what the search in tuning_dir searches; refuses to resume it with another space or other features."""
  path = os.path.join(tuning_dir, "search_space.json")
  if not os.path.isfile(path):
    workdir_lib.write_json(path, space)
    return
  previous = workdir_lib.read_json(path)
  if previous != space:
    changed = sorted(k for k in space if previous.get(k) != space[k])
    raise UserInputError(f"{tuning_dir} holds a search with other settings ({', '.join(changed)} differ). "
                         "Use a new --workdir, or delete that folder to start the search again.")


def _is_chief_process(config: Config) -> bool:
  """Whether this process searches: always, except on the non-chief workers of --strategy=multi_worker."""
  if config.runtime.strategy != "multi_worker":
    return True
  # The role comes from TF_CONFIG, as the strategy's does: the search itself runs without the multi-worker
  # strategy (strategy_for_search), on the chief alone.
  cluster = tf.distribute.cluster_resolver.TFConfigClusterResolver()
  return distribute.is_chief(_ClusterOnly(cluster))


@dataclasses.dataclass(frozen=True)
class _ClusterOnly:
  """What distribute.is_chief reads of a strategy."""
  cluster_resolver: tf.distribute.cluster_resolver.ClusterResolver


def _wait_for_chief(path: str, fingerprint: str) -> dict:
  """A non-chief worker's result of the search: the chief's best_hparams.json once it holds this search."""
  deadline = time.monotonic() + WORKER_WAIT_SECONDS
  logging.info("Waiting for the chief's search (%s).", path)
  while time.monotonic() < deadline:
    if os.path.isfile(path):
      summary = workdir_lib.read_json(path)
      if summary.get("search") == fingerprint:
        return summary["hparams"]
    time.sleep(_POLL_SECONDS)
  raise UserInputError(f"No result of the chief's search in {path} after {WORKER_WAIT_SECONDS} s: check the chief's "
                       "log, then rerun every worker with the same flags.")


def strategy_for_search(config: Config, run_strategy: tf.distribute.Strategy | None = None
                        ) -> tf.distribute.Strategy | None:
  """The search's strategy for --strategy=mirrored and one_device (the run's own when given); None (Keras'
  default) else: a multi-worker search runs on the chief alone."""
  if config.runtime.strategy in ("mirrored", "one_device"):
    return run_strategy or distribute.create_strategy(config.runtime)
  return None
