"""What a command prints: progress without terminal escapes off a terminal, TensorFlow's C++ log level set before
TensorFlow loads, and --verbosity=-1 down to warnings, errors and the final Done line."""

import contextlib
import io
import logging as std_logging
import os
import re
import subprocess
import sys

import pytest
import tensorflow as tf
from absl import logging
from conftest import REPO, write_color_dataset

from trainer.reporting import progress


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def _printed(stdout: io.StringIO, enabled: bool, steps: int = 3) -> str:
  with contextlib.redirect_stdout(stdout):
    bar = progress.bar(steps, enabled)
    for step in range(1, steps + 1):
      bar.update(step, [("loss", 1.0 / step), ("accuracy", 0.5)])
  return stdout.getvalue()


def test_off_a_terminal_an_epoch_is_one_plain_line():
  printed = _printed(io.StringIO(), enabled=True)
  assert not {"\x1b", "\r", "\b"} & set(printed)
  assert printed.count("\n") == 1 and printed.startswith("3/3") and "loss: 0.3333" in printed


def test_on_a_terminal_the_bar_redraws_in_place():
  printed = _printed(_Terminal(), enabled=True)
  assert "\r" in printed and printed.count("\n") == 1


def test_a_disabled_bar_prints_nothing():
  assert _printed(_Terminal(), enabled=False) == ""


class _Lines(std_logging.Handler):
  def __init__(self):
    super().__init__()
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


@pytest.fixture
def hidden_library_info():
  """hide_library_info() in force, with what reaches absl's handler and TensorFlow's logger captured."""
  absl_handler, tf_logger = logging.get_absl_handler(), tf.get_logger()
  filters = (list(absl_handler.filters), list(tf_logger.filters))
  progress.hide_library_info()
  seen = _Lines()
  absl_handler.addFilter(lambda record: seen.emit(record) and False)  # After the filters under test.
  tf_logger.addHandler(seen)
  yield seen
  tf_logger.removeHandler(seen)
  absl_handler.filters[:], tf_logger.filters[:] = filters


def test_library_info_lines_are_hidden_and_their_warnings_kept(hidden_library_info):
  tf.get_logger().info("Assets written to: somewhere")
  tf.get_logger().warning("a TensorFlow warning")
  library = std_logging.makeLogRecord({"name": "absl", "levelno": std_logging.INFO, "levelname": "INFO",
                                       "msg": "Sharding callback duration", "pathname": "/x/tensorflow/saver.py"})
  own = std_logging.makeLogRecord({"name": "absl", "levelno": std_logging.INFO, "levelname": "INFO",
                                   "msg": "epoch 1/1", "pathname": "/repo/trainer/loop/train.py"})
  for record in (library, own):
    logging.get_absl_handler().handle(record)
  assert hidden_library_info.lines == ["a TensorFlow warning", "epoch 1/1"]


def _without_tf_log_level() -> dict:
  return {name: value for name, value in os.environ.items() if name != "TF_CPP_MIN_LOG_LEVEL"}


# TensorFlow reads TF_CPP_MIN_LOG_LEVEL when it loads: its CPU-feature INFO line shows only if it was not set.
_CPU_FEATURE_LINE = "cpu_feature_guard"


# The training command's package does the same (the test of --verbosity=-1 checks it).
def test_the_export_command_sets_tensorflows_log_level_before_tensorflow_loads():
  result = subprocess.run([sys.executable, "-c", "import export.saved_model, os; "
                           "print(os.environ['TF_CPP_MIN_LOG_LEVEL'])"], cwd=REPO, env=_without_tf_log_level(),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == ["2"]
  assert _CPU_FEATURE_LINE not in result.stderr


# Lines of Python's logging through absl (I1201 12:00:00.123 ...) and of TensorFlow's own Python logger. C++ lines
# logged before absl's C++ logging is initialised show a zero date (I0000 00:00:...) and cannot be silenced (see
# the README).
_PYTHON_INFO = re.compile(r"^(I(?!0000 00:00)\d{4} \d\d:\d\d|INFO:)", re.MULTILINE)


def test_verbosity_minus_one_prints_only_the_done_line(tmp_path, random_mobilenet_025_weights):
  write_color_dataset(tmp_path / "data", 5)
  result = subprocess.run(
      [sys.executable, "-m", "trainer.main", f"--data_dir={tmp_path / 'data'}", f"--workdir={tmp_path / 'run'}",
       "--backbone=mobilenet", "--alpha=0.25", f"--weights={random_mobilenet_025_weights}", "--image_size=32",
       "--batch_size=8", "--frozen_epochs=1", "--finetune_epochs=0", "--head_units=4", "--verbosity=-1"],
      cwd=REPO, env=_without_tf_log_level(), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.startswith("Done: val_accuracy ") and result.stdout.count("\n") == 1
  assert str(tmp_path / "run" / "export") in result.stdout
  assert not _PYTHON_INFO.findall(result.stderr), result.stderr[-3000:]
  assert _CPU_FEATURE_LINE not in result.stderr
