"""python -m bench.tune_runs: whole `--tune` runs against whole plain runs, over seeds, with the defaults.

For each dataset and seed, `python -m trainer.main --tune` (cross-validated search, then the training with what it
chose), and the same command without --tune. A search that keeps the defaults trains exactly the plain run's
model (same config, same features file), so with --plain=when_tuned the plain run is made only for the seeds
where the search chose other values, and the other seeds count the --tune run's accuracy for both (the first
seed always runs both, for the time ratio and as a check that they agree, each run extracting its own features;
the other seeds' runs share them through one --cache_dir). Prints and writes, per dataset, each
seed's val accuracies, decision and seconds, the means and spreads, and the worst seed's difference.

python -m bench.tune_runs --data_dirs=../shared/datasets/hymenoptera --seeds=5 --json=/tmp/tune_runs.json
"""

import json
import os
import shutil
import sys
import tempfile

import numpy as np
from absl import flags

import bench

FLAGS = flags.FlagValues()
flags.DEFINE_list("data_dirs", ["../shared/datasets/hymenoptera", "../shared/datasets/sign_language_digits"],
                  "Datasets (train/ + val/).", flag_values=FLAGS)
flags.DEFINE_string("weights", "../shared/weights/mobilenet_v2_1.0_224_coral-tf2ptq-dequant_no_top.h5",
                    "MobileNetV2 no-top weights file.", flag_values=FLAGS)
flags.DEFINE_integer("seeds", 5, "Seeds per dataset (42, 43, ...).", flag_values=FLAGS)
flags.DEFINE_enum("plain", "when_tuned", ["always", "when_tuned"], "When to make the plain run of a seed.",
                  flag_values=FLAGS)
flags.DEFINE_list("extra_flags", [], "More flags for every run (e.g. --finetune_epochs=2).", flag_values=FLAGS)
flags.DEFINE_string("json", "", "Write the figures to this file (after each run).", flag_values=FLAGS)


def _run(data_dir: str, seed: int, tune: bool, root: str) -> dict:
  workdir = os.path.join(root, f"{os.path.basename(data_dir.rstrip('/'))}_{seed}_{'tune' if tune else 'plain'}")
  # The timed pair (the first seed) extracts its features in each run; the other seeds' runs share one --cache_dir.
  shared = [] if seed == 42 else [f"--cache_dir={os.path.join(root, 'cache')}"]
  command = [sys.executable, "-m", "trainer.main", f"--data_dir={data_dir}", f"--weights={FLAGS.weights}",
             f"--seed={seed}", f"--workdir={workdir}", "--verbosity=-1", *shared, *FLAGS.extra_flags] + (
                 ["--tune"] if tune else [])
  metrics, seconds = bench.train_command(command, workdir)
  figures = {"val_accuracy": metrics["val_accuracy"], "seconds": seconds}
  if tune:
    with open(os.path.join(workdir, "tuning", "best_hparams.json"), encoding="utf-8") as f:
      best = json.load(f)
    figures.update(decision=best["decision"], reason=best["reason"], hparams=best["hparams"])
  print(f"{workdir}: {json.dumps(figures)}", flush=True)
  return figures


def _summary(values) -> dict:
  return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


def main(argv: list[str]) -> dict:
  """Measures, prints, writes --json; returns the figures."""
  bench.parse_flags(FLAGS, argv, __doc__)
  root = tempfile.mkdtemp(prefix="bench_tune_runs_")
  figures = {"load_average_before": os.getloadavg()[0], "extra_flags": FLAGS.extra_flags, "datasets": {}}
  for data_dir in FLAGS.data_dirs:
    seeds = []
    for seed in range(42, 42 + FLAGS.seeds):
      tuned = _run(data_dir, seed, True, root)
      if FLAGS.plain == "always" or seed == 42 or tuned["decision"] == "tuned":
        plain = _run(data_dir, seed, False, root)
      else:
        plain = {"val_accuracy": tuned["val_accuracy"], "same_as_tune_run": True}
      seeds.append({"seed": seed, "tune": tuned, "plain": plain})
      tune_accuracy = [s["tune"]["val_accuracy"] for s in seeds]
      plain_accuracy = [s["plain"]["val_accuracy"] for s in seeds]
      timed = [s for s in seeds if s["seed"] == 42]  # The others' plain runs read the --tune run's features.
      figures["datasets"][data_dir] = {
          "seeds": seeds, "tune": _summary(tune_accuracy), "plain": _summary(plain_accuracy),
          "worst_seed_tune_minus_plain": float(np.min(np.subtract(tune_accuracy, plain_accuracy))),
          "tune_over_plain_seconds": [s["tune"]["seconds"] / s["plain"]["seconds"] for s in timed]}
      bench.write_figures(figures, FLAGS.json)
  shutil.rmtree(root)  # The runs' workdirs: every figure is in `figures`.
  figures["load_average_after"] = os.getloadavg()[0]
  print(json.dumps({d: {k: v for k, v in f.items() if k != "seeds"} for d, f in figures["datasets"].items()},
                   indent=2))
  bench.write_figures(figures, FLAGS.json)
  return figures


if __name__ == "__main__":
  bench.run(main)
