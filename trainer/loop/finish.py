"""The end of a run, on every worker: the last validation, the report (chief), the end-of-run export the command
handed in (chief), and a rerun of a finished run that has nothing left to do. Finishing is idempotent: each
artifact is checked and made if missing, and an export is never made twice for one checkpoint.
"""

import importlib.metadata
import os
from typing import TYPE_CHECKING, Protocol

from absl import logging

from trainer.errors import UserInputError
from trainer.modeling import model as model_lib
from trainer.reporting import report_files, report_page, top_losses
from trainer.runtime import distribute
from trainer.runtime import workdir as workdir_lib

if TYPE_CHECKING:
  from trainer.loop.train import Run


class Exporter(Protocol):
  """The end-of-run export a command hands to the loop (export.end_of_run.SavedModelExport): the loop knows no
  export format, only that one exists for a checkpoint or must be made."""

  def find(self, run: "Run") -> str | None:
    """Where the run's latest checkpoint is already exported, or None."""

  def __call__(self, run: "Run") -> str:
    """Exports the run's model at its latest checkpoint; returns where."""


# The entry-point group where a package registers the training commands' end-of-run export (setup.cfg: the export
# package's SavedModelExport). The trainer finds it by name and never imports the package that provides it.
EXPORTERS = "transfer_trainer.end_of_run"
SAVED_MODEL = "saved_model"


def installed_exporter(name: str = SAVED_MODEL) -> Exporter:
  """The end-of-run export registered as `name` in the EXPORTERS group of the installed packages."""
  found = [point for point in importlib.metadata.entry_points(group=EXPORTERS) if point.name == name]
  if not found:
    raise UserInputError(f"No end-of-run export {name!r} is installed (entry point group {EXPORTERS}): install "
                         "the project into its environment, `make setup` or `pip install -e .` in the checkout.")
  return found[0].load()()


def finished_export(run: "Run", exporter: Exporter | None) -> dict | None:
  """A rerun of a finished run whose every artifact exists (the export of the last checkpoint, the metrics naming
  it, the report files and page): nothing is trained or exported. With one missing (a run killed between its
  export and its report) this returns None and `finalize` makes what is missing, reusing the export."""
  if int(run.trainer.epoch) < run.total_epochs or not run.manager.latest_checkpoint:
    return None
  # Every worker of a cluster reads the same files of the shared workdir here, before any collective of this start,
  # so all take the same path: a chief lost after its export is not exported twice when the job restarts.
  exported = exporter.find(run) if exporter else None
  reports = [run.run_dir.metrics_file, report_page.page_file(run.workdir),
             *(os.path.join(run.run_dir.report, name) for name in report_files.REPORT_FILES)]
  if (exporter and not exported) or not all(os.path.isfile(path) for path in reports):
    return None
  metrics = workdir_lib.read_json(run.run_dir.metrics_file)
  if metrics.get("export_path") != exported:  # Killed before the metrics named it, or the workdir moved.
    metrics["export_path"] = exported
    if run.chief:
      run.run_dir.save_metrics(metrics)
      report_page.write_page(run.workdir)
  logging.warning("The run is complete (%d epochs) and its export of %s is at %s: nothing to do. Raise "
                  "--finetune_epochs to train more, or run python -m export.main --workdir=%s to export again.",
                  run.total_epochs, os.path.basename(run.manager.latest_checkpoint), exported or "(none made)",
                  run.workdir)
  run.tensorboard.close()
  distribute.remove_worker_files(run.workdir, run.strategy)
  return metrics


def finalize(run: "Run", val_metrics: dict, exporter: Exporter | None, phase_choice: dict | None = None) -> dict:
  """Writes the report from the final model's validation (`val_metrics`) and, with an `exporter`, exports, both on
  the chief. phase_choice: which phase's weights the run kept (trainer.loop.phase_choice), for metrics.json."""
  run.trainer.train_on_features(None)  # The report's figures and the export are of the whole classifier.
  metrics = report_files.summarize(run.history, list(run.inputs.classes), None,
                                [phase for phase, _ in model_lib.phases(run.config)])
  if phase_choice:
    metrics["phase_choice"] = phase_choice
    # The final model's own validation: the frozen phase's weights, when they were kept.
    metrics["val_accuracy"], metrics["val_loss"] = val_metrics["accuracy"], val_metrics["loss"]
  metrics["skipped_files"] = [{"path": path, "reason": why} for path, why in sorted(run.inputs.skipped.items())]
  if run.chief:  # Before the writers close: the grid goes to TensorBoard too.
    _report_top_losses(run)
  run.tensorboard.close()
  if run.chief:
    # The report first: a failed export check must not lose it either.
    run.run_dir.save_metrics(metrics)
    report_files.write_reports(run.run_dir.report, run.history, val_metrics["confusion_matrix"], run.inputs.classes)
    report_page.write_page(run.workdir)
    # A finished run rerun to make a missing report keeps its export (exports are never made twice).
    if exporter:
      metrics["export_path"] = exporter.find(run) or exporter(run)
      run.run_dir.save_metrics(metrics)
      report_page.write_page(run.workdir)  # Again, with the export's link.
  distribute.wait_for_all_workers(run.strategy)
  distribute.remove_worker_files(run.workdir, run.strategy)
  return metrics


def _report_top_losses(run: "Run") -> None:
  """The validation images of the chief's share the final model gets most wrong, for the report and TensorBoard:
  one forward pass over them."""
  top_losses.report_top_losses(run.trainer.model, run.inputs.val, run.inputs.classes, run.config.data.batch_size,
                                run.run_dir.report, run.tensorboard, int(run.trainer.epoch), run.shard.count)
