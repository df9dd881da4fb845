"""python -m bench.serving: serving latency per image of an export (MobileNetV2 at 224 px), at batch 1 and 32.

python -m bench.serving [--val_dir=../shared/datasets/hymenoptera/val] [--batch_sizes=1,32] [--json=FILE]

Compares the SavedModel's `serving_default` on JPEG bytes with the in-memory Keras model (its call traced by
tf.function, as the export's is) on already decoded arrays, and measures the decode-and-resize share of the bytes
path alone. The model is exported (with its parity check) from the backbone with the given weights and an
untrained head of the folder's classes: latency does not depend on what the head learned. model.tflite, its size,
accuracy and speed in every quantization, is bench.tflite's. Prints and writes one JSON object; each figure is the
median over --repeats calls after one warm-up call.
"""

import json
import os
import statistics
import tempfile
import time

import tensorflow as tf
from absl import flags

import bench
from export import saved_model
from trainer.config import Config
from trainer.input import images, sources
from trainer.modeling import model as model_lib

FLAGS = flags.FlagValues()
flags.DEFINE_string("val_dir", "../shared/datasets/hymenoptera/val", "Class folders of JPEGs to serve.",
                    flag_values=FLAGS)
bench.define_backbone_flags(FLAGS)
flags.DEFINE_integer("image_size", 224, "Input size of the model.", flag_values=FLAGS)
flags.DEFINE_list("batch_sizes", ["1", "32"], "Batch sizes (each at most the number of files).", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 10, "Timed calls per figure.", flag_values=FLAGS)
flags.DEFINE_string("json", "", "Write the figures to this file.", flag_values=FLAGS)


def _median_seconds(call, repeats: int) -> float:
  call()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv: list[str]) -> dict:
  """Measures, prints, writes --json; returns the figures."""
  bench.parse_flags(FLAGS, argv, __doc__)
  size = FLAGS.image_size
  classes, files, _ = sources.class_folders(FLAGS.val_dir)
  paths = sorted(path for class_files in files.values() for path in class_files)
  config = Config().replace(backbone=FLAGS.backbone, alpha=FLAGS.alpha, weights=FLAGS.weights, image_size=size)
  model = model_lib.build_classifier(config.model, len(classes), size, config.data.seed)
  with tempfile.TemporaryDirectory(prefix="bench_serving_") as root:
    start = time.perf_counter()
    path = saved_model.export_saved_model(model, classes, config, root, paths)
    export_seconds = time.perf_counter() - start
    serve = tf.saved_model.load(path).signatures[saved_model.SERVING_DEFAULT]
    with open(os.path.join(path, saved_model.METADATA_FILE), encoding="utf-8") as f:
      metadata = json.load(f)
    keras_forward = tf.function(lambda x: model(x, training=False))
    decode_only = tf.function(lambda b: tf.map_fn(lambda one: images.decode_and_resize(one, size), b,
                                                  fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32)))
    contents = []
    for file in paths:
      with open(file, "rb") as f:
        contents.append(f.read())
    figures = {"files": len(paths), "image_size": size, "backbone": FLAGS.backbone,
               "export_seconds_with_parity": export_seconds,
               "jpeg_mean_kb": sum(map(len, contents)) / len(contents) / 1024}
    for batch in map(int, FLAGS.batch_sizes):
      jpegs = tf.constant(contents[:batch])
      count = int(jpegs.shape[0])
      pixels = decode_only(jpegs)
      per_call = {"savedmodel_jpeg_bytes": _median_seconds(lambda: serve(image_bytes=jpegs), FLAGS.repeats),
                  "keras_decoded_arrays": _median_seconds(lambda: keras_forward(pixels), FLAGS.repeats),
                  "decode_and_resize_only": _median_seconds(lambda: decode_only(jpegs), FLAGS.repeats)}
      figures[f"batch_{batch}_images"] = count
      figures[f"batch_{batch}_ms_per_image"] = {name: 1000 * seconds / count for name, seconds in per_call.items()}
      figures[f"batch_{batch}_decode_share"] = per_call["decode_and_resize_only"] / per_call["savedmodel_jpeg_bytes"]
  figures["parity"] = metadata["parity"]
  figures["load_average"] = os.getloadavg()
  print(json.dumps(figures, indent=2))
  bench.write_figures(figures, FLAGS.json)
  return figures


if __name__ == "__main__":
  bench.run(main)
