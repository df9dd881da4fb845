"""python -m bench.serving: serving latency per image of a MobileNetV2 export at 224 px, at batch 1 and 32.

Compares the SavedModel's `serving_default` on JPEG bytes with the in-memory Keras model (its call traced by
tf.function, as the export's is) on already decoded arrays, measures the decode-and-resize share of the bytes path
alone, and times model.tflite (float16) at batch 1. The model is exported (with its parity check) from MobileNetV2
with the given weights and an untrained 2-class head: latency does not depend on what the head learned.
Prints one JSON object; each figure is the median over --repeats calls after one warm-up call.
"""

import json
import os
import statistics
import tempfile
import time

import tensorflow as tf
from absl import app, flags

from export import saved_model
from trainer import images
from trainer import model as model_lib
from trainer.config import Config

flags.DEFINE_string("val_dir", "../shared/datasets/hymenoptera/val", "Class folders of JPEGs to serve.")
flags.DEFINE_string("weights", "../shared/weights/mobilenet_v2_1.0_224_coral-tf2ptq-dequant_no_top.h5",
                    "MobileNetV2 no-top weights file.")
flags.DEFINE_integer("repeats", 10, "Timed calls per figure.")
FLAGS = flags.FLAGS

_SIZE = 224


def _median_seconds(call, repeats: int) -> float:
  call()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv):
  del argv
  classes = sorted(os.listdir(FLAGS.val_dir))
  paths = sorted(os.path.join(FLAGS.val_dir, c, f) for c in classes for f in os.listdir(os.path.join(FLAGS.val_dir, c)))
  config = Config().replace(backbone="mobilenet_v2", weights=FLAGS.weights, image_size=_SIZE, tflite=True)
  model = model_lib.build_classifier(config.model, len(classes), _SIZE, config.data.seed)
  start = time.perf_counter()
  path = saved_model.export_saved_model(model, classes, config, tempfile.mkdtemp(prefix="bench_serving_"), paths)
  export_seconds = time.perf_counter() - start
  serve = tf.saved_model.load(path).signatures["serving_default"]
  keras_forward = tf.function(lambda x: model(x, training=False))
  decode_only = tf.function(lambda b: tf.map_fn(lambda one: images.decode_and_resize(one, _SIZE), b,
                                                fn_output_signature=tf.TensorSpec([_SIZE, _SIZE, 3], tf.float32)))
  contents = [open(p, "rb").read() for p in paths]
  figures = {"export_seconds_with_parity_and_tflite": export_seconds,
             "jpeg_mean_kb": sum(map(len, contents)) / len(contents) / 1024}
  for batch in (1, 32):
    jpegs = tf.constant(contents[:batch])
    pixels = decode_only(jpegs)
    per_image = {"savedmodel_jpeg_bytes": _median_seconds(lambda: serve(image_bytes=jpegs), FLAGS.repeats),
                 "keras_decoded_arrays": _median_seconds(lambda: keras_forward(pixels), FLAGS.repeats),
                 "decode_and_resize_only": _median_seconds(lambda: decode_only(jpegs), FLAGS.repeats)}
    figures[f"batch_{batch}_ms_per_image"] = {name: 1000 * seconds / batch for name, seconds in per_image.items()}
    figures[f"batch_{batch}_decode_share"] = per_image["decode_and_resize_only"] / per_image["savedmodel_jpeg_bytes"]

  interpreter = tf.lite.Interpreter(model_path=os.path.join(path, saved_model.TFLITE_FILE),
                                    num_threads=os.cpu_count())
  interpreter.allocate_tensors()
  input_index = interpreter.get_input_details()[0]["index"]
  interpreter.set_tensor(input_index, decode_only(tf.constant(contents[:1])).numpy())
  figures["tflite_float16_batch_1_ms"] = 1000 * _median_seconds(interpreter.invoke, FLAGS.repeats)
  with open(os.path.join(path, saved_model.METADATA_FILE), encoding="utf-8") as f:
    metadata = json.load(f)
  figures["parity"] = metadata["parity"]
  figures["tflite_parity"] = metadata["tflite"]["parity"]
  figures["tflite_bytes"] = metadata["tflite"]["bytes"]
  figures["load_average"] = os.getloadavg()
  print(json.dumps(figures, indent=2))


if __name__ == "__main__":
  app.run(main)
