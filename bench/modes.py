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
import shutil
import statistics
import tempfile

from absl import flags

import bench

from trainer.config import Config

FLAGS = flags.FlagValues()
flags.DEFINE_string("data_dir", "../shared/datasets/hymenoptera", "Dataset (train/ + val/, or class folders).",
                    flag_values=FLAGS)
flags.DEFINE_string("weights", "../shared/weights/mobilenet_v2_1.0_224_coral-tf2ptq-dequant_no_top.h5",
                    "No-top weights of the backbone, for the frozen and unfrozen modes.", flag_values=FLAGS)
flags.DEFINE_string("backbone", "mobilenet_v2", "Backbone of every mode.", flag_values=FLAGS)
flags.DEFINE_float("alpha", 1.0, "Width multiplier of mobilenet / mobilenet_v2.", flag_values=FLAGS)
flags.DEFINE_integer("image_size", 224, "Input size (the tutorial's InceptionV3 ran at 139).", flag_values=FLAGS)
flags.DEFINE_integer("epochs", 5, "Epochs of every mode.", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 32, "Global batch size (the tutorial's).", flag_values=FLAGS)
flags.DEFINE_float("frozen_lr", 1e-3, "Adam learning rate of the frozen mode (the tutorial's Adam default).",
                   flag_values=FLAGS)
flags.DEFINE_float("unfrozen_lr", 1e-4, "Adam learning rate of the unfrozen mode: lower than the head's, so the "
                   "pretrained features survive the first steps of a random head.", flag_values=FLAGS)
flags.DEFINE_float("scratch_lr", 1e-3, "Adam learning rate from scratch.", flag_values=FLAGS)
flags.DEFINE_string("augment", "none", "Augmentation preset of every mode (the tutorial's generator had none).",
                    flag_values=FLAGS)
flags.DEFINE_list("modes", ["frozen", "unfrozen", "scratch"], "Modes to train.", flag_values=FLAGS)
flags.DEFINE_list("seeds", ["42"], "Seeds: each mode trains once per seed; the table shows mean and spread.",
                  flag_values=FLAGS)
flags.DEFINE_string("json", "", "Write the figures to this file.", flag_values=FLAGS)


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
  history = bench.train_history(config, workdir)
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


def main(argv: list[str]) -> dict:
  """Measures, prints, writes --json; returns the figures."""
  bench.parse_flags(FLAGS, argv, __doc__)
  base = Config().replace(data_dir=FLAGS.data_dir, backbone=FLAGS.backbone, alpha=FLAGS.alpha,
                          weights=FLAGS.weights, image_size=FLAGS.image_size, batch_size=FLAGS.batch_size,
                          augment=FLAGS.augment, verbosity=-1)
  root = tempfile.mkdtemp(prefix="bench_modes_")
  figures = {"epochs": FLAGS.epochs, "image_size": FLAGS.image_size, "seeds": [int(s) for s in FLAGS.seeds],
             "modes": {}}
  for mode in FLAGS.modes:
    figures["modes"][mode] = [
        run_mode(mode_config(mode, base).replace(seed=int(seed)), os.path.join(root, f"{mode}_{seed}"))
        for seed in FLAGS.seeds]
    print(json.dumps({mode: figures["modes"][mode]}), flush=True)
  shutil.rmtree(root)  # The runs' workdirs: every figure is in `figures`.
  figures["load_average"] = os.getloadavg()[0]
  print(table(figures))
  bench.write_figures(figures, FLAGS.json)
  return figures


if __name__ == "__main__":
  bench.run(main)
