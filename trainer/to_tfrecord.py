"""python -m trainer.to_tfrecord --data_dir=DIR|--csv=FILE --output=OUT [--shards=N]: convert once, train many times.

Writes OUT/train-00000-of-0000N.tfrecord ... and OUT/val-... shards of tf.train.Example (image/encoded: the file's
bytes unchanged, image/format, image/filename, image/class/label, image/class/text), after the same checks as
training (unusable files skipped and listed, or refused with --strict_data; the same split with --seed and
--validation_split). The records are shuffled (seeded) before they are cut into shards, so every shard mixes the
classes. Train on them with --tfrecord='OUT/train-*' --tfrecord_val='OUT/val-*'.
"""

import os

from absl import flags

from trainer import config_checks
from trainer.command import flags as trainer_flags
from trainer.command import usage
from trainer.errors import exit_on_user_error

flags.DEFINE_string("output", "", "Folder the shards are written to (created; must hold no train-* or val-* yet).")
flags.DEFINE_integer("shards", 8, "Shards per split (fewer when a split has fewer images): at least the number "
                     "of training workers, which read whole shards.")


def main(argv):
  with exit_on_user_error():
    usage.refuse_arguments(argv)
    given = trainer_flags.FLAGS
    output = given.output
    config = trainer_flags.config_from_flags()
    config_checks.validate(config)
    from trainer.input import tfrecords  # Imported once the flags are parsed: --help answers without TensorFlow.
    written = tfrecords.convert(config.data, output, given.shards)
    print(f"Wrote {written['train']} training and {written['val']} validation records to {output}. Train with "
          f"--tfrecord='{os.path.join(output, 'train-*')}' --tfrecord_val='{os.path.join(output, 'val-*')}'.")


_FLAG_GROUPS = {"source": ["data_dir", "csv", "validation_split", "seed", "strict_data", "max_image_pixels"],
                "output": ["output", "shards"]}


def run_script():
  usage.run(main, __doc__, _FLAG_GROUPS)


if __name__ == "__main__":
  run_script()
