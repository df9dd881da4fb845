"""Errors caused by the user's input (a flag, a file, a folder): reported as one clear message, no traceback."""

import contextlib
import sys

from trainer import exit_codes

# TensorFlow reports ENOSPC and EDQUOT as ResourceExhaustedError (as it does running out of memory), or in an
# UnknownError: these words tell a full disk.
DISK_FULL = ("No space left on device", "Disk quota exceeded")


class UserInputError(Exception):
  """A mistake the user can fix; the message names the flag or file and the fix."""


@contextlib.contextmanager
def exit_on_user_error():
  """Ends a command on a UserInputError with its message on stderr and exit code 2, and on Ctrl-C with one line
  and 130 (trainer.exit_codes; while epochs train, Ctrl-C saves a checkpoint first: trainer.loop.train)."""
  try:
    yield
  except UserInputError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(exit_codes.USER_ERROR)
  except KeyboardInterrupt:
    print("Interrupted (Ctrl-C): files already written are complete and the last checkpoint is kept; run the same "
          "command again to continue.", file=sys.stderr)
    sys.exit(exit_codes.INTERRUPTED)
