"""python -m trainer.demo [--workdir=DIR] [--weights=imagenet|none|FILE.h5]: the whole product offline, on a drawn dataset, in a few minutes.

Draws the dataset (DIR/data), trains, exports, and classifies one held-out image through `saved_model_cli run`, as
a model server would receive it. With ImageNet weights (downloaded, cached, or a local file) it does transfer
learning: a frozen phase, then fine-tuning. Without them it trains a MobileNet from scratch on the shapes, which
they are simple enough for. Each kind of run has its own folder, DIR/run_<weights> (run_scratch, run_imagenet,
run_<file name>), so demos with and without weights sit side by side.
"""

import json
import os
import subprocess
import sys

import numpy as np

from trainer.command import usage

# The trainer's own --workdir and --weights (imagenet, none, or a local MobileNet alpha 0.25 .h5 file such as
# ../shared/weights/mobilenet_2_5_224_tf_no_top.h5): one definition of each flag per process.
from trainer.command.flags import FLAGS
from trainer.config import Config
from trainer.errors import UserInputError, exit_on_user_error
from trainer.input import demo_data

DEFAULT_WORKDIR = "runs/demo"

PER_CLASS = 200
# Transfer learning: the small ImageNet MobileNet, a frozen phase on cached features, then its top blocks.
TRANSFER = dict(backbone="mobilenet", alpha=0.25, image_size=128, frozen_epochs=6, finetune_epochs=3,
                frozen_lr=3e-3, finetune_lr=1e-4, unfreeze_from="conv_dw_11", augment="light")
# From scratch: a full-width MobileNet at 64 px learns the shapes in fewer epochs than a narrow one (alpha 0.25
# and 0.5 were slower per accuracy reached; see BUILD_NOTES.md), and 64 px keeps its epochs at seconds.
SCRATCH = dict(backbone="mobilenet", alpha=1.0, weights="none", image_size=64, frozen_epochs=20, finetune_epochs=0,
               frozen_lr=2e-3, augment="light", head_units=64)


def available_weights(weights: str) -> str:
  """`weights`, or none when they are ImageNet's and Keras can neither download nor find them in its cache."""
  if weights != "imagenet":
    return weights
  from trainer.modeling import backbones  # Imported when needed: --help answers without loading TensorFlow.
  try:
    backbones.build(TRANSFER["backbone"], "imagenet", TRANSFER["image_size"], TRANSFER["alpha"])
  except UserInputError:
    print("No ImageNet weights (offline?): the demo trains a MobileNet from scratch on its drawn shapes instead.",
          flush=True)
    return "none"
  return weights


def run_name(weights: str) -> str:
  if weights == "none":
    return "run_scratch"
  return "run_imagenet" if weights == "imagenet" else "run_" + os.path.splitext(os.path.basename(weights))[0]


def demo(workdir: str, weights: str) -> None:
  data_dir = os.path.join(workdir, "data")
  if not os.path.isdir(data_dir):
    demo_data.draw(data_dir, per_class=PER_CLASS)
  weights = available_weights(weights)
  run_dir = os.path.join(workdir, run_name(weights))
  settings = SCRATCH if weights == "none" else {**TRANSFER, "weights": weights}
  config = Config().replace(data_dir=data_dir, **settings)
  from trainer.command import cli
  from trainer.loop import finish
  with exit_on_user_error():
    exporter = finish.installed_exporter()
  cli.run(config, run_dir, list_layers=False, exporter=exporter)

  export_root = os.path.join(run_dir, "export", config.export.model_name)
  export_dir = os.path.join(export_root, max(os.listdir(export_root), key=lambda v: int(v) if v.isdigit() else -1))
  held_out = os.path.join(workdir, "held_out_triangle.jpg")
  demo_data._draw_one("triangles", 128, np.random.default_rng(12345)).save(held_out)
  request = os.path.join(workdir, "request.npy")
  with open(held_out, "rb") as f:
    np.save(request, np.array([f.read()], dtype=object))
  saved_model_cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
  command = [saved_model_cli, "run", "--dir", export_dir, "--tag_set", "serve",
             "--signature_def", "serving_default", "--inputs", f"image_bytes={request}"]
  print("$", " ".join(command), flush=True)
  output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
  print(output)
  label = output.split("Result for output key classes:")[1].split("'")[1]
  metrics_file = os.path.join(run_dir, "report", "metrics.json")
  with open(metrics_file, encoding="utf-8") as f:
    val_accuracy = json.load(f)["val_accuracy"]
  print(f"saved_model_cli classified {held_out} (a triangle) as: {label}. The run's val_accuracy: "
        f"{val_accuracy:.3f} ({len(demo_data.CLASSES)} classes, chance {1 / len(demo_data.CLASSES):.2f}; "
        f"{metrics_file}).")


def main(argv):
  del argv
  demo(FLAGS.workdir or DEFAULT_WORKDIR, FLAGS.weights)


def run_script():
  usage.run(main, __doc__, {"demo": ["workdir", "weights"]})


if __name__ == "__main__":
  run_script()
