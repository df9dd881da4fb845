"""What training prints per epoch: a live progress bar on a terminal, one plain line per epoch anywhere else."""

import sys

import keras


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
