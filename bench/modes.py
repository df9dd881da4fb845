"""python -m bench.modes: the reference tutorial's table of training modes, on hymenoptera with MobileNetV2.

The tutorial (../shared/reference/tutorial-4.md, "Test without frozen weights, or by training from scratch")
trains InceptionV3 on CIFAR-10 for 5 epochs three ways and reports val accuracy after epoch 1 and epoch 5 and the
time per epoch: frozen 65.5 -> 70.3 % (50 s), unfrozen 50.6 -> 71.6 % (142 s), no pretrained weights
19.2 -> 39.2 % (142 s). This trains the same three modes for the same epochs on the same data and seed:

  frozen     --frozen_epochs=E --finetune_epochs=0, end to end (the backbone runs on every image every epoch, as
             in the tutorial; --cache_features is measured in bench.frozen_phase)
  unfrozen   --frozen_epochs=0 --finetune_epochs=E --unfreeze_from=all: the whole pretrained network and a new
             head train from the first epoch (BatchNorm frozen, the pretrained default)
  scratch    --weights=none: every layer from random weights, BatchNorm training

Seconds per epoch are a training pass plus validation, as Keras' fit reports them; the first epoch (tracing) apart.
"""

import json
import os
import statistics
import tempfile

from absl import app, flags

from bench import write_figures

from trainer import train
from trainer.config import Config

flags.DEFINE_string("data_dir", "../shared/datasets/hymenoptera", "Dataset (train/ + val/, or class folders).")
flags.DEFINE_string("weights", "../shared/weights/mobilenet_v2_1.0_224_coral-tf2ptq-dequant_no_top.h5",
                    "No-top MobileNetV2 weights of the frozen and unfrozen modes.")
flags.DEFINE_integer("image_size", 224, "Input size (the tutorial's InceptionV3 ran at 139).")
flags.DEFINE_integer("epochs", 5, "Epochs of every mode.")
flags.DEFINE_integer("batch_size", 32, "Global batch size (the tutorial's).")
flags.DEFINE_float("frozen_lr", 1e-3, "Adam learning rate of the frozen mode (the tutorial's Adam default).")
flags.DEFINE_float("unfrozen_lr", 1e-4, "Adam learning rate of the unfrozen mode: lower than the head's, so the "
                   "pretrained features survive the first steps of a random head.")
flags.DEFINE_float("scratch_lr", 1e-3, "Adam learning rate from scratch.")
flags.DEFINE_string("augment", "none", "Augmentation preset of every mode (the tutorial's generator had none).")
flags.DEFINE_list("modes", ["frozen", "unfrozen", "scratch"], "Modes to train.")
flags.DEFINE_list("seeds", ["42"], "Seeds: each mode trains once per seed; the table shows mean and spread.")
flags.DEFINE_string("json", "", "Write the figures to this file.")
FLAGS = flags.FLAGS


def mode_config(mode: str, base: Config) -> Config:
  epochs = FLAGS.epochs
  if mode == "frozen":
    return base.replace(frozen_epochs=epochs, finetune_epochs=0, frozen_lr=FLAGS.frozen_lr, cache_features=False)
  if mode == "unfrozen":
    return base.replace(frozen_epochs=0, finetune_epochs=epochs, finetune_lr=FLAGS.unfrozen_lr, unfreeze_from="all")
  if mode == "scratch":
    return base.replace(weights="none", frozen_epochs=epochs, finetune_epochs=0, frozen_lr=FLAGS.scratch_lr,
                        cache_features=False)
  raise ValueError(f"Unknown mode {mode!r}: frozen, unfrozen or scratch.")


def run_mode(config: Config, workdir: str) -> dict:
  train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "report", "history.json"), encoding="utf-8") as f:
    history = json.load(f)
  later = [record["seconds"] for record in history[1:]] or [history[0]["seconds"]]
  return {"val_accuracy_epoch_1": history[0]["val_accuracy"], "val_accuracy_last": history[-1]["val_accuracy"],
          "first_epoch_seconds": history[0]["seconds"], "seconds_per_epoch": statistics.mean(later),
          "phases": sorted({record["phase"] for record in history})}


def _mean_spread(values: list[float]) -> str:
  if len(values) == 1:
    return f"{100 * values[0]:.1f} %"
  return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f} %"


def table(figures: dict) -> str:
  lines = [f"| mode | val acc @ 1 epoch | val acc @ {FLAGS.epochs} epochs | s per epoch (first) |",
           "| --- | ---: | ---: | ---: |"]
  for mode, runs in figures["modes"].items():
    seconds = statistics.mean(run["seconds_per_epoch"] for run in runs)
    first = statistics.mean(run["first_epoch_seconds"] for run in runs)
    lines.append(f"| {mode} | {_mean_spread([run['val_accuracy_epoch_1'] for run in runs])} | "
                 f"{_mean_spread([run['val_accuracy_last'] for run in runs])} | {seconds:.0f} ({first:.0f}) |")
  return "\n".join(lines)


def main(argv):
  del argv
  base = Config().replace(data_dir=FLAGS.data_dir, backbone="mobilenet_v2", weights=FLAGS.weights,
                          image_size=FLAGS.image_size, batch_size=FLAGS.batch_size, augment=FLAGS.augment,
                          verbosity=-1)
  root = tempfile.mkdtemp(prefix="bench_modes_")
  figures = {"epochs": FLAGS.epochs, "image_size": FLAGS.image_size, "seeds": [int(s) for s in FLAGS.seeds],
             "modes": {}}
  for mode in FLAGS.modes:
    figures["modes"][mode] = [
        run_mode(mode_config(mode, base).replace(seed=int(seed)), os.path.join(root, f"{mode}_{seed}"))
        for seed in FLAGS.seeds]
    print(json.dumps({mode: figures["modes"][mode]}), flush=True)
  figures["load_average"] = os.getloadavg()[0]
  print(table(figures))
  write_figures(figures, FLAGS.json)


if __name__ == "__main__":
  app.run(main)
