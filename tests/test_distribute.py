"""Strategies, per-replica batches, learning-rate scaling, precision choice, TF_CONFIG and its checks, the wait for
peers (bounded, stopped by signals), a lost peer's exit, and the exit codes schedulers retry."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import pytest
import tensorflow as tf
import trainer_process
from conftest import REPO

from trainer import config_checks, exit_codes
from trainer.config import Config, RuntimeConfig
from trainer.errors import UserInputError
from trainer.runtime import cluster as cluster_lib
from trainer.runtime import distribute


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
  config = cluster_lib.tf_config(["a:2222", "b:2222"], 1)
  assert config == {"cluster": {"worker": ["a:2222", "b:2222"]}, "task": {"type": "worker", "index": 1}}
  for workers, index in ((["a:2222"], 1), (["a"], 0), (["a:1", "a:1"], 0), ([], 0)):
    with pytest.raises(UserInputError):
      cluster_lib.tf_config(workers, index)


def test_tf_config_command_prints_json_for_the_launcher():
  result = subprocess.run([sys.executable, "-m", "trainer.cluster", "--workers=h1:2222,h2:2223", "--index=0"],
                          cwd=REPO, env=trainer_process.environment(), capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert json.loads(result.stdout) == cluster_lib.tf_config(["h1:2222", "h2:2223"], 0)


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


@pytest.mark.parametrize("text, names", [
    ("{not json", "not JSON"),
    ("[]", 'a "cluster" object'),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": "x"}}', "index 'x'"),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}', "index 2"),
    ('{"cluster": {"worker": ["a:1", "b:2"]}}', 'a "task" object'),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}', "task type 'chief'"),
    ('{"cluster": {"worker": ["a"]}, "task": {"type": "worker", "index": 0}}', "HOST:PORT"),
    ('{"cluster": {"ps": ["a:1"], "worker": ["b:1"]}, "task": {"type": "worker", "index": 0}}', '"ps" job'),
])
def test_a_malformed_tf_config_is_one_user_error_naming_the_mistake(text, names):
  with pytest.raises(UserInputError, match="TF_CONFIG") as error:
    cluster_lib.cluster_from_tf_config(text)
  assert names in str(error.value) and "\n" not in str(error.value)


def test_tf_config_gives_the_tasks_chief_first_and_this_one():
  cluster = cluster_lib.cluster_from_tf_config(json.dumps(
      {"cluster": {"worker": ["w0:1", "w1:1"], "chief": ["c:1"]}, "task": {"type": "worker", "index": 1}}))
  assert [(t.job, t.index) for t in cluster.tasks] == [("chief", 0), ("worker", 0), ("worker", 1)]
  assert cluster.me.address == "w1:1" and [p.address for p in cluster.peers] == ["c:1", "w0:1"]
  assert cluster_lib.cluster_from_tf_config("") is None


def _cluster_of(ports: list[int], index: int) -> cluster_lib.Cluster:
  return cluster_lib.cluster_from_tf_config(json.dumps(cluster_lib.tf_config([f"127.0.0.1:{p}" for p in ports],
                                                                           index)))


def test_waiting_for_peers_returns_when_they_listen_and_this_worker_is_seen(monkeypatch):
  monkeypatch.setattr(cluster_lib, "_PROBE_SECONDS", 0.05)
  ports = trainer_process.free_ports(2)
  seen, done = [], threading.Event()

  def peer():  # Comes after this worker: sees it waiting at its own port, then listens at its own.
    seen.append(_connects_within(ports[0], 5.0))
    with socket.create_server(("127.0.0.1", ports[1])):
      done.wait(10.0)
  thread = threading.Thread(target=peer)
  thread.start()
  start = time.monotonic()
  try:
    cluster_lib.wait_for_peers(_cluster_of(ports, 0), timeout_seconds=5.0)
  finally:
    done.set()
    thread.join()
  assert time.monotonic() - start < 5.0 and seen == [True]


def _connects_within(port: int, seconds: float) -> bool:
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
      return True
    except OSError:
      time.sleep(0.02)
  return False


def test_a_peer_that_never_comes_ends_the_wait_in_one_line_with_the_peer_lost_code(monkeypatch, capsys):
  monkeypatch.setattr(cluster_lib, "_PROBE_SECONDS", 0.05)
  ports = trainer_process.free_ports(2)
  start = time.monotonic()
  with pytest.raises(SystemExit) as stop:
    cluster_lib.wait_for_peers(_cluster_of(ports, 1), timeout_seconds=0.5)
  assert time.monotonic() - start < 3.0
  assert stop.value.code == exit_codes.PEER_LOST and exit_codes.retryable(stop.value.code)
  message = capsys.readouterr().err.strip()
  assert "\n" not in message and f"worker 0 (127.0.0.1:{ports[0]})" in message and "--peer_timeout" in message


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, exit_codes.PREEMPTED), (signal.SIGINT,
                                                                                   exit_codes.INTERRUPTED)])
def test_sigterm_and_ctrl_c_end_the_wait_at_once_and_the_handlers_are_given_back(monkeypatch, capsys, signum, code):
  monkeypatch.setattr(cluster_lib, "_PROBE_SECONDS", 0.05)
  before = signal.getsignal(signum)
  threading.Timer(0.3, os.kill, (os.getpid(), signum)).start()
  start = time.monotonic()
  with pytest.raises(SystemExit) as stop:
    cluster_lib.wait_for_peers(_cluster_of(trainer_process.free_ports(2), 0), timeout_seconds=30.0)
  assert time.monotonic() - start < 3.0 and stop.value.code == code
  assert "while waiting for worker 1" in capsys.readouterr().err
  assert signal.getsignal(signum) is before


def test_a_lost_peer_ends_in_one_line_naming_it_with_a_retried_code(monkeypatch, capsys):
  monkeypatch.setenv("TF_CONFIG", json.dumps(cluster_lib.tf_config(["127.0.0.1:1111", "127.0.0.1:2222"], 0)))
  ended = []
  monkeypatch.setattr(distribute.os, "_exit", ended.append)
  with distribute.exit_on_peer_loss():
    raise tf.errors.UnavailableError(None, None, "Collective ops is aborted by: task /job:worker/replica:0/task:1 "
                                     "heartbeat timeout")
  assert ended == [exit_codes.PEER_LOST]
  message = capsys.readouterr().err.strip()
  assert "\n" not in message and "worker 1 (127.0.0.1:2222)" in message
  monkeypatch.delenv("TF_CONFIG")
  with pytest.raises(tf.errors.UnavailableError):  # Alone, the same error is no peer's loss.
    with distribute.exit_on_peer_loss():
      raise tf.errors.UnavailableError(None, None, "a file system is unavailable")


def test_exit_codes_schedulers_retry_are_the_faults_a_restart_cures():
  for code in (exit_codes.PEER_LOST, exit_codes.PREEMPTED, exit_codes.INTERRUPTED, -signal.SIGKILL):
    assert exit_codes.retryable(code)
  for code in (exit_codes.DONE, exit_codes.CRASHED, exit_codes.USER_ERROR, 139, -signal.SIGSEGV):
    assert not exit_codes.retryable(code)


def test_tpu_strategy_without_a_tpu_is_one_line():
  with pytest.raises(UserInputError, match="--strategy=tpu: no TPU found"):
    distribute.create_strategy(RuntimeConfig(strategy="tpu"))


@pytest.mark.parametrize("seconds", [0.0, -5.0, float("nan")])
def test_peer_timeout_must_be_positive_seconds(seconds):
  with pytest.raises(UserInputError, match="--peer_timeout="):
    config_checks.validate(Config().replace(peer_timeout=seconds))
