"""python -m export.predict --model=EXPORT_DIR PATH... [--top_k=3] [--format=table|json|csv]

Prints the top-k labels and scores of every image file given, or found below the folders given (files there not
named as images are counted on stderr). Unreadable files are reported (in the output, with the reason) and the rest
still classified; the exit code is then 1.
"""

import sys

from absl import flags

import export
from trainer.command import usage
from trainer.errors import UserInputError, exit_on_user_error

flags.DEFINE_string("model", None, "Export folder of one version: WORKDIR/export/<model_name>/<version>.")
flags.DEFINE_integer("top_k", 3, "How many best labels to print per image.")
flags.DEFINE_enum("format", "table", export.PREDICTION_FORMATS, "Output format.")
FLAGS = flags.FLAGS


def main(argv):
  # Imported once the flags are parsed: --help answers without loading TensorFlow.
  from export import classify
  from trainer.input import images
  from trainer.reporting import progress
  progress.hide_library_info()
  with exit_on_user_error():
    if not FLAGS.model:
      raise UserInputError("Pass --model=WORKDIR/export/<model_name>/<version>.")
    paths, not_images = classify.image_paths(argv[1:])
    if not paths:
      raise UserInputError("Give image files or folders to classify after the flags" + (
          f" (the folders given hold no file named as an image, e.g. {not_images[0]})." if not_images else "."))
    if FLAGS.top_k < 1:
      raise UserInputError(f"--top_k={FLAGS.top_k}: must be at least 1.")
    predictions = classify.Classifier(FLAGS.model).classify(paths, FLAGS.top_k)
  if not_images:
    print(f"Not classified: {len(not_images)} file(s) below the folders given that are not named as images (read: "
          f"{', '.join(images.IMAGE_EXTENSIONS)}), e.g. {'; '.join(not_images[:3])}. Give them as files to classify "
          "them anyway.", file=sys.stderr)
  sys.stdout.write(classify.format_predictions(predictions, FLAGS.format))
  if any(p.error for p in predictions):
    sys.exit(1)


def run_script():
  usage.run(main, __doc__, {"predict": ["model", "top_k", "format"]})


if __name__ == "__main__":
  run_script()
