"""python -m bench.tuning: cross-validated search against the defaults, and --feature_views, on cached features.

For each dataset: extracts the frozen MobileNetV2 features once (max(--views) augmented views of every training
image, plus the validation images), then, for each of --seeds seeds:
  - trains the frozen-phase head with the defaults on the first K views, for every K of --views (what
    --cache_features --feature_views=K trains), and with the tutorial recipe's head and rate (Dense 256, no
    dropout, Adam 2e-5);
  - runs the --tune search (--tuner, --max_trials, --tune_folds, scored inside the training split) on the
    --tune_views views, and trains the head with the values it chose.
Every head is scored on the validation split, which the search never sees. The seed varies the head's
initialisation, dropout, shuffling and folds; the features (and their augmentation draws) are extracted once with
seed 42, so that the comparison fits the CPU budget. The fine-tune phase is bench.finetune.
"""

import copy
import json
import os
import resource
import tempfile
import time

import numpy as np
from absl import flags

import bench
from trainer.config import Config
from trainer.loop import tuning
from trainer.runtime import runtime

FLAGS = flags.FlagValues()
flags.DEFINE_list("data_dirs", ["../shared/datasets/hymenoptera", "../shared/datasets/sign_language_digits"],
                  "Datasets (train/ + val/).", flag_values=FLAGS)
flags.DEFINE_list("max_trials", ["20", "10"], "Trials of the search, per dataset (the last repeats).",
                  flag_values=FLAGS)
bench.define_backbone_flags(FLAGS)
flags.DEFINE_integer("image_size", 224, "Input size.", flag_values=FLAGS)
flags.DEFINE_integer("seeds", 5, "Seeds per setting.", flag_values=FLAGS)
flags.DEFINE_list("views", ["1", "2", "4", "8"], "--feature_views settings to compare.", flag_values=FLAGS)
flags.DEFINE_integer("tune_views", 1, "--feature_views of the search and of the runs it is compared with.",
                     flag_values=FLAGS)
flags.DEFINE_string("tuner", "random", "hyperband | random | bayesian.", flag_values=FLAGS)
flags.DEFINE_integer("tune_folds", 5, "Folds of the search's cross-validation.", flag_values=FLAGS)
flags.DEFINE_integer("frozen_epochs", Config().train.frozen_epochs, "Epochs of every head (a run's frozen phase).",
                     flag_values=FLAGS)
flags.DEFINE_integer("tune_epochs", Config().tune.tune_epochs, "Epochs of every trial of the search.",
                     flag_values=FLAGS)
flags.DEFINE_string("workdir", "", "Where the features and searches go ('' = a new temporary folder); a rerun with "
                    "the same folder reads the features back and resumes the searches.", flag_values=FLAGS)
flags.DEFINE_string("json", "", "Write the figures to this file (after each dataset).", flag_values=FLAGS)

TUTORIAL_HEAD = {"head_units": 256, "dropout": 0.0, "frozen_lr": 2e-5}


def frozen_head(cache, config: Config, values: dict, seed: int) -> dict:
  """The run's frozen phase on cached features: epoch e on view e mod K, shuffled per epoch, Adam at the run's
  rate. Returns the val accuracy and the accuracy on the last epoch's training view."""
  head = tuning.HeadHyperModel(cache.train_features.shape[-1], cache.head.output.shape[-1], seed).build(values)
  for epoch in range(config.train.frozen_epochs):
    head.fit(cache.train_batches(epoch, config.data.batch_size, shuffle_seed=seed + epoch),
             verbose=0)
  last_view = cache.train_features[(config.train.frozen_epochs - 1) % cache.views]
  return {"val_accuracy": _accuracy(head, cache.val_features, cache.val_labels),
          "train_accuracy": _accuracy(head, last_view, cache.train_labels)}


def _accuracy(head, features, labels) -> float:
  return float(np.mean(np.argmax(head.predict(features, batch_size=4096, verbose=0), -1) == labels))


def _views(cache, count: int):
  """The cache with its first `count` views: what an extraction of `count` views with the same seed gives."""
  prefix = copy.copy(cache)
  prefix.train_features = cache.train_features[:count]
  return prefix


def _cpu_seconds() -> float:
  """CPU time of this process (all threads): the search's cost whatever else the machine runs."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _summary(values: list[float]) -> dict:
  return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
          "min": float(np.min(values)), "max": float(np.max(values)), "runs": values}


def bench_dataset(data_dir: str, max_trials: int) -> dict:
  views = [int(v) for v in FLAGS.views]
  base = runtime.resolve(Config().replace(
      data_dir=data_dir, backbone=FLAGS.backbone, alpha=FLAGS.alpha, weights=FLAGS.weights,
      image_size=FLAGS.image_size, feature_views=max(views), tune=True, tuner=FLAGS.tuner, max_trials=max_trials,
      tune_folds=FLAGS.tune_folds, frozen_epochs=FLAGS.frozen_epochs, tune_epochs=FLAGS.tune_epochs, verbosity=-1))
  root = os.path.join(FLAGS.workdir or tempfile.mkdtemp(prefix="bench_tuning_"), os.path.basename(data_dir))
  start = time.perf_counter()
  cache = tuning.cached_features(base, root)
  figures = {"data_dir": data_dir, "train_images": len(cache.train_labels), "val_images": len(cache.val_labels),
             "extraction_seconds": time.perf_counter() - start, "extracted_views": max(views)}
  seeds = [42 + i for i in range(FLAGS.seeds)]
  defaults = {"head_units": base.model.head_units, "dropout": base.model.dropout,
              "frozen_lr": base.train.frozen_lr}
  figures["feature_views"] = {}
  for count in views:
    runs = [frozen_head(_views(cache, count), base, defaults, seed) for seed in seeds]
    figures["feature_views"][count] = {key: _summary([run[key] for run in runs])
                                       for key in ("val_accuracy", "train_accuracy")}
    print(data_dir, "views", count, json.dumps({k: [round(v["mean"], 4), round(v["std"], 4)] for k, v in
                                                figures["feature_views"][count].items()}), flush=True)
  tune_cache = _views(cache, FLAGS.tune_views)
  figures["tutorial_head"] = _summary([frozen_head(tune_cache, base, TUTORIAL_HEAD, seed)["val_accuracy"]
                                       for seed in seeds])
  print(data_dir, "tutorial head", round(figures["tutorial_head"]["mean"], 4), flush=True)
  tuned, default_runs, seconds, cpu_seconds, decisions = [], [], [], [], []
  for seed in seeds:
    config = base.replace(seed=seed, feature_views=FLAGS.tune_views)
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    chosen = tuning.search(config, os.path.join(root, f"seed_{seed}"), feature_cache=tune_cache)
    seconds.append(time.perf_counter() - start)
    cpu_seconds.append(_cpu_seconds() - cpu_start)
    summary = json.load(open(os.path.join(root, f"seed_{seed}", "tuning", "best_hparams.json"), encoding="utf-8"))
    decisions.append({"decision": summary["decision"], "reason": summary["reason"], "hparams": chosen})
    default_runs.append(frozen_head(tune_cache, config, defaults, seed)["val_accuracy"])
    tuned.append(frozen_head(tune_cache, config, chosen, seed)["val_accuracy"])
    print(data_dir, "seed", seed, summary["reason"], f"defaults {default_runs[-1]:.4f} tune {tuned[-1]:.4f}",
          f"{seconds[-1]:.0f}s", flush=True)
  figures["tune"] = {"max_trials": max_trials, "folds": FLAGS.tune_folds, "views": FLAGS.tune_views,
                     "defaults": _summary(default_runs), "tune": _summary(tuned),
                     "worst_seed_difference": float(np.min(np.subtract(tuned, default_runs))),
                     "search_seconds": _summary(seconds), "search_cpu_seconds": _summary(cpu_seconds),
                     "decisions": decisions}
  return figures


def main(argv: list[str]) -> dict:
  """Measures, prints, writes --json; returns the figures."""
  bench.parse_flags(FLAGS, argv, __doc__)
  figures = {"load_average_before": os.getloadavg()[0], "image_size": FLAGS.image_size, "seeds": FLAGS.seeds}
  for index, data_dir in enumerate(FLAGS.data_dirs):
    trials = int(FLAGS.max_trials[min(index, len(FLAGS.max_trials) - 1)])
    figures[os.path.basename(data_dir.rstrip("/"))] = bench_dataset(data_dir, trials)
    figures["load_average_after"] = os.getloadavg()[0]
    bench.write_figures(figures, FLAGS.json)
  print(json.dumps(figures, indent=2))
  return figures


if __name__ == "__main__":
  bench.run(main)
