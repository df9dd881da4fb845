import json
import os
import sys

import keras_tuner
import pytest
import tensorflow as tf

from trainer import cli, train, tuning
from trainer.config import Config
from trainer.errors import UserInputError


@pytest.fixture
def tune_config(tiny_config, color_folder):
  return train.resolve(tiny_config.replace(data_dir=str(color_folder), tune=True, tuner="random", max_trials=3,
                                           tune_epochs=2))


@pytest.fixture(scope="module")
def searched(tmp_path_factory, mobilenet_025_weights):
  """A finished 3-trial random search: (its config, its workdir, what search returned)."""
  from tests.conftest import write_color_dataset
  root = tmp_path_factory.mktemp("search")
  write_color_dataset(root / "data", 6)
  config = train.resolve(Config().replace(
      data_dir=str(root / "data"), backbone="mobilenet", alpha=0.25, weights=mobilenet_025_weights, image_size=32,
      batch_size=8, augment="none", verbosity=-1, tune=True, tuner="random", max_trials=3, tune_epochs=2))
  workdir = root / "run"
  return config, workdir, tuning.search(config, str(workdir))


def _reloaded_oracle(config, workdir):
  """The tuner's own record of the search, read back from its project directory."""
  hypermodel = tuning.HeadHyperModel(8, 3, config.data.seed)
  return tuning._make_tuner(keras_tuner, config, hypermodel, os.path.join(workdir, "tuning"), None).oracle


def test_search_writes_the_oracles_best_trial_and_resumes_without_repeating(searched, monkeypatch):
  tune_config, tmp_path, best = searched
  workdir = str(tmp_path)
  saved = json.loads((tmp_path / "tuning" / "best_hparams.json").read_text())
  oracle = _reloaded_oracle(tune_config, workdir)
  assert len(oracle.trials) == 3 and saved["trials"] == 3
  best_trial = tuning.best_of(oracle)
  assert best_trial.score == oracle.get_best_trials(1)[0].score
  assert saved["hparams"] == best == {name: best_trial.hyperparameters.get(name) for name, *_ in tuning.SPACE}
  assert saved["val_accuracy"] == best_trial.score
  assert 32 <= best["head_units"] <= 1024 and 1e-5 <= best["frozen_lr"] <= 1e-2 and 0 <= best["dropout"] <= 0.6

  builds = []
  original = tuning.HeadHyperModel.__call__
  monkeypatch.setattr(tuning.HeadHyperModel, "__call__", lambda self, hp: builds.append(1) or original(self, hp))
  assert tuning.search(tune_config, workdir) == best
  assert builds == [] and len(_reloaded_oracle(tune_config, workdir).trials) == 3


def test_each_trial_is_a_run_in_the_hparams_dashboard(searched):
  _, tmp_path, _ = searched
  plugins = set()
  for root, _, names in os.walk(tmp_path / "tensorboard" / "tuning"):
    for name in names:
      for event in tf.compat.v1.train.summary_iterator(os.path.join(root, name)):
        plugins |= {value.metadata.plugin_data.plugin_name for value in event.summary.value}
  assert "hparams" in plugins


def test_a_different_search_space_in_the_same_workdir_is_refused(searched):
  tune_config, tmp_path, _ = searched
  with pytest.raises(UserInputError, match="tuner"):
    tuning.search(tune_config.replace(tuner="hyperband"), str(tmp_path))


def test_bayesian_without_scipy_says_how_to_install_it(tune_config, tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "scipy", None)
  with pytest.raises(UserInputError, match=r"transfer-trainer\[bayesian\]"):
    tuning.search(tune_config.replace(tuner="bayesian"), str(tmp_path))


def test_the_training_run_uses_the_best_values_under_mirrored(tune_config, tmp_path):
  cli.run(tune_config.replace(frozen_epochs=1, finetune_epochs=0, strategy="mirrored"), str(tmp_path),
          list_layers=False)
  best = json.loads((tmp_path / "tuning" / "best_hparams.json").read_text())["hparams"]
  config = json.loads((tmp_path / "config.json").read_text())
  assert {name: config["model" if name != "frozen_lr" else "train"][name] for name in best} == best
