"""What the training command does with a parsed config: list layers, or train; user mistakes end in one line."""

import logging as std_logging

from absl import logging

from trainer import backbones, train, tuning
from trainer.config import Config
from trainer.errors import UserInputError, exit_on_user_error


def run(config: Config, workdir: str | None, list_layers: bool) -> None:
  logging.get_absl_handler().addFilter(_hide_library_info)
  with exit_on_user_error():
    if list_layers:
      _list_layers(config)
      return
    if not workdir:
      raise UserInputError("Pass --workdir=FOLDER: where the run keeps its checkpoints, logs, export and report.")
    if config.tune.tune:
      config = train.resolve(config)
      config = config.replace(**tuning.search(config, workdir, tuning.strategy_for_search(config)))
      if config.tune.tune_only:
        return
    metrics = train.train_and_evaluate(config, workdir)
    logging.info("Done: val_accuracy %.4f; model exported to %s", metrics["val_accuracy"] or float("nan"),
                 metrics["export_path"])


def _list_layers(config: Config) -> None:
  config = train.resolve(config)
  base = backbones.build(config.model.backbone, config.model.weights, config.data.image_size, config.model.alpha,
                         weights_fallback=True)
  print(backbones.describe_layers(base, config.model.unfreeze_from))


def _hide_library_info(record: std_logging.LogRecord) -> bool:
  """TensorFlow's and Keras' own INFO lines (saver timings, asset paths) are noise in a training log."""
  from_library = any(part in record.pathname for part in ("/tensorflow/", "/keras/", "/tf_keras/"))
  return record.levelno >= std_logging.WARNING or not from_library
