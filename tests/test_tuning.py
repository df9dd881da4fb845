import json
import os
import shutil
import sys
import threading

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.plugins.hparams import metadata as hparams_metadata

from tests.test_reporting import _hparams_dashboard, _log, _record
from trainer import config_checks
from trainer.command import cli
from trainer.config import Config
from trainer.errors import UserInputError
from trainer.loop import tuning
from trainer.runtime import runtime


def _search_config(data_dir, weights, **changes):
  return runtime.resolve(Config().replace(
      data_dir=str(data_dir), backbone="mobilenet", alpha=0.25, weights=weights, image_size=32, batch_size=8,
      augment="none", head_units=16, verbosity=-1, tune=True, tuner="random", max_trials=3, tune_epochs=3,
      tune_folds=3, **changes))


@pytest.fixture
def tune_config(tiny_config, color_folder):
  return runtime.resolve(tiny_config.replace(data_dir=str(color_folder), tune=True, tuner="random", max_trials=2,
                                           tune_epochs=2, tune_folds=2))


@pytest.fixture(scope="module")
def searched(tmp_path_factory, mobilenet_025_weights):
  """A finished 3-trial random search with 3 folds: (its config, its workdir, what search returned)."""
  from conftest import write_color_dataset
  root = tmp_path_factory.mktemp("search")
  write_color_dataset(root / "data", 6)
  config = _search_config(root / "data", mobilenet_025_weights)
  workdir = root / "run"
  return config, workdir, tuning.search(config, str(workdir))


def _summary(workdir):
  return json.loads((workdir / "tuning" / "best_hparams.json").read_text())


def _count_scored(monkeypatch):
  """Calls of FoldScorer.score from now on (one per candidate scored)."""
  calls = []
  original = tuning.FoldScorer.score
  monkeypatch.setattr(tuning.FoldScorer, "score", lambda self, *a: calls.append(a) or original(self, *a))
  return calls


def test_every_candidate_has_its_fold_scores_and_the_defaults_are_trial_0(searched):
  config, workdir, best = searched
  summary = _summary(workdir)
  candidates = summary["candidates"]
  assert len(candidates) == 1 + 3 and summary["trials"] == 3
  assert [c["default"] for c in candidates] == [True, False, False, False]
  assert candidates[0]["trial"] == 0
  assert candidates[0]["hparams"] == {"head_units": config.model.head_units, "frozen_lr": config.train.frozen_lr,
                                      "dropout": config.model.dropout}
  for candidate in candidates:
    assert len(candidate["fold_accuracy"]) == len(candidate["fold_loss"]) == config.tune.tune_folds
    assert candidate["fold_mean"] == pytest.approx(np.mean(candidate["fold_accuracy"]))
    assert candidate["fold_std"] == pytest.approx(np.std(candidate["fold_accuracy"], ddof=1))
  assert summary["hparams"] == best


def test_the_decision_follows_the_one_standard_error_rule(searched):
  _, workdir, best = searched
  summary = _summary(workdir)
  defaults, *trials = summary["candidates"]
  leader = max(trials, key=lambda c: c["fold_mean"])
  standard_errors = [np.std(c["fold_accuracy"], ddof=1) / np.sqrt(3) for c in (leader, defaults)]
  beats = leader["fold_mean"] - defaults["fold_mean"] > np.sqrt(np.sum(np.square(standard_errors)))
  assert summary["decision"] == ("tuned" if beats else "defaults")
  assert best == (leader if beats else defaults)["hparams"]


def _candidate(trial, accuracies, epochs=4):
  return tuning._candidate(trial, {"head_units": trial}, {"fold_accuracy": accuracies, "fold_loss": [0.5] * 4},
                           epochs, trial == 0)


def test_tuned_values_win_only_by_more_than_one_standard_error():
  defaults = _candidate(0, [0.78, 0.82, 0.80, 0.80])  # mean 0.80, standard error 0.008
  noisy_lead = _candidate(1, [0.70, 0.95, 0.75, 0.96])  # mean 0.84, standard error 0.07
  clear_lead = _candidate(2, [0.89, 0.91, 0.90, 0.90])  # mean 0.90, standard error 0.004
  near_lead = _candidate(3, [0.80, 0.81, 0.81, 0.81])  # +0.0075: above its own standard error, not the pair's
  assert tuning.decide([defaults, noisy_lead], 4)["decision"] == "defaults"
  assert tuning.decide([defaults, near_lead], 4)["decision"] == "defaults"
  chosen = tuning.decide([defaults, noisy_lead, clear_lead], 4)
  assert chosen["decision"] == "tuned" and chosen["hparams"] == {"head_units": 2} and chosen["chosen_trial"] == 2
  # A trial trained for less than the full budget (a Hyperband round) is not comparable with the defaults.
  assert tuning.decide([defaults, _candidate(2, [0.89, 0.91, 0.90, 0.90], epochs=2)], 4)["decision"] == "defaults"


def test_folds_are_stratified_seeded_and_balanced():
  labels = np.array([0] * 10 + [1] * 7 + [2] * 5)
  folds = tuning.stratified_folds(labels, 5, seed=1)
  sizes = np.bincount(folds, minlength=5)
  assert sizes.max() - sizes.min() <= 1
  for label in range(3):
    per_fold = np.bincount(folds[labels == label], minlength=5)
    assert per_fold.min() >= 1 and per_fold.max() - per_fold.min() <= 1
  np.testing.assert_array_equal(folds, tuning.stratified_folds(labels, 5, seed=1))
  assert not np.array_equal(folds, tuning.stratified_folds(labels, 5, seed=2))


def test_folds_hold_out_every_view_of_an_image():
  # Each image is its own one-hot feature with a random label, identical in all 3 views: a head can only score
  # above chance on a held-out image by having trained on one of its views.
  images, views = 60, 3
  labels = np.random.default_rng(0).integers(0, 2, images).astype(np.int32)
  features = np.tile(np.eye(images, dtype=np.float32)[None] * 10, (views, 1, 1))
  hypermodel = tuning.HeadHyperModel(images, 2, seed=0)
  scorer = tuning.FoldScorer(features, labels, 3, seed=0, hypermodel=hypermodel, batch_size=8)
  scores = scorer.score({"head_units": 0, "frozen_lr": 0.05, "dropout": 0.0}, epochs=20)
  assert np.mean(scores["fold_accuracy"]) < 0.75
  # Not for want of learning: the same head fits the training images themselves.
  head = hypermodel.build({"head_units": 0, "frozen_lr": 0.05, "dropout": 0.0})
  head.fit(features[0], labels, batch_size=8, epochs=20, verbose=0)
  assert np.mean(np.argmax(head(features[0]), -1) == labels) > 0.95


def test_too_many_folds_for_the_smallest_class_is_one_line_naming_the_flag():
  with pytest.raises(UserInputError, match="--tune_folds=4"):
    tuning.FoldScorer(np.zeros((1, 7, 2), np.float32), np.array([0, 0, 0, 0, 1, 1, 1]), 4, 0,
                      tuning.HeadHyperModel(2, 2, 0), 4)


def test_a_resumed_search_repeats_nothing_and_more_trials_continue_it(searched, monkeypatch, tmp_path):
  config, searched_workdir, best = searched
  workdir = tmp_path / "run"
  shutil.copytree(searched_workdir, workdir)
  scored = _count_scored(monkeypatch)
  assert tuning.search(config, str(workdir)) == best
  assert scored == []
  before = _summary(workdir)["candidates"]
  tuning.search(config.replace(max_trials=5), str(workdir))
  after = _summary(workdir)["candidates"]
  assert len(scored) == 2 and len(after) == 1 + 5
  assert after[:4] == before  # the finished trials and the defaults are kept, not scored again


def test_a_different_search_space_in_the_same_workdir_is_refused(searched):
  config, workdir, _ = searched
  with pytest.raises(UserInputError, match="tuner"):
    tuning.search(config.replace(tuner="hyperband"), str(workdir))
  with pytest.raises(UserInputError, match="tune_folds"):
    tuning.search(config.replace(tune_folds=2), str(workdir))


def test_each_candidate_is_a_run_in_the_hparams_dashboard_with_its_fold_mean(searched):
  _, workdir, _ = searched
  folder = workdir / "tensorboard" / "tuning"
  runs = {}
  for root, _, names in os.walk(folder):
    for name in names:
      for event in tf.compat.v1.train.summary_iterator(os.path.join(root, name)):
        for value in event.summary.value:
          runs.setdefault(os.path.relpath(root, folder), {})[value.tag] = value
  fold_means = {c["trial"]: c["fold_mean"] for c in _summary(workdir)["candidates"]}
  trial_runs = {name: tags for name, tags in runs.items() if name.startswith("trial_")}
  assert {int(name[len("trial_"):]) for name in trial_runs} >= set(fold_means)
  for name, tags in trial_runs.items():
    start = hparams_metadata.parse_session_start_info_plugin_data(
        tags[hparams_metadata.SESSION_START_INFO_TAG].metadata.plugin_data.content)
    assert start.group_name == f"{workdir.name}/{name}"  # Named per workdir: two workdirs' trials never merge.
    mean = tf.make_ndarray(tags["fold_mean_accuracy"].tensor)
    assert mean == pytest.approx(fold_means[int(name[len("trial_"):])])
  # The decision, with its reason and every candidate, as text in the tuning folder's own run.
  decision = tf.make_ndarray(runs["."]["tuning_decision"].tensor).item().decode()
  summary = _summary(workdir)
  assert summary["reason"] in decision
  assert all(f"{c['fold_mean']:.4f}" in decision for c in summary["candidates"])


def test_two_tuned_workdirs_in_one_logdir_keep_their_trials_and_their_runs_metrics(tmp_path):
  """The HParams dashboard of a logdir holding two tuned workdirs: every trial a row of its own (same-named trials
  were merged into one row of their mean), and each training run's metrics still there."""
  fold_means = {"first": (0.8093, 0.9), "second": (0.7339, 0.6)}
  histories = {"first": [_record(1), _record(2, val_accuracy=0.75)], "second": [_record(1, val_accuracy=0.25)]}
  for name, means in fold_means.items():
    log = tuning._TrialLog(str(tmp_path / name / "tensorboard" / "tuning"), name, Config(), verbose=False)
    for trial, mean in enumerate(means):
      log.trial(_candidate(trial, [mean] * 4), seconds=1.0)
    _log(tmp_path / name / "tensorboard", Config().replace(tune=True), histories[name])
  experiment, groups = _hparams_dashboard(tmp_path)
  metrics = {group["name"]: {value["name"]["tag"]: value["value"] for value in group["metricValues"]}
             for group in groups}
  assert set(metrics) == {"first", "second", "first/trial_0", "first/trial_1", "second/trial_0", "second/trial_1"}
  for name, means in fold_means.items():
    for trial, mean in enumerate(means):
      assert metrics[f"{name}/trial_{trial}"]["fold_mean_accuracy"] == pytest.approx(mean)
    assert metrics[name]["val_accuracy"] == pytest.approx(histories[name][-1]["val_accuracy"])
  # Metric columns are named as themselves.
  assert {"val_accuracy", "fold_mean_accuracy"} <= {info["name"]["tag"] for info in experiment["metricInfos"]}
  # The dashboard shows the first 5 hparams that differ: here the searched values and which trial is which.
  shown = [info["name"] for info in experiment["hparamInfos"] if info["differs"]][:5]
  assert {"head_units", "trial_kind"} <= set(shown)


def test_the_search_trains_at_the_runs_effective_rate_and_records_it_unscaled(tune_config, tmp_path, monkeypatch):
  rates = []
  original = tuning.HeadHyperModel.build

  def build(self, values):
    head = original(self, values)
    rates.append((values["frozen_lr"], float(np.asarray(head.optimizer.learning_rate))))
    return head
  monkeypatch.setattr(tuning.HeadHyperModel, "build", build)
  config = tune_config.replace(lr_base_batch_size=4)  # batch 8: the run's Trainer doubles the rates
  best = tuning.search(config, str(tmp_path))
  assert rates and all(rate == pytest.approx(2 * value) for value, rate in rates)
  assert _summary(tmp_path)["candidates"][0]["hparams"]["frozen_lr"] == config.train.frozen_lr
  assert best["frozen_lr"] in [value for value, _ in rates]


def _tf_config(index):
  return json.dumps({"cluster": {"worker": ["localhost:1", "localhost:2"]}, "task": {"type": "worker",
                                                                                    "index": index}})


def test_under_multi_worker_only_the_chief_searches_and_the_others_read_its_result(tune_config, tmp_path,
                                                                                    monkeypatch):
  config = tune_config.replace(strategy="multi_worker")
  monkeypatch.setenv("TF_CONFIG", _tf_config(1))
  monkeypatch.setattr(tuning, "_POLL_SECONDS", 0.05)
  scored = _count_scored(monkeypatch)
  results = {}
  worker = threading.Thread(target=lambda: results.update(worker=tuning.search(config, str(tmp_path))))
  worker.start()
  worker.join(0.5)
  assert worker.is_alive() and not (tmp_path / "tuning" / "search").exists()  # waiting, not searching
  monkeypatch.setenv("TF_CONFIG", _tf_config(0))
  results["chief"] = tuning.search(config, str(tmp_path))
  worker.join(30)
  assert results["worker"] == results["chief"] and len(scored) == 1 + config.tune.max_trials


def test_a_worker_does_not_take_the_result_of_another_search(searched, tmp_path, monkeypatch):
  config, searched_workdir, best = searched
  shutil.copytree(searched_workdir, tmp_path / "run")
  config = config.replace(strategy="multi_worker")
  monkeypatch.setenv("TF_CONFIG", _tf_config(1))
  monkeypatch.setattr(tuning, "WORKER_WAIT_SECONDS", 0.2)
  monkeypatch.setattr(tuning, "_POLL_SECONDS", 0.05)
  assert tuning.search(config, str(tmp_path / "run")) == best  # the chief's finished search of these settings
  with pytest.raises(UserInputError, match="best_hparams.json"):
    tuning.search(config.replace(max_trials=4), str(tmp_path / "run"))


def test_bayesian_without_scikit_learn_names_both_packages(tune_config, tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "sklearn", None)
  with pytest.raises(UserInputError, match=r"scipy and scikit-learn.*transfer-trainer\[bayesian\]"):
    config_checks.validate(tune_config.replace(tuner="bayesian"))


def test_bayesian_search_runs(tune_config, tmp_path):
  tuning.search(tune_config.replace(tuner="bayesian"), str(tmp_path))
  assert len(_summary(tmp_path)["candidates"]) == 1 + tune_config.tune.max_trials


def test_the_training_run_uses_the_chosen_values_under_mirrored(tune_config, tmp_path):
  cli.run(tune_config.replace(frozen_epochs=1, finetune_epochs=0, strategy="mirrored"), str(tmp_path),
          list_layers=False)
  chosen = _summary(tmp_path)["hparams"]
  config = json.loads((tmp_path / "config.json").read_text())
  assert {name: config["model" if name != "frozen_lr" else "train"][name] for name in chosen} == chosen
