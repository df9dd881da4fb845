"""The trainer as a child process (`python -m trainer.main`): fresh TensorFlow state for strategies, logical
devices and signals, with a timeout. Shared by the distribution, multi-worker and resume tests."""

import json
import os
import pathlib
import socket
import subprocess
import sys

from conftest import REPO, TINY_RUN

TIMEOUT_SECONDS = 300


def tiny_flags(data_dir, weights: str, **overrides) -> list[str]:
  """conftest.TINY_RUN as flags: the defaults' augmentation, dropout and input order."""
  flags = {"data_dir": data_dir, "weights": weights, **TINY_RUN, **overrides}
  return [f"--{name}={str(value).lower() if isinstance(value, bool) else value}" for name, value in flags.items()]


def command(flags: list[str], logical_cpus: int = 0) -> list[str]:
  """The training command; with `logical_cpus`, the CPU is first split into that many logical devices (which must
  happen before TensorFlow initialises its devices, so in the child process)."""
  if not logical_cpus:
    return [sys.executable, "-m", "trainer.main", *flags]
  prelude = ("import tensorflow as tf; "
             "tf.config.set_logical_device_configuration(tf.config.list_physical_devices('CPU')[0], "
             f"[tf.config.LogicalDeviceConfiguration()] * {logical_cpus}); "
             "from trainer import main; main.run_script()")
  return [sys.executable, "-c", prelude, *flags]


def environment(**extra) -> dict:
  return {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


def start(flags: list[str], logical_cpus: int = 0, **env) -> subprocess.Popen:
  return subprocess.Popen(command(flags, logical_cpus), cwd=REPO, env=environment(**env), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def run(flags: list[str], logical_cpus: int = 0, **env) -> str:
  """Runs to the end and returns the output; fails the test with that output on a non-zero exit."""
  process = start(flags, logical_cpus, **env)
  output, _ = process.communicate(timeout=TIMEOUT_SECONDS)
  assert process.returncode == 0, output[-4000:]
  return output


def history(workdir: pathlib.Path) -> list[dict]:
  path = workdir / "report" / "history.json"
  return json.loads(path.read_text()) if path.is_file() else []


def run_facts(workdir: pathlib.Path) -> dict:
  return json.loads((workdir / "config.json").read_text())["run"]


def free_ports(count: int) -> list[int]:
  sockets = [socket.socket() for _ in range(count)]
  try:
    for s in sockets:
      s.bind(("127.0.0.1", 0))
    return [s.getsockname()[1] for s in sockets]
  finally:
    for s in sockets:
      s.close()
