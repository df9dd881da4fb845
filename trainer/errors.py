"""Errors caused by the user's input (a flag, a file, a folder): reported as one clear message, no traceback."""

import contextlib
import sys


class UserInputError(Exception):
  """A mistake the user can fix; the message names the flag or file and the fix."""


@contextlib.contextmanager
def exit_on_user_error():
  """Ends a command on a UserInputError with its message on stderr and exit code 2."""
  try:
    yield
  except UserInputError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
