"""python -m trainer.demo --workdir=DIR: the whole product offline, on a drawn dataset, in a few minutes.

Draws the dataset, trains both phases (ImageNet weights when they can be downloaded, else random init), exports,
and classifies one held-out image through `saved_model_cli run`, as a model server would receive it.
"""

import json
import os
import subprocess
import sys

import numpy as np
from absl import app, flags

from trainer import cli, demo_data
from trainer.config import Config

flags.DEFINE_string("workdir", "runs/demo", "Where the demo writes its dataset and its run.")
flags.DEFINE_string("weights", "imagenet", "imagenet (random init when it cannot be downloaded) or a local "
                    "MobileNet alpha 0.25 .h5 file, e.g. ../shared/weights/mobilenet_2_5_224_tf_no_top.h5.")
FLAGS = flags.FLAGS


def demo(workdir: str, weights: str) -> None:
  data_dir = os.path.join(workdir, "data")
  if not os.path.isdir(data_dir):
    demo_data.draw(data_dir)
  run_dir = os.path.join(workdir, "run")
  config = Config().replace(data_dir=data_dir, backbone="mobilenet", alpha=0.25, weights=weights,
                            weights_fallback=True, image_size=128, frozen_epochs=6, finetune_epochs=3,
                            frozen_lr=3e-3, finetune_lr=1e-4, unfreeze_from="conv_dw_11", augment="light")
  cli.run(config, run_dir, list_layers=False)

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
  with open(os.path.join(run_dir, "report", "metrics.json"), encoding="utf-8") as f:
    val_accuracy = json.load(f)["val_accuracy"]
  print(f"saved_model_cli classified {held_out} (a triangle) as: {label}. The run's val_accuracy: "
        f"{val_accuracy:.3f} ({len(demo_data.CLASSES)} classes, chance {1 / len(demo_data.CLASSES):.2f}).")


def main(argv):
  del argv
  demo(FLAGS.workdir, FLAGS.weights)


if __name__ == "__main__":
  app.run(main)
