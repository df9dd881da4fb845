"""Input at scale: images/s, peak memory and cache size of trainer.input.data by dataset size and --cache mode, next to
keras.utils.image_dataset_from_directory on the same files in the same run.

python -m bench.scale [--sizes=1000,5000,20000] [--phone_photos=200] [--image_size=224] [--epochs=3]
    [--repeats=1] [--root=/tmp/bench_scale] [--json=FILE]

Synthetic JPEG folders (bench.synthetic, generated once under --root): `size` photos of 500x375 for each size,
and --phone_photos photos of 4032x3024. Every row runs in its own process, so its peak RSS (getrusage
ru_maxrss) is that of the input pipeline alone, measured the same way for every row:
  first_epoch_images_per_sec   images / (data.load: listing, checks, cache choice + the first epoch), i.e. from
                               nothing to one full pass, as a training run meets it
  later_epoch_images_per_sec   mean over epochs 2..--epochs (shuffled, from the cache unless --cache=none)
  cache_bytes_per_image        disk: the cache files' size; memory: the RSS that data.load and the first epoch
                               added (an upper bound: it includes the pipeline's own memory); none: 0
  *_cpu_us_per_image           the process's CPU time (user + system, every thread) per image over the same
                               span: on this shared VM the wall-clock figures move by up to 2x between minutes
                               (the host lends fewer cores), the CPU per image much less
`image_dataset_from_directory` rows make one pass (it has no cache). The phone photos also get a decode floor:
the CPU per image of `decode_jpeg(ratio=8)` alone against a full decode + resize, which bounds the first epoch's
speed-up over image_dataset_from_directory there. Memory rows are left out where the decoded
images would exceed --memory_limit. A row prints its figures as one JSON line; the parent collects them.
--repeats=N measures every row N times, interleaved (all rows of a size, then again), and reports each figure's
median (the single values of the first epoch's images/s beside it).
"""

import glob
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from absl import flags

import bench
from bench import synthetic
from trainer import config_checks

FLAGS = flags.FlagValues()
flags.DEFINE_list("sizes", ["1000", "5000", "20000"], "Dataset sizes (500x375 photos); empty for none.",
                  flag_values=FLAGS)
flags.DEFINE_integer("phone_photos", 200, "Number of 4032x3024 photos (0 skips them).", flag_values=FLAGS)
flags.DEFINE_integer("image_size", 224, "Square size the images are resized to.", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 32, "Batch size.", flag_values=FLAGS)
flags.DEFINE_integer("epochs", 3, "Epochs per row of ours (the first, then the later ones averaged).",
                     flag_values=FLAGS)
flags.DEFINE_integer("repeats", 1, "Times every row is measured (interleaved); the figures are medians.",
                     flag_values=FLAGS)
flags.DEFINE_list("caches", ["memory", "disk", "none"], "--cache modes measured.", flag_values=FLAGS)
flags.DEFINE_string("phone_cache", "auto", "--cache of the phone-photos row (auto: what a run gets by default).",
                    flag_values=FLAGS)
flags.DEFINE_string("memory_limit", "2GB", "Largest in-memory cache measured (bytes or e.g. 2GB).", flag_values=FLAGS)
flags.DEFINE_string("root", os.path.join(tempfile.gettempdir(), "bench_scale"), "Folder of the synthetic photos "
                    "(kept for the next run) and of the disk caches (removed after each row).", flag_values=FLAGS)
flags.DEFINE_string("json", "", "Also write the figures to this JSON file.", flag_values=FLAGS)
# One row, in the child process.
flags.DEFINE_enum("row", "", ["", "ours", "keras", "floor"],
                  "Internal: measure one row in this process and print it.", flag_values=FLAGS)
flags.DEFINE_string("data_dir", "", "Internal: the row's folder.", flag_values=FLAGS)
flags.DEFINE_string("cache", "none", "Internal: the row's --cache.", flag_values=FLAGS)

_PHONE_SIZE = (4032, 3024)
_PHOTO_SIZE = (500, 375)
# The validation share data.load carves (not iterated): small, so nearly every image is in the measured split.
_VALIDATION_SPLIT = 0.02


def _peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB.


def _current_rss_bytes() -> int:
  with open("/proc/self/statm", encoding="ascii") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _iterate(dataset) -> int:
  count = 0
  for batch in dataset:
    count += int(batch[0].shape[0])
  return count


def ours_row(folder: str, cache: str, image_size: int, batch_size: int, epochs: int, cache_root: str) -> dict:
  import tensorflow as tf

  from trainer.config import Config
  from trainer.input import data
  config = Config().replace(data_dir=folder, cache=cache, validation_split=_VALIDATION_SPLIT,
                            batch_size=batch_size).data
  rss_before = _current_rss_bytes()
  start, cpu_start = time.perf_counter(), time.process_time()
  train = data.load(config, image_size, cache_root).train
  load_seconds = time.perf_counter() - start
  seconds, cpu_seconds, count = [], [], 0
  for epoch in range(epochs):
    begin, cpu_begin = time.perf_counter(), time.process_time()
    count = _iterate(train.epoch(epoch).batch(batch_size).prefetch(tf.data.AUTOTUNE))
    seconds.append(time.perf_counter() - begin)
    cpu_seconds.append(time.process_time() - (cpu_start if epoch == 0 else cpu_begin))
    if epoch == 0:
      memory_cache_bytes = _current_rss_bytes() - rss_before
  if train.cache.mode == "disk":
    cache_bytes = sum(os.path.getsize(path) for path in glob.glob(glob.escape(train.cache.path) + "*"))
  else:
    cache_bytes = memory_cache_bytes if train.cache.mode == "memory" else 0
  later = seconds[1:]
  return {"images_per_epoch": count, "cache": train.cache.mode, "cache_reason": train.cache.reason,
          "first_epoch_images_per_sec": count / (load_seconds + seconds[0]),
          "later_epoch_images_per_sec": count * len(later) / sum(later) if later else None,
          "first_epoch_cpu_us_per_image": cpu_seconds[0] / count * 1e6,
          "later_epoch_cpu_us_per_image": sum(cpu_seconds[1:]) / (count * len(later)) * 1e6 if later else None,
          "peak_rss_bytes": _peak_rss_bytes(), "cache_bytes_per_image": cache_bytes / count,
          "load_seconds": load_seconds, "first_epoch_seconds_after_load": seconds[0]}


def keras_row(folder: str, image_size: int, batch_size: int) -> dict:
  import keras
  start, cpu_start = time.perf_counter(), time.process_time()
  dataset = keras.utils.image_dataset_from_directory(folder, image_size=(image_size, image_size),
                                                     batch_size=batch_size, shuffle=True, seed=0, verbose=False)
  count = _iterate(dataset)
  return {"images_per_epoch": count, "first_epoch_images_per_sec": count / (time.perf_counter() - start),
          "first_epoch_cpu_us_per_image": (time.process_time() - cpu_start) / count * 1e6,
          "peak_rss_bytes": _peak_rss_bytes()}


def decode_floor_row(folder: str, image_size: int) -> dict:
  """CPU per image of the least any decode of these JPEGs can do (`decode_jpeg(ratio=8)`, no resize: libjpeg
  still entropy-decodes every byte) and of image_dataset_from_directory's per-image work (decode in full, resize):
  their ratio bounds how much faster than it a first epoch of DCT-domain decoding can be, on this machine."""
  import tensorflow as tf
  paths = sorted(glob.glob(os.path.join(folder, "*", "*.jpg")))
  decoders = {
      "ratio_8_decode": lambda data: tf.io.decode_jpeg(data, channels=3, ratio=8),
      "full_decode_and_resize": lambda data: tf.image.resize(tf.io.decode_image(data, channels=3,
                                                                                expand_animations=False),
                                                             (image_size, image_size))}
  figures = {}
  for name, decode in decoders.items():
    # One pixel of the result: a value of the image (not its shape, which the graph may know without decoding).
    dataset = tf.data.Dataset.from_tensor_slices(paths).map(lambda path: (decode(tf.io.read_file(path))[0, 0, 0],),
                                                            num_parallel_calls=tf.data.AUTOTUNE)
    _iterate(dataset.batch(8))  # Traced and warm.
    cpu_start = time.process_time()
    _iterate(dataset.batch(8))
    figures[f"{name}_cpu_us_per_image"] = (time.process_time() - cpu_start) / len(paths) * 1e6
  figures["bound_on_first_epoch_over_image_dataset_from_directory"] = (
      figures["full_decode_and_resize_cpu_us_per_image"] / figures["ratio_8_decode_cpu_us_per_image"])
  return figures


def _median_row(measured: list[dict]) -> dict:
  """One row of repeated measurements: the median of every figure, and the first epoch's single values."""
  row = dict(measured[0])
  for key, value in measured[0].items():
    if isinstance(value, float) or key in ("peak_rss_bytes",):
      values = [figures[key] for figures in measured if figures.get(key) is not None]
      row[key] = statistics.median(values) if values else None
  row["repeats"] = [figures["first_epoch_images_per_sec"] for figures in measured]
  return row


def _run_row(row: str, folder: str, images: int, cache: str = "none") -> dict:
  """One row on the `images` photos of `folder`, in a fresh process (its own peak RSS); its figures are the last
  line it prints."""
  command = [sys.executable, "-m", "bench.scale", f"--row={row}", f"--data_dir={folder}", f"--cache={cache}",
             f"--image_size={FLAGS.image_size}", f"--batch_size={FLAGS.batch_size}", f"--epochs={FLAGS.epochs}",
             f"--root={FLAGS.root}"]
  done = subprocess.run(command, capture_output=True, text=True, check=False,
                        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
  if done.returncode:
    raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
  figures = {"images": images, **json.loads(done.stdout.strip().splitlines()[-1])}
  print(f"  {row:<6} {figures.get('cache', ''):<7} {json.dumps(figures)}", flush=True)
  return figures


def _targets(rows: list[dict], keras_rows: list[dict], phone: dict, image_size: int) -> dict:
  """The issue's targets as ratios (the figures they come from are in the rows)."""
  sizes = sorted({row["images"] for row in rows}) or [0]
  smallest, largest = sizes[0], sizes[-1]
  by = {(row["images"], row["cache"]): row for row in rows}
  targets = {}
  for mode in ("memory", "disk", "none"):
    if (smallest, mode) in by and (largest, mode) in by and largest != smallest:
      low, high = by[(smallest, mode)], by[(largest, mode)]
      targets[f"{mode}_first_epoch_{largest}_over_{smallest}"] = (high["first_epoch_images_per_sec"] /
                                                                 low["first_epoch_images_per_sec"])
      targets[f"{mode}_peak_rss_growth_bytes_{smallest}_to_{largest}"] = (high["peak_rss_bytes"] -
                                                                          low["peak_rss_bytes"])
  disk = [row["cache_bytes_per_image"] for row in rows if row["cache"] == "disk"]
  if disk:
    targets["disk_cache_bytes_per_image_over_s_s_3"] = max(disk) / (image_size * image_size * 3)
  for keras_figures in keras_rows:
    for mode in ("memory", "disk", "none"):
      mine = by.get((keras_figures["images"], mode))
      if mine:
        name = f"{mode}_first_epoch_over_image_dataset_from_directory_{keras_figures['images']}"
        targets[name] = mine["first_epoch_images_per_sec"] / keras_figures["first_epoch_images_per_sec"]
        # The same ratio in CPU per image (theirs / ours: above 1 means we spend less).
        targets[f"{name}_in_cpu"] = (keras_figures["first_epoch_cpu_us_per_image"] /
                                     mine["first_epoch_cpu_us_per_image"])
  if phone:
    targets["phone_photos_first_epoch_over_image_dataset_from_directory"] = (
        phone["ours_first_epoch_images_per_sec"] / phone["image_dataset_from_directory_images_per_sec"])
    targets["phone_photos_first_epoch_over_image_dataset_from_directory_in_cpu"] = (
        phone["image_dataset_from_directory_cpu_us_per_image"] / phone["ours_first_epoch_cpu_us_per_image"])
    targets["phone_photos_bound_from_ratio_8_decoding_in_cpu"] = (
        phone["decode_floor"]["bound_on_first_epoch_over_image_dataset_from_directory"])
  return targets


def main(argv: list[str]) -> dict:
  """Measures, prints, writes --json; returns the figures."""
  bench.parse_flags(FLAGS, argv, __doc__)
  if FLAGS.row:
    cache_root = tempfile.mkdtemp(dir=FLAGS.root, prefix="cache_")
    if FLAGS.row == "ours":
      figures = ours_row(FLAGS.data_dir, FLAGS.cache, FLAGS.image_size, FLAGS.batch_size, FLAGS.epochs, cache_root)
    elif FLAGS.row == "floor":
      figures = decode_floor_row(FLAGS.data_dir, FLAGS.image_size)
    else:
      figures = keras_row(FLAGS.data_dir, FLAGS.image_size, FLAGS.batch_size)
    shutil.rmtree(cache_root)
    print(json.dumps(figures))
    bench.write_figures(figures, FLAGS.json)
    return figures
  os.makedirs(FLAGS.root, exist_ok=True)
  size = FLAGS.image_size
  rows, keras_rows = [], []
  print(f"load average {os.getloadavg()[0]:.2f} at the start", flush=True)
  for images in map(int, FLAGS.sizes):
    folder = synthetic.folder(os.path.join(FLAGS.root, f"photos_{images}"), images, *_PHOTO_SIZE)
    print(f"{images} photos of {_PHOTO_SIZE[0]}x{_PHOTO_SIZE[1]} at {size}x{size}:", flush=True)
    memory_limit = config_checks.memory_budget(FLAGS.memory_limit) or 0
    caches = [cache for cache in FLAGS.caches if cache != "memory" or images * size * size * 3 <= memory_limit]
    if len(caches) < len(FLAGS.caches):
      print(f"  memory cache skipped: {images} images exceed --memory_limit={FLAGS.memory_limit}")
    measured = [[_run_row("ours", folder, images, cache) for cache in caches] + [_run_row("keras", folder, images)]
                for _ in range(FLAGS.repeats)]
    rows += [_median_row(list(repeats)) for repeats in zip(*measured)][:-1]
    keras_rows.append(_median_row([repeat[-1] for repeat in measured]))
  phone = {}
  if FLAGS.phone_photos:
    folder = synthetic.folder(os.path.join(FLAGS.root, f"phone_{FLAGS.phone_photos}"), FLAGS.phone_photos,
                              *_PHONE_SIZE, classes=2)
    print(f"{FLAGS.phone_photos} photos of {_PHONE_SIZE[0]}x{_PHONE_SIZE[1]} at {size}x{size}:", flush=True)
    measured = [(_run_row("ours", folder, FLAGS.phone_photos, FLAGS.phone_cache),
                 _run_row("keras", folder, FLAGS.phone_photos)) for _ in range(FLAGS.repeats)]
    ours, keras_figures = (_median_row([repeat[i] for repeat in measured]) for i in (0, 1))
    phone = {"images": FLAGS.phone_photos, "cache": ours["cache"],
             "ours_first_epoch_images_per_sec": ours["first_epoch_images_per_sec"],
             "ours_later_epoch_images_per_sec": ours["later_epoch_images_per_sec"],
             "ours_load_seconds": ours["load_seconds"],
             "ours_first_epoch_cpu_us_per_image": ours["first_epoch_cpu_us_per_image"],
             "ours_repeats": ours["repeats"],
             "image_dataset_from_directory_images_per_sec": keras_figures["first_epoch_images_per_sec"],
             "image_dataset_from_directory_cpu_us_per_image": keras_figures["first_epoch_cpu_us_per_image"],
             "image_dataset_from_directory_repeats": keras_figures["repeats"],
             "decode_floor": _run_row("floor", folder, FLAGS.phone_photos)}
  figures = {"image_size": size, "rows": rows, "image_dataset_from_directory": keras_rows, "phone_photos": phone,
             "targets": _targets(rows, keras_rows, phone, size), "load_average_at_end": os.getloadavg()[0]}
  print(json.dumps(figures["targets"], indent=2))
  bench.write_figures(figures, FLAGS.json)
  return figures


if __name__ == "__main__":
  bench.run(main)
