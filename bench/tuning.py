"""python -m bench.tuning: a 20-trial head search on hymenoptera at 224 px, and what the best values buy.

Prints the one-time feature extraction time, the search wall time, the best trial's val accuracy, and the final
val accuracy of a full default run next to one with the best values (both --cache_features off, defaults else).
"""

import json
import os
import tempfile
import time

from absl import app, flags

from bench import write_figures

from trainer import train, tuning
from trainer.config import Config

flags.DEFINE_string("data_dir", "../shared/datasets/hymenoptera", "Dataset (train/ + val/).")
flags.DEFINE_string("weights", "../shared/weights/mobilenet_v2_1.0_224_coral-tf2ptq-dequant_no_top.h5",
                    "MobileNetV2 no-top weights file.")
flags.DEFINE_integer("image_size", 224, "Input size (the issue's benchmark is at 224 px).")
flags.DEFINE_string("tuner", "random", "hyperband | random | bayesian.")
flags.DEFINE_integer("max_trials", 20, "Trials of the search.")
flags.DEFINE_bool("full_runs", True, "Also train with the defaults and with the best values, and compare.")
flags.DEFINE_string("json", "", "Write the figures to this file.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  workdir = tempfile.mkdtemp(prefix="bench_tuning_")
  config = train.resolve(Config().replace(data_dir=FLAGS.data_dir, weights=FLAGS.weights, image_size=FLAGS.image_size, tune=True,
                                          tuner=FLAGS.tuner, max_trials=FLAGS.max_trials, verbosity=-1))
  start = time.perf_counter()
  splits = tuning.cached_features(config, os.path.join(workdir, "cache"))
  extraction_seconds = time.perf_counter() - start
  start = time.perf_counter()
  best = tuning.search(config, workdir, splits=splits)
  search_seconds = time.perf_counter() - start
  with open(os.path.join(workdir, "tuning", "best_hparams.json"), encoding="utf-8") as f:
    summary = json.load(f)
  figures = {"feature_extraction_seconds": extraction_seconds, "search_seconds": search_seconds,
             "trials": summary["trials"], "best_trial_val_accuracy": summary["val_accuracy"], "best": best}
  print(json.dumps(figures, indent=2), flush=True)
  if FLAGS.full_runs:
    for name, run_config in (("defaults", config), ("tuned", config.replace(**best))):
      start = time.perf_counter()
      metrics = train.train_and_evaluate(run_config.replace(tune=False), os.path.join(workdir, name))
      figures[f"{name}_val_accuracy"] = metrics["val_accuracy"]
      figures[f"{name}_seconds"] = time.perf_counter() - start
      print(name, figures[f"{name}_val_accuracy"], f"{figures[f'{name}_seconds']:.0f}s", flush=True)
  print(json.dumps(figures, indent=2))
  write_figures(figures, FLAGS.json)


if __name__ == "__main__":
  app.run(main)
