"""What the training command does with a parsed config: list layers, or train; user mistakes end in one line."""

from typing import Collection

from trainer import config_checks
from trainer.config import Config
from trainer.errors import UserInputError, exit_on_user_error
from trainer.loop import finish, train, tuning
from trainer.modeling import model as model_lib
from trainer.reporting import progress
from trainer.runtime import runtime as runtime_lib
from trainer.runtime import workdir as workdir_lib


def run(config: Config, workdir: str | None, list_layers: bool, given: Collection[str] = (),
        exporter: finish.Exporter | None = None) -> None:
  """given: the config fields the user set (trainer.command.flags.given_flags), for checks of explicit choices.
  exporter: the end-of-run export the command hands to the loop (export.end_of_run.SavedModelExport)."""
  progress.hide_library_info()
  with exit_on_user_error():
    config_checks.validate(config, given)
    config = config_checks.absolute_paths(config)
    if list_layers:
      _list_layers(config)
      return
    if not workdir:
      raise UserInputError("Pass --workdir=FOLDER: where the run keeps its checkpoints, logs, export and report.")
    with workdir_lib.lock(workdir):
      # Built once, before any other TensorFlow work (a multi-worker strategy must exist first): the resolved
      # config, strategy, precision, batch plan, this worker's share, the chief, where it writes.
      runtime = runtime_lib.build(config, workdir)
      inputs = None
      if config.tune.tune:
        # The search and the training share one load of the data (and, through the run's cache, one extraction);
        # a multi-worker chief searches on the whole training split, not on its share.
        if runtime.shard.count == 1:
          inputs = train.load_inputs(runtime, workdir)
        best = tuning.search(runtime.config, workdir, tuning.strategy_for_search(runtime.config, runtime.strategy),
                             inputs=inputs)
        runtime = runtime.with_config(runtime.config.replace(**best))
        if config.tune.tune_only:
          return
      metrics = train.train_and_evaluate(runtime, workdir, inputs, exporter)
    # Printed, not logged: the one line --verbosity=-1 keeps besides warnings and errors.
    print(done_line(metrics), flush=True)


def done_line(metrics: dict) -> str:
  """The run's last line: its validation accuracy and where its export is (or that another worker exports)."""
  accuracy = metrics.get("val_accuracy")
  accuracy = "not measured (no validation images)" if accuracy is None else f"{accuracy:.4f}"
  where = (f"model exported to {metrics['export_path']}" if metrics.get("export_path")
           else "the chief worker exports the model")
  return f"Done: val_accuracy {accuracy}; {where}"


def _list_layers(config: Config) -> None:
  print(model_lib.describe_layers(runtime_lib.resolve(config)))
