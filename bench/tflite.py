"""python -m bench.tflite: size, validation accuracy and speed of model.tflite in every quantization.

python -m bench.tflite --data_dir=DIR [--image_size=160] [--frozen_epochs=5] [--finetune_epochs=1] [--json=FILE]
python -m bench.tflite --run=WORKDIR [--json=FILE]

Trains one run (train.train_and_evaluate with the given backbone, weights and epochs; its export is the SavedModel
whose float32 model the files are compared with), or takes the trained run of --run (its own data and settings),
then writes model.tflite of the trained model in each
quantization through export.tflite.write_tflite, as an export does: int8 calibrated on the training split, every
file with its metadata and evaluated on the whole validation split through LiteRT's interpreter, one image a call.
Prints and writes {"rows": [{"quantization", "bytes", "val_accuracy", "agreement_with_saved_model",
"ms_per_image"}, ...], "saved_model_val_accuracy"} plus the settings.
"""

import json
import os
import tempfile

from absl import flags

import bench
from export import tflite
from trainer.config import TFLITE_QUANTIZATIONS, Config
from trainer.input import data
from trainer.loop import restore, train
from trainer.runtime import runtime

FLAGS = flags.FlagValues()
flags.DEFINE_string("data_dir", "../shared/datasets/hymenoptera", "Dataset (train/ + val/, or class folders).",
                    flag_values=FLAGS)
bench.define_backbone_flags(FLAGS)
flags.DEFINE_integer("image_size", 160, "Input size (smaller than the backbone's 224: two CPU cores).",
                     flag_values=FLAGS)
flags.DEFINE_integer("frozen_epochs", 5, "Epochs of the frozen phase.", flag_values=FLAGS)
flags.DEFINE_integer("finetune_epochs", 1, "Epochs of the fine-tune phase.", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 32, "Batch size of training.", flag_values=FLAGS)
flags.DEFINE_float("validation_split", 0.2, "Held-out fraction when the dataset has no val/ folder.",
                   flag_values=FLAGS)
flags.DEFINE_list("quantizations", list(TFLITE_QUANTIZATIONS), "Quantizations to write.", flag_values=FLAGS)
flags.DEFINE_string("workdir", "", "Folder of the run and the files (default: a new temporary folder).",
                    flag_values=FLAGS)
flags.DEFINE_string("run", "", "Workdir of a trained run to measure instead of training one (the training flags "
                    "are then ignored).", flag_values=FLAGS)
flags.DEFINE_string("json", "", "Write the figures to this file.", flag_values=FLAGS)


def main(argv: list[str]) -> dict:
  """Trains, writes each quantization, prints and writes --json; returns the figures."""
  bench.parse_flags(FLAGS, argv, __doc__)
  workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="bench_tflite_")
  run = FLAGS.run or os.path.join(workdir, "run")
  if not FLAGS.run:
    train.train_and_evaluate(runtime.resolve(Config().replace(
        data_dir=os.path.abspath(FLAGS.data_dir), backbone=FLAGS.backbone, alpha=FLAGS.alpha,
        weights=os.path.abspath(FLAGS.weights), image_size=FLAGS.image_size, frozen_epochs=FLAGS.frozen_epochs,
        finetune_epochs=FLAGS.finetune_epochs, batch_size=FLAGS.batch_size,
        validation_split=FLAGS.validation_split, verbosity=-1)), run)
  trained = restore.restore(run)
  config = trained.config
  inputs = data.load(config.data, config.data.image_size, os.path.join(run, "cache"))
  rows, reference = [], None
  for quantization in FLAGS.quantizations:
    path = os.path.join(workdir, f"{quantization}.tflite")
    record = tflite.write_tflite(trained.model, trained.classes, config.replace(tflite_quantization=quantization),
                                 path, inputs)
    evaluation = record["evaluation"]
    reference = evaluation["saved_model_val_accuracy"]
    rows.append({"quantization": quantization, "bytes": record["bytes"], "val_accuracy": evaluation["val_accuracy"],
                 "agreement_with_saved_model": evaluation["agreement_with_saved_model"],
                 "ms_per_image": evaluation["ms_per_image"], "max_abs_diff": evaluation["max_abs_diff"]})
  figures = {"rows": rows, "saved_model_val_accuracy": reference, "validation_images": len(inputs.val.labels),
             "settings": {"data_dir": config.data.data_dir, "backbone": config.model.backbone,
                          "alpha": config.model.alpha, "image_size": config.data.image_size,
                          "frozen_epochs": config.train.frozen_epochs, "finetune_epochs": config.train.finetune_epochs,
                          "calibration_images": tflite.CALIBRATION_IMAGES},
             "load_average": os.getloadavg()[0]}
  print(json.dumps(figures, indent=2))
  bench.write_figures(figures, FLAGS.json)
  return figures


if __name__ == "__main__":
  bench.run(main)
