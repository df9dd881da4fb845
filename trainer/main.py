"""python -m trainer.main --data_dir=DIR --workdir=DIR [--flagfile=FILE]: train, fine-tune and export.

Trains a classifier of the data's classes on a pretrained backbone (frozen, then fine-tuned), writes checkpoints,
TensorBoard logs and a report into the workdir, and exports a SavedModel. Rerunning the same command continues an
interrupted run. Every flag below is also a field of config.json.
"""

from trainer.command import flags as trainer_flags
from trainer.command import usage
from trainer.errors import exit_on_user_error


def main(argv):
  with exit_on_user_error():
    usage.refuse_arguments(argv)
  # Imported after the flags are parsed: --help answers without loading TensorFlow.
  from trainer.command import cli
  from trainer.loop import finish
  with exit_on_user_error():
    exporter = finish.installed_exporter()  # The export package's SavedModel export, registered in setup.cfg.
  cli.run(trainer_flags.config_from_flags(), trainer_flags.FLAGS.workdir, trainer_flags.FLAGS.list_layers,
          given=trainer_flags.given_flags(), exporter=exporter)


def run_script():
  usage.run(main, __doc__, {"run": ["workdir", "list_layers"], **trainer_flags.config_flag_groups()})


if __name__ == "__main__":
  run_script()
