"""python -m export.main --workdir=DIR [--version=N] [--top_k=K] [--tflite]: export a trained run again.

The model is rebuilt from the workdir's config.json and its latest checkpoint, and exported by the same function
training ends with, checked on the run's validation files (with --tflite, model.tflite is calibrated on its training
split and judged on its whole validation split). Export settings (--model_name, --top_k, --tflite,
--tflite_quantization, --tflite_max_accuracy_drop) and the data source (--data_dir, --csv, --tfds, --tfds_data_dir:
where the run's files are now) may be given again; everything else comes from config.json. A failed check ends in
one line (exit 2), the unpublished export left beside the versions for inspection.
"""

import os

from absl import app, flags

from trainer.command import flags as trainer_flags
from trainer.command import usage
from trainer.config import DATA_SOURCE_FIELDS, ExportConfig
from trainer.errors import UserInputError, exit_on_user_error
from trainer.runtime import workdir as workdir_lib

flags.DEFINE_integer("version", None, "Version folder to write (never overwritten); default: one more than the "
                     "highest existing version.")

_OVERRIDABLE = tuple(ExportConfig.__dataclass_fields__) + DATA_SOURCE_FIELDS


def export_run(workdir: str, overrides: dict | None = None, version: int | None = None) -> str:
  """Exports the latest checkpoint of `workdir` with config.json's settings changed by `overrides` (see
  `trainer.loop.restore.restore`); returns the version folder."""
  # Imported here, once the flags are parsed: --help answers without loading TensorFlow.
  from export import saved_model
  from trainer.input import data
  from trainer.loop import restore
  trained = restore.restore(workdir, overrides)
  config = trained.config
  inputs = data.load(config.data, config.data.image_size, os.path.join(workdir, "cache"))
  if tuple(inputs.classes) != trained.classes:
    raise UserInputError(f"The data source now has the classes {list(inputs.classes)}, but the run was trained "
                         f"on {list(trained.classes)}. Pass the run's data with --data_dir (or --csv, --tfds).")
  samples = data.sample_files(inputs.val, os.path.join(workdir, "cache", "samples"), saved_model.PARITY_FILES)
  return saved_model.export_saved_model(trained.model, trained.classes, config, workdir_lib.RunDir(workdir).export,
                                        samples, version=version, source=trained.checkpoint, inputs=inputs)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  from export import saved_model
  from trainer.reporting import progress
  progress.hide_library_info()
  given = trainer_flags.FLAGS
  with exit_on_user_error():
    if not given.workdir or not os.path.isdir(given.workdir):
      raise UserInputError(f"--workdir={given.workdir or ''} is not a folder: pass the workdir of a trained run.")
    with workdir_lib.lock(given.workdir):  # A run still training there would export into the same folder.
      try:
        print(export_run(given.workdir, trainer_flags.overrides(_OVERRIDABLE), given.version))
      except saved_model.ExportParityError as e:  # Names the numbers and the flag that accepts them.
        raise UserInputError(str(e)) from None


def run_script():
  usage.run(main, __doc__, {"export": ["workdir", "version", *ExportConfig.__dataclass_fields__],
                            "data (where the run's validation files are now)": list(DATA_SOURCE_FIELDS)})


if __name__ == "__main__":
  run_script()
