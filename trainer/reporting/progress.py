"""What the commands print: a live progress bar on a terminal and one plain line per epoch anywhere else, and
their own log lines without TensorFlow's and Keras' INFO chatter."""

import logging as std_logging
import sys

import keras
from absl import logging


def bar(steps: int, enabled: bool) -> keras.utils.Progbar:
  """A progress bar of `steps` steps showing the running loss and accuracy, silent unless `enabled`.

  Keras' bar redraws itself with ANSI escapes, backspaces and carriage returns whenever the `posix` module is loaded
  (always on Linux), so a log file or CI output gets them too; off a terminal its verbose=2 mode prints one plain
  line when the epoch ends.
  """
  verbose = 0 if not enabled else 1 if _stdout_is_terminal() else 2
  return keras.utils.Progbar(steps, verbose=verbose, stateful_metrics=["loss", "accuracy"], unit_name="step")


def _stdout_is_terminal() -> bool:
  return hasattr(sys.stdout, "isatty") and sys.stdout.isatty()


def hide_library_info() -> None:
  """Drops the INFO lines of TensorFlow and Keras (saver timings, asset paths, signature renames) from a command's
  log; their warnings and errors stay. Call it once absl's handler exists (inside `app.run`'s main).

  TensorFlow's Python logger prints through a handler of its own when it starts before absl's, so it is filtered
  at the logger; what the libraries log through absl is filtered at absl's handler, by source file.
  """
  std_logging.getLogger("tensorflow").addFilter(_warnings_and_errors)
  logging.get_absl_handler().addFilter(_not_library_info)


def _warnings_and_errors(record: std_logging.LogRecord) -> bool:
  return record.levelno >= std_logging.WARNING


def _not_library_info(record: std_logging.LogRecord) -> bool:
  from_library = any(part in record.pathname
                     for part in ("/tensorflow/", "/keras/", "/tf_keras/", "/tensorflow_datasets/"))
  return record.levelno >= std_logging.WARNING or not from_library
