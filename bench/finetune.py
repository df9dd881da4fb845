"""python -m bench.finetune: what the fine-tune phase buys, and what it costs, against stopping after the frozen one.

For each seed and each (--finetune_lrs x --unfreeze_from) setting, one run as train.train_and_evaluate trains it
(the frozen phase on cached features, then --finetune_epochs fine-tune epochs), without the export
(bench.train_history). The frozen-only result
is the same run's validation accuracy at the end of its frozen phase (identical for every setting of a seed).
Prints and writes, per setting, the mean and spread of the final val accuracy over the seeds, the gain over the
frozen phase, and the seconds of the fine-tune phase.
"""

import json
import os
import shutil
import tempfile

import numpy as np
from absl import flags

import bench

from trainer.config import Config

FLAGS = flags.FlagValues()
flags.DEFINE_string("data_dir", "../shared/datasets/hymenoptera", "Dataset (train/ + val/).", flag_values=FLAGS)
bench.define_backbone_flags(FLAGS)
flags.DEFINE_integer("frozen_epochs", 10, "Frozen epochs of every run (on cached features, as a run's).",
                     flag_values=FLAGS)
flags.DEFINE_integer("image_size", 0, "Input size; 0 is the backbone's default, as a run's.", flag_values=FLAGS)
flags.DEFINE_integer("seeds", 3, "Seeds per setting.", flag_values=FLAGS)
flags.DEFINE_integer("finetune_epochs", 4, "Fine-tune epochs of every run (the val accuracy after each is kept).",
                     flag_values=FLAGS)
flags.DEFINE_integer("first_seed", 42, "Seeds are first_seed, first_seed + 1, ...", flag_values=FLAGS)
flags.DEFINE_list("finetune_lrs", ["1e-5", "3e-5", "1e-4"], "Fine-tune learning rates.", flag_values=FLAGS)
# MobileNetV2's last block starts at block_16_expand, the one before at block_15_expand.
flags.DEFINE_list("unfreeze_from", ["block_16_expand", "block_15_expand"], "Where fine-tuning starts.",
                  flag_values=FLAGS)
flags.DEFINE_string("json", "", "Write the figures to this file.", flag_values=FLAGS)


def _summary(values: list[float]) -> dict:
  return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
          "runs": values}


def main(argv: list[str]) -> dict:
  """Measures, prints, writes --json; returns the figures."""
  bench.parse_flags(FLAGS, argv, __doc__)
  base = Config().replace(data_dir=FLAGS.data_dir, backbone=FLAGS.backbone, alpha=FLAGS.alpha,
                          weights=FLAGS.weights, image_size=FLAGS.image_size, frozen_epochs=FLAGS.frozen_epochs,
                          finetune_epochs=FLAGS.finetune_epochs, verbosity=-1)
  root = tempfile.mkdtemp(prefix="bench_finetune_")
  # One --cache_dir for every run: the runs of a seed share its decoded images and extracted features.
  base = base.replace(cache_dir=os.path.join(root, "cache"))
  figures = {"load_average_before": os.getloadavg()[0], "data_dir": FLAGS.data_dir, "image_size": FLAGS.image_size,
             "finetune_epochs": FLAGS.finetune_epochs, "settings": {}}
  frozen = {}
  for unfreeze_from in FLAGS.unfreeze_from:
    for rate in FLAGS.finetune_lrs:
      finals, gains, seconds, curves = [], [], [], []
      for seed in range(FLAGS.first_seed, FLAGS.first_seed + FLAGS.seeds):
        name = f"{unfreeze_from}_{rate}_{seed}"
        config = base.replace(seed=seed, finetune_lr=float(rate), unfreeze_from=unfreeze_from)
        history = bench.train_history(config, os.path.join(root, name))
        frozen[seed] = history[config.train.frozen_epochs - 1]["val_accuracy"]
        finals.append(history[-1]["val_accuracy"])
        gains.append(finals[-1] - frozen[seed])
        seconds.append(sum(epoch["seconds"] for epoch in history[config.train.frozen_epochs:]))
        curves.append([epoch["val_accuracy"] for epoch in history[config.train.frozen_epochs:]])
        print(name, f"frozen {frozen[seed]:.4f} final {finals[-1]:.4f} finetune {seconds[-1]:.0f}s", flush=True)
      figures["settings"][f"{unfreeze_from} lr={rate}"] = {
          "val_accuracy": _summary(finals), "gain_over_frozen": _summary(gains),
          "finetune_seconds": _summary(seconds),
          "val_accuracy_after_each_finetune_epoch": [_summary(list(values)) for values in zip(*curves)]}
  shutil.rmtree(root)  # The runs' workdirs and their shared cache: every figure is in `figures`.
  figures["frozen_only"] = _summary([frozen[seed] for seed in sorted(frozen)])
  figures["load_average_after"] = os.getloadavg()[0]
  print(json.dumps(figures, indent=2))
  bench.write_figures(figures, FLAGS.json)
  return figures


if __name__ == "__main__":
  bench.run(main)
