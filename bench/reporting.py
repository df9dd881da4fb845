"""python -m bench.reporting: what TensorBoard logging and the report files cost a run, by number of classes.

Prints, for each class count, the time of one `TensorBoardLog.log_epoch` (scalars and the confusion-matrix image,
the median of several epochs after a first one) and of `write_reports` after 14 epochs.
"""

import statistics
import tempfile
import time

import numpy as np
from absl import app, flags

from trainer import reporting

flags.DEFINE_list("classes", ["2", "10", "102"], "Class counts to measure.")
flags.DEFINE_integer("epochs", 5, "Epochs logged (after one not counted) per class count.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  root = tempfile.mkdtemp(prefix="bench_reporting_")
  rng = np.random.default_rng(0)
  for count in map(int, FLAGS.classes):
    classes = [f"class_{index}" for index in range(count)]
    confusion = rng.integers(0, 20, (count, count))
    log = reporting.TensorBoardLog(f"{root}/tensorboard_{count}", classes)
    history = [{"epoch": epoch, "phase": "frozen" if epoch <= 10 else "finetune", "loss": 1.0, "accuracy": 0.5,
                "val_loss": 1.0, "val_accuracy": 0.5, "learning_rate": 1e-3, "images_per_sec": 10.0,
                "train_seconds": 10.0, "first_step_seconds": 2.0, "steady_images_per_sec": 12.0}
               for epoch in range(1, 15)]
    seconds = []
    for end in range(1, FLAGS.epochs + 2):
      start = time.perf_counter()
      log.log_epoch(history[:end], confusion)
      seconds.append(time.perf_counter() - start)
    log.close()
    start = time.perf_counter()
    reporting.write_reports(f"{root}/report_{count}", history, confusion, classes)
    print(f"{count} classes: log_epoch {statistics.median(seconds[1:]) * 1000:.0f} ms, "
          f"write_reports {(time.perf_counter() - start) * 1000:.0f} ms")


if __name__ == "__main__":
  app.run(main)
