"""python -m bench.frozen_phase: frozen-phase seconds per epoch and accuracy, end to end against --cache_features.

Trains the frozen phase only (no fine-tuning) twice on the same data with the same seed: once end to end (every
epoch runs the frozen backbone on every image), once on cached features (the backbone runs in the first epoch,
--feature_views times per image with augmentation). Prints, for each: the first epoch's seconds, the mean seconds of
the later epochs, and the final val accuracy; then the speed-up of the later epochs and the accuracy difference.
"""

import json
import os
import tempfile

from absl import flags

import bench

from trainer.config import Config

FLAGS = flags.FlagValues()
flags.DEFINE_string("data_dir", "../shared/datasets/hymenoptera", "Dataset (train/ + val/, or class folders).",
                    flag_values=FLAGS)
bench.define_backbone_flags(FLAGS)
flags.DEFINE_integer("image_size", 224, "Input size.", flag_values=FLAGS)
flags.DEFINE_integer("frozen_epochs", 5, "Frozen epochs of each run.", flag_values=FLAGS)
flags.DEFINE_string("augment", "light", "Augmentation preset of both runs.", flag_values=FLAGS)
flags.DEFINE_integer("feature_views", 3, "Augmented views per image of the cached run.", flag_values=FLAGS)
flags.DEFINE_string("json", "", "Write the figures to this file.", flag_values=FLAGS)


def _frozen_run(config: Config, workdir: str) -> dict:
  history = bench.train_history(config, workdir)
  later = [record["seconds"] for record in history[1:]]
  return {"first_epoch_seconds": history[0]["seconds"], "later_epoch_seconds": sum(later) / len(later),
          "val_accuracy": history[-1]["val_accuracy"]}


def main(argv: list[str]) -> dict:
  """Measures, prints, writes --json; returns the figures."""
  bench.parse_flags(FLAGS, argv, __doc__)
  config = Config().replace(data_dir=FLAGS.data_dir, backbone=FLAGS.backbone, alpha=FLAGS.alpha,
                            weights=FLAGS.weights, image_size=FLAGS.image_size, frozen_epochs=FLAGS.frozen_epochs,
                            finetune_epochs=0, augment=FLAGS.augment, feature_views=FLAGS.feature_views,
                            verbosity=-1)
  with tempfile.TemporaryDirectory(prefix="bench_frozen_") as root:
    figures = {name: _frozen_run(config.replace(cache_features=cached), os.path.join(root, name))
               for name, cached in (("end_to_end", False), ("cache_features", True))}
  figures["later_epoch_speedup"] = (figures["end_to_end"]["later_epoch_seconds"]
                                    / figures["cache_features"]["later_epoch_seconds"])
  figures["val_accuracy_difference"] = (figures["cache_features"]["val_accuracy"]
                                        - figures["end_to_end"]["val_accuracy"])
  figures["load_average"] = os.getloadavg()[0]
  print(json.dumps(figures, indent=2))
  bench.write_figures(figures, FLAGS.json)
  return figures


if __name__ == "__main__":
  bench.run(main)
