"""What makes a workdir's checkpoints the same run: the classes, the resolved precision and the epochs already
trained on are checked before anything trains, every numeric flag is checked in one place, paths are stored
absolute, and a finished run is not exported again."""

import json
import os

import pytest
from conftest import tiny_run, write_color_dataset, write_image

from export import end_of_run
from trainer import config_checks
from trainer.command import cli
from trainer.config import Config
from trainer.errors import UserInputError
from trainer.loop import train
from trainer.runtime.workdir import RunDir


def test_a_renamed_class_folder_is_refused_with_the_old_and_new_classes(tmp_path, random_mobilenet_025_weights):
  """The reported bug: renaming dark/ to zdark/ reordered the labels, and the resumed run trained on swapped ones."""
  data_dir = write_color_dataset(tmp_path / "colors", 4)
  config = tiny_run(random_mobilenet_025_weights, data_dir=str(data_dir), finetune_epochs=0, augment="none")
  run = train.setup(config, str(tmp_path / "run"))
  train.train_epochs(run)
  run.tensorboard.close()
  os.rename(data_dir / "blue", data_dir / "zblue")
  with pytest.raises(UserInputError, match=r"\['blue', 'green', 'red'\].*\['green', 'red', 'zblue'\]"):
    train.setup(config.replace(finetune_epochs=1), str(tmp_path / "run"))


def test_changed_files_and_a_changed_model_are_refused_before_restoring(tmp_path, random_mobilenet_025_weights):
  """Resuming on other files trained the old weights on the new files and rewrote config.json's counts; changing
  --backbone or --head_units ended in a 194-line restore traceback. Each is one line now, before any restore."""
  data_dir = write_color_dataset(tmp_path / "colors", 4)
  config = tiny_run(random_mobilenet_025_weights, data_dir=str(data_dir), finetune_epochs=0)
  workdir = str(tmp_path / "run")
  run = train.setup(config, workdir)
  train.train_epochs(run)
  run.tensorboard.close()
  facts = RunDir(workdir).load_run_facts()

  for changed in ({"head_units": 16}, {"backbone": "mobilenet_v2"}):
    with pytest.raises(UserInputError, match=f"different run.*--{next(iter(changed))}"):
      train.setup(config.replace(**changed), workdir)
  write_image(data_dir / "red" / "red_0.jpg", (0, 0, 255))  # Same name, other pixels (the class of blue).
  write_image(data_dir / "green" / "green_new.jpg", (0, 255, 0))
  (data_dir / "blue" / "blue_3.jpg").unlink()
  with pytest.raises(UserInputError, match="other data files: 1 added, 1 removed, 1 changed.*--accept_changed_data"):
    train.setup(config.replace(finetune_epochs=1), workdir)
  assert RunDir(workdir).load_run_facts() == facts  # Refused before config.json was rewritten.

  run = train.setup(config.replace(finetune_epochs=1, accept_changed_data=True), workdir)
  run.tensorboard.close()
  recorded = RunDir(workdir).load_run_facts()
  assert {kind: recorded["data_changes"][0]["changes"][kind] for kind in ("added", "removed", "changed")} == \
      {"added": 1, "removed": 1, "changed": 1}
  assert recorded["data_identity"] != facts["data_identity"]
  # The new files are now the run's; a cache that moved to disk keeps the run's whole-share shuffle.
  again = train.setup(config.replace(finetune_epochs=1, cache="disk"), workdir)
  again.tensorboard.close()
  assert facts["epoch_order"] == again.inputs.train.order == "whole" and again.inputs.train.cache.mode == "none"


def _workdir_with_checkpoints(tmp_path, **config_values) -> RunDir:
  run_dir = RunDir(str(tmp_path))
  run_dir.save_config(Config().replace(data_dir="photos", **config_values),
                      {"classes": ["cats", "dogs"], "dtype_policy": "mixed_float16"})
  (tmp_path / "checkpoints").mkdir()
  (tmp_path / "checkpoints" / "ckpt-1.index").write_bytes(b"")
  return run_dir


def test_an_added_class_and_another_precision_are_refused_in_one_line(tmp_path):
  run_dir = _workdir_with_checkpoints(tmp_path)
  with pytest.raises(UserInputError, match=r"\['cats', 'dogs'\], and the data now has \['birds', 'cats', 'dogs'\]"):
    run_dir.check_run_facts(("birds", "cats", "dogs"), "mixed_float16")
  with pytest.raises(UserInputError, match="mixed_float16.*resolves --mixed_precision to float32.*"
                                           "--mixed_precision=float16"):
    run_dir.check_run_facts(("cats", "dogs"), "float32")
  run_dir.check_run_facts(("cats", "dogs"), "mixed_float16")  # The same run continues.


@pytest.mark.parametrize("old,new,started,refused", [
    (1, 2, 2, True),   # Epoch 2 trained as fine-tune; it would become frozen.
    (3, 1, 2, True),   # Epoch 2 trained frozen; it would become fine-tune.
    (3, 5, 3, False),  # Still frozen throughout: more frozen epochs.
    (3, 2, 2, False),  # Fewer frozen epochs, none of them trained yet past the new end.
    (1, 1, 2, False),
])
def test_frozen_epochs_change_only_where_no_trained_epoch_changes_phase(tmp_path, old, new, started, refused):
  run_dir = _workdir_with_checkpoints(tmp_path, frozen_epochs=old)
  config = Config().replace(data_dir="photos", frozen_epochs=new)
  if refused:
    with pytest.raises(UserInputError, match=f"--frozen_epochs={new}: this run has started epoch {started}"):
      run_dir.check_phase_change(config, started)
  else:
    run_dir.check_phase_change(config, started)


@pytest.mark.parametrize("values,flag", [
    ({"frozen_epochs": -1}, "--frozen_epochs=-1"), ({"finetune_epochs": -2}, "--finetune_epochs=-2"),
    ({"frozen_epochs": 0, "finetune_epochs": 0}, "--frozen_epochs=0 and --finetune_epochs=0"),
    ({"frozen_lr": -1.0}, "--frozen_lr=-1.0"), ({"finetune_lr": 0.0}, "--finetune_lr=0.0"),
    ({"dropout": 1.5}, r"--dropout=1.5.*\[0, 1\)"), ({"head_units": -5}, "--head_units=-5"),
    ({"image_size": -5}, "--image_size=-5"), ({"image_size": 8}, "--image_size=8: must be >= 32"),
    ({"batch_size": 0}, "--batch_size=0"), ({"cache": "ram"}, "--cache=ram"),
    ({"memory_budget": "lots"}, "--memory_budget="), ({"batchnorm": "on"}, "--batchnorm=on"),
    ({"finetune_schedule": "linear"}, "--finetune_schedule=linear"),
])
def test_every_numeric_flag_is_checked_before_anything_is_built(values, flag):
  with pytest.raises(UserInputError, match=flag):
    config_checks.validate(Config().replace(**values))


def test_memory_budget_reads_units():
  assert config_checks.memory_budget("4GB") == 4 << 30
  assert config_checks.memory_budget("512 mb") == 512 << 20
  assert config_checks.memory_budget("1000") == 1000
  assert config_checks.memory_budget("") is None


def test_paths_are_stored_absolute_so_a_resume_by_another_path_is_the_same_run(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  relative = config_checks.absolute_paths(Config().replace(data_dir="photos/../photos", weights="w.h5"))
  absolute = config_checks.absolute_paths(Config().replace(data_dir=str(tmp_path / "photos"),
                                                           weights=str(tmp_path / "w.h5")))
  assert relative.data.data_dir == str(tmp_path / "photos") and relative.model.weights == str(tmp_path / "w.h5")
  assert relative.identity_hash() == absolute.identity_hash()
  assert config_checks.absolute_paths(Config()).model.weights == "imagenet"


def test_the_done_line_never_prints_nan_and_names_the_export():
  assert cli.done_line({"val_accuracy": 0.9, "export_path": "/e/1"}) == ("Done: val_accuracy 0.9000; model "
                                                                          "exported to /e/1")
  assert "nan" not in cli.done_line({"val_accuracy": None, "export_path": "/e/1"})
  assert "chief" in cli.done_line({"val_accuracy": 0.5, "export_path": None})


def test_rerunning_a_finished_run_does_not_export_it_again(trained_workdir, caplog):
  config = Config.from_dict(json.loads((trained_workdir / "config.json").read_text()))
  versions = sorted(os.listdir(trained_workdir / "export" / "classifier"))
  metrics = train.train_and_evaluate(config, str(trained_workdir), exporter=end_of_run.SavedModelExport())
  assert sorted(os.listdir(trained_workdir / "export" / "classifier")) == versions
  assert "The run is complete" in caplog.text and metrics["export_path"]


def test_a_finished_run_is_finished_idempotently_whatever_its_workdir_is_called(trained_workdir, tmp_path):
  """Killed between the export and the report, every rerun said "nothing to do" and metrics.json kept
  export_path null for good; a workdir spelled another way (a symlink, a moved folder) was exported again."""
  config = Config.from_dict(json.loads((trained_workdir / "config.json").read_text()))
  versions = sorted(os.listdir(trained_workdir / "export" / "classifier"))
  link = tmp_path / "same_run"
  link.symlink_to(trained_workdir)
  metrics_file = trained_workdir / "report" / "metrics.json"
  killed = {**json.loads(metrics_file.read_text()), "export_path": None}
  metrics_file.write_text(json.dumps(killed))
  (trained_workdir / "report" / "curves.png").unlink()

  metrics = train.train_and_evaluate(config, str(link), exporter=end_of_run.SavedModelExport())
  assert sorted(os.listdir(trained_workdir / "export" / "classifier")) == versions  # Not exported again.
  assert (trained_workdir / "report" / "curves.png").is_file()
  assert metrics["export_path"] and json.loads(metrics_file.read_text())["export_path"] == metrics["export_path"]
  assert os.path.basename(metrics["export_path"]) == versions[-1]
