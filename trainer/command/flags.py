"""Command-line flags, one per config field (same name), and the Config they produce."""

import typing

from absl import (
  flags,
  logging,  # noqa: F401 - defines --verbosity, which must exist before the config flags.
)

from trainer.config import Config, section_fields
from trainer.errors import UserInputError

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Folder of the run: config, checkpoints, TensorBoard logs, export, report.")
flags.DEFINE_bool("list_layers", False, "Print every backbone layer (index, name, type, parameters), mark the "
                  "default unfreeze point, and exit.")

_DEFINE = {str: flags.DEFINE_string, int: flags.DEFINE_integer, float: flags.DEFINE_float, bool: flags.DEFINE_bool}


# Config fields whose flag another library defines: --verbosity is absl's own logging flag (absl sets it to 0,
# the config's default, only inside app.run), so the config takes it only when given.
_FOREIGN = tuple(field.name for _, field in section_fields() if field.name in FLAGS)


def _define_config_flags() -> None:
  defaults = Config()
  hints = {}
  for section, field in section_fields():
    if field.name in _FOREIGN:
      FLAGS[field.name].help = field.metadata["help"]  # What it means here, in --help too.
      continue
    section_type = type(getattr(defaults, section))
    hints.setdefault(section_type, typing.get_type_hints(section_type))
    _DEFINE[hints[section_type][field.name]](field.name, getattr(getattr(defaults, section), field.name),
                                             field.metadata["help"])


_define_config_flags()


def config_from_flags() -> Config:
  return Config().replace(**{field.name: FLAGS[field.name].value for _, field in section_fields()
                             if field.name not in _FOREIGN or FLAGS[field.name].present})


def given_flags() -> set[str]:
  """The config fields given on the command line (or in a --flagfile), for checks that depend on a choice the
  user made rather than a default."""
  return {field.name for _, field in section_fields() if FLAGS[field.name].present}


def overrides(names: typing.Collection[str]) -> dict:
  """The config fields among `names` given on the command line: what a command on a trained run changes of its
  config.json (trainer.loop.restore)."""
  return {name: FLAGS[name].value for name in names if FLAGS[name].present}


def refuse_unused(used: typing.Collection[str], command: str) -> None:
  """A flag of this module given to a command that does not read it would be ignored silently: refused instead
  (commands on a trained run take the model's settings from its config.json)."""
  unused = [name for name in ("workdir", "list_layers", *(field.name for _, field in section_fields()))
            if name not in used and name not in _FOREIGN and FLAGS[name].present]
  if unused:
    raise UserInputError(f"{', '.join('--' + name for name in unused)}: not used by {command}, which takes "
                         f"{', '.join('--' + name for name in used)} (the rest comes from the run's config.json).")


def config_flag_groups() -> dict[str, list[str]]:
  """The config's flags by section (data, model, train, runtime, export, tune), for --help."""
  groups = {}
  for section, field in section_fields():
    groups.setdefault(section, []).append(field.name)
  return groups
