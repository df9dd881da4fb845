"""Errors caused by the user's input (a flag, a file, a folder): reported as one clear message, no traceback."""


class UserInputError(Exception):
  """A mistake the user can fix; the message names the flag or file and the fix."""
