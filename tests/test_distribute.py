"""Strategies, per-replica batches, learning-rate scaling, precision choice, TF_CONFIG, and mirrored training on two
logical CPU devices matching the default strategy."""

import json
import pathlib
import subprocess
import sys
import types

import pytest
import tensorflow as tf

import trainer_process
from conftest import REPO
from trainer import config_checks, distribute
from trainer.config import Config, RuntimeConfig
from trainer.errors import UserInputError


def test_plan_splits_the_global_batch_and_scales_learning_rates_linearly():
  plan = distribute.plan_batches(batch_size=64, num_replicas=4, lr_base_batch_size=32)
  assert (plan.per_replica_batch_size, plan.lr_scale) == (16, 2.0)
  assert distribute.plan_batches(64, 4, lr_base_batch_size=0).lr_scale == 1.0


@pytest.mark.parametrize("batch_size", [30, 2])
def test_plan_refuses_a_batch_that_does_not_split_evenly(batch_size):
  with pytest.raises(UserInputError, match="--batch_size"):
    distribute.plan_batches(batch_size, num_replicas=4, lr_base_batch_size=0)


def test_auto_precision_is_float32_on_this_cpu_and_choices_map_to_keras_policies():
  strategy = tf.distribute.get_strategy()
  assert distribute.resolve_precision(RuntimeConfig(mixed_precision="auto"), strategy) == "float32"
  assert distribute.resolve_precision(RuntimeConfig(mixed_precision="float16"), strategy) == "mixed_float16"
  assert distribute.resolve_precision(RuntimeConfig(mixed_precision="bfloat16"), strategy) == "mixed_bfloat16"
  with pytest.raises(UserInputError, match="--mixed_precision"):
    config_checks.validate(Config().replace(mixed_precision="half"))


def test_unknown_strategy_is_a_user_error():
  with pytest.raises(UserInputError, match="--strategy=parameter_server"):
    config_checks.validate(Config().replace(strategy="parameter_server"))


def test_tf_config_names_every_worker_and_this_task():
  config = distribute.tf_config(["a:2222", "b:2222"], 1)
  assert config == {"cluster": {"worker": ["a:2222", "b:2222"]}, "task": {"type": "worker", "index": 1}}
  for workers, index in ((["a:2222"], 1), (["a"], 0), (["a:1", "a:1"], 0), ([], 0)):
    with pytest.raises(UserInputError):
      distribute.tf_config(workers, index)


def test_tf_config_command_prints_json_for_the_launcher():
  result = subprocess.run([sys.executable, "-m", "trainer.distribute", "--workers=h1:2222,h2:2223", "--index=0"],
                          cwd=REPO, env=trainer_process.environment(), capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert json.loads(result.stdout) == distribute.tf_config(["h1:2222", "h2:2223"], 0)


def _strategy_in(cluster: dict, task_type: str, task_id: int):
  resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(tf.train.ClusterSpec(cluster), task_type=task_type,
                                                                 task_id=task_id)
  return types.SimpleNamespace(cluster_resolver=resolver)


def test_chief_writes_the_workdir_and_other_workers_a_temporary_folder(tmp_path):
  workers = {"worker": ["a:1", "b:1"]}
  chief, other = _strategy_in(workers, "worker", 0), _strategy_in(workers, "worker", 1)
  assert distribute.is_chief(chief) and not distribute.is_chief(other)
  assert distribute.write_dir(str(tmp_path), chief) == str(tmp_path)
  temporary = pathlib.Path(distribute.write_dir(str(tmp_path), other))
  assert temporary.parent == tmp_path
  (tmp_path / "checkpoints").mkdir()
  (temporary / "checkpoints").mkdir(parents=True)
  distribute.remove_worker_files(str(tmp_path), other)
  distribute.remove_worker_files(str(tmp_path), chief)
  assert not temporary.exists() and (tmp_path / "checkpoints").is_dir()
  with_chief_job = {"chief": ["c:1"], "worker": ["a:1"]}
  assert distribute.is_chief(_strategy_in(with_chief_job, "chief", 0))
  assert not distribute.is_chief(_strategy_in(with_chief_job, "worker", 0))
  assert distribute.is_chief(tf.distribute.get_strategy())
