"""What the commands (trainer/main.py and the others beside it) share: the config's flags, --help, and the body of
the training command."""
