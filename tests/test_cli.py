"""The command line as a user meets it: flags (and --flagfile) into the config, --help by section, one-line errors,
--list_layers, the local launcher."""

import re
import subprocess
import sys

import pytest
from conftest import REPO, write_image

from trainer.command import flags as trainer_flags
from trainer.command import usage
from trainer.config import SECTIONS, Config, section_fields
from trainer.errors import UserInputError


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


def test_list_layers_from_a_flagfile_marks_the_default_unfreeze_point(tmp_path, random_mobilenet_025_weights):
  flagfile = tmp_path / "layers.flags"
  flagfile.write_text(f"--backbone=mobilenet\n--alpha=0.25\n--weights={random_mobilenet_025_weights}\n--image_size=32\n")
  result = _trainer(f"--flagfile={flagfile}", "--list_layers")
  assert result.returncode == 0, result.stderr[-2000:]
  marked = [line for line in result.stdout.splitlines() if "fine-tuning starts here" in line]
  assert len(marked) == 1 and " conv_dw_13 " in marked[0]


@pytest.mark.parametrize("args,message", [
    (["--data_dir=/no/such/folder"], "--data_dir=/no/such/folder: no such folder"),
    (["--backbone=resnet18"], "--backbone=resnet18 is not known"),
    (["--augment=heavy"], "--augment=heavy is not known"),
])
def test_user_mistakes_end_in_one_line_naming_the_flag(args, message, tmp_path, color_folder, capsys):
  code, errors = _run_main([f"--data_dir={color_folder}", f"--workdir={tmp_path / 'run'}", "--weights=none", *args],
                           capsys)
  assert code == 2 and len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0]


def _run_main(args, capsys) -> tuple[int, list[str]]:
  """python -m trainer.main ARGS, in this process: its exit code and the lines it wrote to stderr."""
  from trainer import main
  trainer_flags.FLAGS(["trainer", *args])
  try:
    with pytest.raises(SystemExit) as exit_:
      main.main(["trainer"])
  finally:
    trainer_flags.FLAGS.unparse_flags()
  return exit_.value.code, capsys.readouterr().err.splitlines()


_CHOICE_FIELDS = [field.name for _, field in section_fields() if field.metadata.get("choices")]
# Every range the config checks, with a value outside it (the choices are found from the fields themselves).
_OUT_OF_RANGE = {"image_size": 100000, "batch_size": 0, "frozen_epochs": -1, "frozen_lr": 0, "dropout": 1.0,
                 "head_units": -1, "feature_views": 0, "validation_split": 1.0, "alpha": 0, "max_image_pixels": 0,
                 "memory_budget": "lots", "top_k": 0, "rotation": -2, "rand_augment": 1.5, "lr_base_batch_size": -1,
                 "label_smoothing": 1.0, "finetune_label_smoothing": -0.5}


@pytest.mark.parametrize("name,value", [(name, "no_such_choice") for name in _CHOICE_FIELDS]
                         + list(_OUT_OF_RANGE.items()))
def test_every_choice_and_range_is_refused_before_any_file_is_read(name, value, tmp_path, capsys):
  """A data folder that does not exist and a workdir not yet made: the flag's line must come first, so no file
  was read and nothing was created (a refusal after a scan, or after training, would say otherwise)."""
  workdir = tmp_path / "run"
  code, errors = _run_main([f"--data_dir={tmp_path / 'missing'}", f"--workdir={workdir}", f"--{name}={value}"], capsys)
  assert code == 2 and len(errors) == 1 and f"--{name}=" in errors[0], errors
  assert not workdir.exists()


def test_declared_choices_are_what_the_registries_implement():
  from trainer import config as config_lib
  from trainer.modeling import augment, backbones
  assert set(config_lib.BACKBONES) == set(backbones.REGISTRY)
  assert set(config_lib.AUGMENT_PRESETS) == set(augment.PRESETS)
  assert set(config_lib.FLIPS) - {""} == set(augment.FLIPS)
  # --help lists a field's choices.
  assert all(", ".join(config_lib.BACKBONES) in field.metadata["help"] for _, field in section_fields()
             if field.name == "backbone")


def _help_of(groups, capsys):
  with pytest.raises(SystemExit) as exit_:
    usage.parse(["prog", "--help"], "prog --flag=value: what it does.", groups)
  assert exit_.value.code == 0
  return capsys.readouterr().out


def test_help_lists_every_flag_of_the_command_under_its_config_section(capsys):
  groups = trainer_flags.config_flag_groups()
  text = _help_of(groups, capsys)

  headers = [line[:-1] for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]
  assert headers == list(SECTIONS)
  sections = dict(zip(headers, re.split(r"^\w+:$", text, flags=re.MULTILINE)[1:]))
  for section, field in section_fields():
    assert re.search(rf"^  --(\[no\])?{field.name}:", sections[section], re.MULTILINE), (section, field.name)
  assert "--[no]cache_features: Frozen phase on cached features" in sections["train"]
  assert "(default: 'mobilenet_v2')" in sections["model"]
  # --verbosity is absl's flag: its entry still says what it does here, and its default once a command runs.
  entry = re.search(r"^  --verbosity: (.*?)(?=^  --|\Z)", sections["runtime"], re.DOTALL | re.MULTILINE).group(1)
  assert "warnings only" in entry and " ".join(entry.split()).endswith(f"(default: {Config().runtime.verbosity})")


def test_bad_flags_and_stray_arguments_end_in_one_line_with_exit_code_2(capsys):
  for arg, named in (("--dropout=abc", "--dropout=abc"), ("--dropuot=0.5", "dropuot"),
                     ("--flagfile=/no/such.flags", "Unable to open flagfile")):
    with pytest.raises(SystemExit) as exit_:
      usage.parse(["prog", arg], "", {})
    trainer_flags.FLAGS.unparse_flags()
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], lines
  with pytest.raises(UserInputError, match="Unexpected argument.*photos/"):
    usage.refuse_arguments(["prog", "photos/"])


def test_local_launcher_resolves_paths_against_the_callers_folder(tmp_path):
  write_image(tmp_path / "one_class" / "cat" / "a.jpg", (1, 2, 3))
  launcher = str(REPO / "launch" / "local.sh")

  helped = subprocess.run([launcher, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
  result = subprocess.run([launcher, "--data_dir=one_class", "--workdir=run", "--weights=none"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)

  assert helped.returncode == 0 and "\ndata:\n  --data_dir:" in helped.stdout
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
  assert "one_class has 1 class(es) ['cat']" in errors[0]


def test_ctrl_c_outside_the_epochs_is_one_line_and_exit_130(capsys):
  from trainer import exit_codes
  from trainer.errors import exit_on_user_error
  with pytest.raises(SystemExit) as exit_:
    with exit_on_user_error():
      raise KeyboardInterrupt
  lines = capsys.readouterr().err.splitlines()
  assert exit_.value.code == exit_codes.INTERRUPTED == 130 and len(lines) == 1 and "Ctrl-C" in lines[0]


@pytest.mark.parametrize("command", ["trainer.main", "trainer.evaluate", "trainer.demo", "trainer.data_service",
                                     "trainer.to_tfrecord", "trainer.cluster", "export.main", "export.predict"])
def test_every_commands_help_answers_at_once_without_loading_tensorflow(command):
  """`--help` took 9-14 s (TensorFlow loaded first) and trainer.demo's exited 1."""
  probe = ("import runpy, sys; sys.argv = ['cmd', '--help']\n"
           f"try:\n  runpy.run_module('{command}', run_name='__main__')\n"
           "except SystemExit as e:\n  code = e.code\n"
           "print('exit', code, 'tensorflow' in sys.modules)")
  result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert result.stdout.strip().splitlines()[-1] == "exit 0 False", (result.stdout[-500:], result.stderr[-1000:])
