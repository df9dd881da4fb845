"""python -m trainer.evaluate --workdir=DIR [--data_dir=TEST_DIR | --csv=FILE | --tfds=NAME] [--top_k=K]: how well
a trained run classifies.

Without a data source, the run's own validation split is evaluated. --data_dir or --csv give a held-out test set
(one class is enough): all of its images; of a folder that holds train/ beside test/ or val/, only test/ (else
val/). --tfds: the dataset's test split, else its validation split (its train split only for another dataset than
the run's). --tfrecord: all of its records. Its class names must be classes of the run.

Writes to WORKDIR/report/: eval_metrics.json (accuracy, top-k accuracy, loss, per-class precision/recall/F1/support,
their averages, the confusion matrix and the skipped files), eval_classification_report.txt and
eval_confusion_matrix.png, and prints the classification report and a summary line.
"""

import os

from trainer.command import flags as trainer_flags
from trainer.command import usage
from trainer.config import DATA_SOURCE_FIELDS
from trainer.errors import exit_on_user_error

_DATA_FLAGS = DATA_SOURCE_FIELDS + ("strict_data",)
_OVERRIDABLE = _DATA_FLAGS + ("batch_size", "top_k")


def main(argv):
  given = trainer_flags.FLAGS
  with exit_on_user_error():
    usage.refuse_arguments(argv)
    trainer_flags.refuse_unused(("workdir",) + _OVERRIDABLE, "trainer.evaluate")
    # Imported once the flags are parsed: --help answers without loading TensorFlow.
    from trainer.loop import evaluation
    from trainer.reporting import progress
    progress.hide_library_info()
    metrics = evaluation.evaluate(given.workdir, trainer_flags.overrides(_OVERRIDABLE))
  report_dir = os.path.join(given.workdir, "report")
  with open(os.path.join(report_dir, evaluation.REPORT_FILE), encoding="utf-8") as f:
    print(f.read(), end="")
  print(evaluation.summary(metrics, report_dir))


HELP_GROUPS = {"evaluate": ["workdir", "top_k", "batch_size"],
               "data (default: the run's validation split)": list(_DATA_FLAGS)}


def run_script():
  usage.run(main, __doc__, HELP_GROUPS)


if __name__ == "__main__":
  run_script()
