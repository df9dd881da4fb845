"""How every command meets the command line: --help lists the command's own flags by group, and a bad flag ends
in one line (exit 2), like every other user mistake.

absl's own --help lists only flags defined in the `__main__` module (none here, and none for a console script),
then says "Try --helpfull", which lists hundreds of absl and TensorFlow flags. --helpfull is left as absl has it.
"""

import functools
import sys
from typing import Callable, Mapping, Sequence

from absl import app, flags

from trainer.errors import UserInputError

# absl's spellings of --help, and -h, which people try first.
HELP_ARGS = ("--help", "-help", "--helpshort", "-helpshort", "-h", "-?")

# absl.app.run sets an unset --verbosity to 0 (INFO) once the flags are parsed: its real default in every command.
_RUN_DEFAULTS = {"verbosity": 0}

_FOOTER = ("Flags may also come from a file: --flagfile=FILE (one --flag=value a line). --helpfull lists every "
           "flag, absl's and TensorFlow's included.")


def help_text(usage: str, groups: Mapping[str, Sequence[str]]) -> str:
  """`usage`, then every flag of each group (name, help, default), then how to get more."""
  lines = [usage.strip(), ""]
  for group, names in groups.items():
    lines.append(f"{group}:")
    lines.extend(_describe(flags.FLAGS[name]) for name in names)
    lines.append("")
  lines.append(flags.text_wrap(_FOOTER))
  return "\n".join(lines) + "\n"


def _describe(flag: flags.Flag) -> str:
  name = f"--[no]{flag.name}" if flag.boolean else f"--{flag.name}"
  default = _default(_RUN_DEFAULTS.get(flag.name, flag.default))
  return flags.text_wrap(f"{name}: {flag.help}{default}", indent="      ", firstline_indent="  ")


def _default(value) -> str:
  if value is None:
    return ""
  if isinstance(value, bool):
    return f" (default: {str(value).lower()})"
  return f" (default: {value!r})" if isinstance(value, str) else f" (default: {value})"


def parse(argv: Sequence[str], usage: str, groups: Mapping[str, Sequence[str]]) -> list[str]:
  """absl's flag parsing (returns the arguments left), but --help prints `help_text` and exits 0, and a flag
  absl refuses (unknown, or a value of the wrong type) ends in one line on stderr with exit code 2."""
  before_separator = argv[1:argv.index("--")] if "--" in argv else argv[1:]
  if any(arg in HELP_ARGS for arg in before_separator):
    sys.stdout.write(help_text(usage, groups))
    sys.exit(0)
  try:
    return flags.FLAGS(list(argv))
  except flags.Error as e:
    # absl prefixes some messages (an unreadable --flagfile) with its own "ERROR::".
    message = " ".join(line.strip() for line in str(e).splitlines() if line.strip()).removeprefix("ERROR:: ")
    print(f"error: {message} (--help lists the flags)", file=sys.stderr)
    sys.exit(2)


def refuse_arguments(argv: Sequence[str]) -> None:
  """For commands that take only flags: a word without -- is a mistake (a missing -- or =), not something to
  ignore."""
  if len(argv) > 1:
    raise UserInputError(f"Unexpected argument(s) {' '.join(argv[1:])}: this command takes only --flag=value "
                         "arguments (--help lists them).")


def run(main: Callable[[list[str]], None], usage: str, groups: Mapping[str, Sequence[str]]) -> None:
  """app.run(main) with `parse` as its flag parser."""
  app.run(main, flags_parser=functools.partial(parse, usage=usage, groups=groups))
