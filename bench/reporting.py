"""python -m bench.reporting: what TensorBoard logging and the report files cost a run, by number of classes.

python -m bench.reporting [--classes=2,10,102] [--epochs=5] [--json=FILE]

Prints and writes, for each class count, the milliseconds of one `TensorBoardLog.log_epoch` (scalars and the
confusion-matrix image, the median of several epochs after a first one) and of `write_reports` after 14 epochs.
"""

import statistics
import tempfile
import time

import numpy as np
from absl import flags

import bench
from trainer.reporting import report_files, summaries

FLAGS = flags.FlagValues()
flags.DEFINE_list("classes", ["2", "10", "102"], "Class counts to measure.", flag_values=FLAGS)
flags.DEFINE_integer("epochs", 5, "Epochs logged (after one not counted) per class count.", flag_values=FLAGS)
flags.DEFINE_string("json", "", "Write the figures to this file.", flag_values=FLAGS)


def main(argv: list[str]) -> dict:
  """Measures, prints, writes --json; returns the figures by class count."""
  bench.parse_flags(FLAGS, argv, __doc__)
  with tempfile.TemporaryDirectory(prefix="bench_reporting_") as root:
    figures = {count: _costs(root, count) for count in map(int, FLAGS.classes)}
  for count, costs in figures.items():
    print(f"{count} classes: log_epoch {costs['log_epoch_ms']:.0f} ms, "
          f"write_reports {costs['write_reports_ms']:.0f} ms")
  figures = {"classes": {str(count): costs for count, costs in figures.items()}, "epochs": FLAGS.epochs}
  bench.write_figures(figures, FLAGS.json)
  return figures


def _costs(root: str, count: int) -> dict:
  """Milliseconds of one log_epoch (the median after the first) and of write_reports, for `count` classes."""
  rng = np.random.default_rng(0)
  classes = [f"class_{index}" for index in range(count)]
  confusion = rng.integers(0, 20, (count, count))
  log = summaries.TensorBoardLog(f"{root}/tensorboard_{count}", classes)
  history = [{"epoch": epoch, "phase": "frozen" if epoch <= 10 else "finetune", "loss": 1.0, "accuracy": 0.5,
              "val_loss": 1.0, "val_accuracy": 0.5, "learning_rate": 1e-3, "images_per_sec": 10.0,
              "train_seconds": 10.0, "compile_seconds": 2.0, "steady_images_per_sec": 12.0}
             for epoch in range(1, 15)]
  seconds = []
  for end in range(1, FLAGS.epochs + 2):
    start = time.perf_counter()
    log.log_epoch(history[:end], confusion)
    seconds.append(time.perf_counter() - start)
  log.close()
  start = time.perf_counter()
  report_files.write_reports(f"{root}/report_{count}", history, confusion, classes)
  return {"log_epoch_ms": statistics.median(seconds[1:]) * 1000,
          "write_reports_ms": (time.perf_counter() - start) * 1000}


if __name__ == "__main__":
  bench.run(main)
