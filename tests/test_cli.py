"""The command line as a user meets it: flags (and --flagfile) into the config, one-line errors, --list_layers."""

import subprocess
import sys

import pytest

from tests.conftest import REPO
from trainer import flags as trainer_flags
from trainer.config import Config, section_fields


def _trainer(*args, timeout=120):
  return subprocess.run([sys.executable, "-m", "trainer.main", *args], cwd=REPO, capture_output=True, text=True,
                        timeout=timeout)


@pytest.fixture
def parsed_flags():
  def parse(*args):
    trainer_flags.FLAGS.unparse_flags()
    trainer_flags.FLAGS(["trainer", *args])
    return trainer_flags.config_from_flags()
  yield parse
  trainer_flags.FLAGS.unparse_flags()


def test_every_config_field_is_a_flag_and_reaches_the_config(parsed_flags, tmp_path):
  assert parsed_flags() == Config()
  flagfile = tmp_path / "run.flags"
  flagfile.write_text("--backbone=vgg16\n--head_units=64\n--finetune_lr=3e-6\n--augment=classic\n")
  config = parsed_flags(f"--flagfile={flagfile}", "--head_units=32", "--strategy=mirrored", "--cache_features")
  assert (config.model.backbone, config.model.head_units, config.train.finetune_lr, config.train.augment) == \
      ("vgg16", 32, 3e-6, "classic")
  assert config.runtime.strategy == "mirrored" and config.train.cache_features is True
  assert parsed_flags("--verbosity=-1").runtime.verbosity == -1
  assert {field.name for _, field in section_fields()} <= set(trainer_flags.FLAGS)


def test_list_layers_from_a_flagfile_marks_the_default_unfreeze_point(tmp_path, mobilenet_025_weights):
  flagfile = tmp_path / "layers.flags"
  flagfile.write_text(f"--backbone=mobilenet\n--alpha=0.25\n--weights={mobilenet_025_weights}\n--image_size=32\n")
  result = _trainer(f"--flagfile={flagfile}", "--list_layers")
  assert result.returncode == 0, result.stderr[-2000:]
  marked = [line for line in result.stdout.splitlines() if "fine-tuning starts here" in line]
  assert len(marked) == 1 and " conv_dw_13 " in marked[0]


@pytest.mark.parametrize("args,message", [
    (["--data_dir=/no/such/folder"], "--data_dir=/no/such/folder: no such folder"),
    (["--backbone=resnet18"], "--backbone=resnet18 is not known"),
    (["--augment=heavy"], "--augment=heavy is not known"),
])
def test_user_mistakes_end_in_one_line_naming_the_flag(args, message, tmp_path, color_folder):
  result = _trainer(f"--data_dir={color_folder}", f"--workdir={tmp_path / 'run'}", "--weights=none", *args)
  assert result.returncode == 2
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and message in errors[0]
  assert "Traceback" not in result.stderr
