"""python -m bench.finetune: what the fine-tune phase buys, and what it costs, against stopping after the frozen one.

For each seed and each (--finetune_lrs x --unfreeze_from) setting, one whole run (train.train_and_evaluate: the
frozen phase on cached features, then --finetune_epochs fine-tune epochs, then the export). The frozen-only result
is the same run's validation accuracy at the end of its frozen phase (identical for every setting of a seed).
Prints and writes, per setting, the mean and spread of the final val accuracy over the seeds, the gain over the
frozen phase, and the seconds of the fine-tune phase.
"""

import json
import os
import tempfile

import numpy as np
from absl import app, flags

from bench import write_figures

from trainer import train
from trainer.config import Config

flags.DEFINE_string("data_dir", "../shared/datasets/hymenoptera", "Dataset (train/ + val/).")
flags.DEFINE_string("weights", "../shared/weights/mobilenet_v2_1.0_224_coral-tf2ptq-dequant_no_top.h5",
                    "MobileNetV2 no-top weights file.")
flags.DEFINE_integer("image_size", 0, "Input size; 0 is the backbone's default, as a run's.")
flags.DEFINE_integer("seeds", 3, "Seeds per setting.")
flags.DEFINE_integer("finetune_epochs", 4, "Fine-tune epochs of every run (the val accuracy after each is kept).")
flags.DEFINE_integer("first_seed", 42, "Seeds are first_seed, first_seed + 1, ...")
flags.DEFINE_list("finetune_lrs", ["1e-5", "3e-5", "1e-4"], "Fine-tune learning rates.")
# MobileNetV2's last block starts at block_16_expand, the one before at block_15_expand.
flags.DEFINE_list("unfreeze_from", ["block_16_expand", "block_15_expand"], "Where fine-tuning starts.")
flags.DEFINE_string("json", "", "Write the figures to this file.")
FLAGS = flags.FLAGS


def _summary(values: list[float]) -> dict:
  return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
          "runs": values}


def main(argv):
  del argv
  base = Config().replace(data_dir=FLAGS.data_dir, weights=FLAGS.weights, image_size=FLAGS.image_size,
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
        metrics = train.train_and_evaluate(config, os.path.join(root, name))
        with open(os.path.join(root, name, "report", "history.json"), encoding="utf-8") as f:
          history = json.load(f)
        frozen[seed] = history[config.train.frozen_epochs - 1]["val_accuracy"]
        finals.append(metrics["val_accuracy"])
        gains.append(metrics["val_accuracy"] - frozen[seed])
        seconds.append(metrics["phases"]["finetune"]["seconds"])
        curves.append([epoch["val_accuracy"] for epoch in history[config.train.frozen_epochs:]])
        print(name, f"frozen {frozen[seed]:.4f} final {finals[-1]:.4f} finetune {seconds[-1]:.0f}s", flush=True)
      figures["settings"][f"{unfreeze_from} lr={rate}"] = {
          "val_accuracy": _summary(finals), "gain_over_frozen": _summary(gains),
          "finetune_seconds": _summary(seconds),
          "val_accuracy_after_each_finetune_epoch": [_summary(list(values)) for values in zip(*curves)]}
  figures["frozen_only"] = _summary([frozen[seed] for seed in sorted(frozen)])
  figures["load_average_after"] = os.getloadavg()[0]
  print(json.dumps(figures, indent=2))
  write_figures(figures, FLAGS.json)


if __name__ == "__main__":
  app.run(main)
