"""Benchmarks run by hand; results and commands in BUILD_NOTES.md.

Every module is `python -m bench.NAME [--flags]` and also `bench.NAME.main(argv) -> figures`, which the smoke
tests (tests/test_bench.py) call in-process on tiny data. So each module keeps its flags in a `FlagValues` of its
own, parsed from their defaults on every call: in one process several benchmarks (and the trainer, whose flags
share their names: --data_dir, --image_size, ...) are imported side by side.
"""

import json
import os
import shlex
import subprocess
import sys
import time
from typing import Callable, Sequence

from absl import app, flags


def parse_flags(flag_values: flags.FlagValues, argv: Sequence[str], usage: str) -> None:
  """Parses `argv` (the program name first) into a benchmark's own flags, each from its default (a previous call's
  values do not leak into this one). --help prints `usage` and the flags and exits 0; a bad flag or a stray
  argument ends in one line on stderr, exit 2."""
  if any(arg in ("--help", "-help", "-h", "--helpshort") for arg in argv[1:]):
    print(f"{usage.strip()}\n\n{flag_values.get_help()}")
    sys.exit(0)
  for name in flag_values:
    flag_values[name].unparse()  # Back to its default (FlagValues.unparse_flags would log at INFO each time).
  try:
    rest = flag_values(list(argv))
  except flags.Error as e:
    _usage_error(str(e))
  if len(rest) > 1:
    _usage_error(f"unexpected argument(s) {' '.join(rest[1:])}: benchmarks take only --flag=value")


def _usage_error(message: str) -> None:
  print(f"error: {' '.join(message.split())} (--help lists the flags)", file=sys.stderr)
  sys.exit(2)


def run(main: Callable[[list[str]], dict]) -> None:
  """`python -m bench.NAME`: absl's app.run (its logging set up as in every command) around `main(sys.argv)`,
  whose figures are printed or written by main itself (app.run would take a returned value for an exit status)."""
  def without_figures(argv: list[str]) -> None:
    main(argv)

  def absl_defaults(argv: list[str]) -> list[str]:
    flags.FLAGS(argv[:1])  # absl's own flags (logging) at their defaults; main parses the benchmark's.
    return list(argv)
  app.run(without_figures, flags_parser=absl_defaults)


def train_history(config, workdir: str) -> list[dict]:
  """The epoch records (report/history.json's) of one run trained as train.train_and_evaluate trains it, without
  its export: the benchmarks measure training, and the export with its parity checks costs about a minute for a
  MobileNetV2 here. `config` is a trainer.config.Config."""
  from trainer.loop import train  # Here, not above: bench.scale's rows measure their process's memory without it.
  run = train.setup(config, workdir)
  train.train_epochs(run)
  run.tensorboard.close()
  return run.history


def train_command(command: list[str], workdir: str) -> tuple[dict, float]:
  """Runs a `python -m trainer.main ...` command as a user does (its own process); returns the run's
  report/metrics.json and the wall seconds the command took. A failed run raises with its last output."""
  start = time.perf_counter()
  done = subprocess.run(command, capture_output=True, text=True, check=False)
  seconds = time.perf_counter() - start
  if done.returncode:
    raise RuntimeError(f"{shlex.join(command)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
  with open(os.path.join(workdir, "report", "metrics.json"), encoding="utf-8") as f:
    return json.load(f), seconds


def define_backbone_flags(flag_values: flags.FlagValues) -> None:
  """--backbone, --alpha and --weights, as every benchmark of a pretrained backbone takes them (the shared
  MobileNetV2 file by default)."""
  flags.DEFINE_string("backbone", "mobilenet_v2", "Backbone.", flag_values=flag_values)
  flags.DEFINE_float("alpha", 1.0, "Width multiplier of mobilenet / mobilenet_v2.", flag_values=flag_values)
  flags.DEFINE_string("weights", "../shared/weights/mobilenet_v2_1.0_224_coral-tf2ptq-dequant_no_top.h5",
                      "No-top weights file of the backbone.", flag_values=flag_values)


def write_figures(figures: dict, path: str) -> None:
  """Writes a benchmark's figures as JSON to `path` (its --json flag), nothing when path is empty."""
  if path:
    with open(path, "w", encoding="utf-8") as f:
      json.dump(figures, f, indent=2)
