"""The trained model of a run, rebuilt from its workdir: the architecture from config.json, the weights from the
latest checkpoint. Export and evaluation start here."""

import dataclasses

import keras
import tensorflow as tf

from trainer import config_checks
from trainer.config import SOURCE_FLAGS, Config
from trainer.errors import UserInputError
from trainer.loop import checkpoints
from trainer.modeling import model as model_lib
from trainer.runtime import workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  config: Config
  classes: tuple[str, ...]
  model: keras.Model
  checkpoint: str


def restore(workdir: str, overrides: dict | None = None) -> TrainedModel:
  """Rebuilds the run's classifier (without downloading weights: the checkpoint holds all of them).

  overrides: config fields changed from config.json's (export settings, the data source, the batch size); a
  data source given here replaces the run's one.
  """
  # The flags given are checked before anything is read (an unknown --tflite_quantization is refused here, not
  # after the export).
  config_checks.validate(Config().replace(**(overrides or {})))
  if not workdir:
    raise UserInputError("Pass --workdir=FOLDER: the workdir of a trained run.")
  run = workdir_lib.RunDir(workdir)
  config = run.load_config()
  overrides = dict(overrides or {})
  if any(name in overrides for name in SOURCE_FLAGS):
    overrides = {**{name: "" for name in SOURCE_FLAGS}, **overrides}
  config = config.replace(**overrides)
  classes = tuple(run.load_run_facts().get("classes", ()))
  checkpoint = checkpoints.newest_readable(run.checkpoints)  # A corrupt newest one is skipped, in one line.
  if not classes or not checkpoint:
    raise UserInputError(f"--workdir={workdir} holds no trained checkpoint yet: train first "
                         f"(python -m trainer.main --workdir={workdir} ...).")
  model = model_lib.build_classifier(dataclasses.replace(config.model, weights="none"), len(classes),
                                     config.data.image_size, config.data.seed)
  # Only the model: the training checkpoint also holds the epoch counter and both optimizers.
  checkpoints.restore_matching(tf.train.Checkpoint(model=model), checkpoint)
  return TrainedModel(config, classes, model, checkpoint)
