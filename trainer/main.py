"""python -m trainer.main --data_dir=DIR --workdir=DIR [--flagfile=FILE]: train, fine-tune and export."""

from absl import app

from trainer import flags as trainer_flags
from trainer import cli


def main(argv):
  del argv
  cli.run(trainer_flags.config_from_flags(), trainer_flags.FLAGS.workdir, trainer_flags.FLAGS.list_layers)


def run_script():
  app.run(main)


if __name__ == "__main__":
  run_script()
