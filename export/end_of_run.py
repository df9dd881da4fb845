"""The training command's end-of-run action: the SavedModel of the run's last checkpoint (and its model.tflite with
--tflite), checked on the run's validation files, and found again when a finished run is rerun so that one
checkpoint is never exported twice. Registered in setup.cfg as the entry point `saved_model` of the group
`transfer_trainer.end_of_run`: the training commands (trainer.main, trainer.demo) find it there and hand it to the
training loop, and no module of the trainer imports this package: data flows from the trainer to the export, never
back.
"""

import os
from typing import TYPE_CHECKING

from absl import logging

from export import saved_model
from trainer.errors import UserInputError
from trainer.input import data
from trainer.runtime import workdir as workdir_lib

if TYPE_CHECKING:
  from trainer.loop.train import Run


class SavedModelExport:
  """Called by trainer.loop.finish on the chief: `find` an export of the run's latest checkpoint, else make one."""

  def find(self, run: "Run") -> str | None:
    """The version folder exported from the run's latest checkpoint, if any. By the checkpoint's name: a workdir
    spelled another way (a symlink, a relative path, a moved folder) holds the same checkpoints under another
    path."""
    checkpoint = os.path.basename(run.manager.latest_checkpoint or "")
    model_dir = os.path.join(run.run_dir.export, run.config.export.model_name)
    if not checkpoint or not os.path.isdir(model_dir):
      return None
    for version in sorted((v for v in os.listdir(model_dir) if v.isdigit()), key=int, reverse=True):
      metadata = os.path.join(model_dir, version, saved_model.METADATA_FILE)
      source = workdir_lib.read_json(metadata).get("source") if os.path.isfile(metadata) else None
      if source and os.path.basename(source) == checkpoint:
        return os.path.join(model_dir, version)
    return None

  def __call__(self, run: "Run") -> str:
    """Exports the run's model (the whole classifier at its last checkpoint). A failed export check never loses the
    training: the checkpoint stays and `python -m export.main` retries."""
    samples = data.sample_files(run.inputs.val, os.path.join(run.workdir, "cache", "samples"),
                                saved_model.PARITY_FILES)
    try:
      path = saved_model.export_saved_model(run.trainer.model, list(run.inputs.classes), run.config,
                                            run.run_dir.export, samples, source=run.manager.latest_checkpoint or "",
                                            inputs=run.inputs)
    except saved_model.ExportParityError as e:
      raise UserInputError(f"{e} Training is complete and kept in {run.run_dir.checkpoints}; retry the export "
                           f"with python -m export.main --workdir={run.workdir}.") from None
    logging.info("Exported the SavedModel to %s", path)
    return path
