"""The trained model of a run, rebuilt from its workdir: the architecture from config.json, the weights from the
latest checkpoint. Export and evaluation start here."""

import dataclasses
import json

import keras
import tensorflow as tf

from trainer import model as model_lib
from trainer import workdir as workdir_lib
from trainer.config import Config
from trainer.errors import UserInputError


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  config: Config
  classes: tuple[str, ...]
  model: keras.Model
  checkpoint: str


def restore(workdir: str) -> TrainedModel:
  """Rebuilds the run's classifier (without downloading weights: the checkpoint holds all of them)."""
  run = workdir_lib.RunDir(workdir)
  config = run.load_config()
  with open(run.config_file, encoding="utf-8") as f:
    classes = tuple(json.load(f).get("run", {}).get("classes", ()))
  checkpoint = tf.train.latest_checkpoint(run.checkpoints)
  if not classes or not checkpoint:
    raise UserInputError(f"--workdir={workdir} holds no trained checkpoint yet: train first "
                         f"(python -m trainer.main --workdir={workdir} ...).")
  model = model_lib.build_classifier(dataclasses.replace(config.model, weights="none"), len(classes),
                                     config.data.image_size, config.data.seed)
  # Only the model: the training checkpoint also holds the epoch counter and both optimizers.
  tf.train.Checkpoint(model=model).restore(checkpoint).expect_partial().assert_existing_objects_matched()
  return TrainedModel(config, classes, model, checkpoint)
