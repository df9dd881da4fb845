"""Multi-worker input, measured: how many images each worker decodes, how many distinct training examples every
epoch trains on over all workers, and seconds per step, for 1 and W workers on loopback.

  python -m bench.multi_worker --workers=2 --json=FILE [--images=96 --image_size=64 --epochs=2]

Each row is a real `python -m trainer.main --strategy=multi_worker` cluster on 127.0.0.1 with the defaults'
augmentation and dropout and without --deterministic, on drawn colour images (MobileNet alpha 0.25, random init:
the input path is what is measured, not accuracy). Counts come from --example_log: the ids each worker trained on
per epoch, and the size of the share each worker decoded.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags
from PIL import Image

from bench import write_figures
from trainer import distribute

flags.DEFINE_integer("workers", 2, "Workers of the cluster compared with one.")
flags.DEFINE_integer("images", 96, "Drawn training and validation images (3 classes).")
flags.DEFINE_integer("image_size", 64, "Input size of the model.")
flags.DEFINE_integer("batch_size", 16, "Global batch size.")
flags.DEFINE_integer("epochs", 2, "Epochs (1 frozen, the rest fine-tune).")
flags.DEFINE_string("json", "", "Write the figures to this JSON file.")
FLAGS = flags.FLAGS

_COLORS = ((220, 40, 40), (40, 200, 60), (40, 60, 220))


def _draw(root: str, count: int) -> None:
  rng = np.random.default_rng(0)
  for index in range(count):
    label = index % len(_COLORS)
    folder = os.path.join(root, f"class_{label}")
    os.makedirs(folder, exist_ok=True)
    pixels = np.clip(np.array(_COLORS[label]) + rng.normal(0, 30, (96, 128, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(os.path.join(folder, f"{index}.jpg"), quality=90)


def _free_ports(count: int) -> list[int]:
  sockets = [socket.socket() for _ in range(count)]
  for s in sockets:
    s.bind(("127.0.0.1", 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


def _cluster(workers: int, data_dir: str, root: str) -> dict:
  workdir, ids = os.path.join(root, f"run_{workers}"), os.path.join(root, f"ids_{workers}")
  command = [sys.executable, "-m", "trainer.main", f"--data_dir={data_dir}", f"--workdir={workdir}",
             "--strategy=multi_worker", "--backbone=mobilenet", "--alpha=0.25", "--weights=none",
             f"--image_size={FLAGS.image_size}", f"--batch_size={FLAGS.batch_size}", "--frozen_epochs=0",
             f"--finetune_epochs={FLAGS.epochs}", f"--example_log={ids}", "--verbosity=-1"]
  addresses = [f"127.0.0.1:{port}" for port in _free_ports(workers)]
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
  processes = [subprocess.Popen(command, env={**env, "TF_CONFIG": json.dumps(distribute.tf_config(addresses, i))},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(workers)]
  outputs = [process.communicate()[0] for process in processes]
  for process, output in zip(processes, outputs):
    if process.returncode:
      raise SystemExit(f"a worker failed:\n{output[-3000:]}")
  records = [json.loads(line) for name in sorted(os.listdir(ids))
             for line in open(os.path.join(ids, name), encoding="utf-8")]
  shares = sorted((r for r in records if "decoded" in r), key=lambda r: r["worker"])
  epochs = sorted({r["epoch"] for r in records if "epoch" in r})
  seen = []
  for epoch in epochs:
    trained = [i for r in records if r.get("epoch") == epoch for i in r["ids"]]
    seen.append([len(set(trained)), len(trained)])
  history = json.load(open(os.path.join(workdir, "report", "history.json"), encoding="utf-8"))
  # Steady steps only: the first step of an epoch traces and compiles the step function.
  steady = [FLAGS.batch_size / r["steady_images_per_sec"] for r in history if r.get("steady_images_per_sec")]
  facts = json.load(open(os.path.join(workdir, "config.json"), encoding="utf-8"))["run"]
  return {"decoded_per_worker": [r["decoded"] for r in shares], "seen_per_epoch": seen,
          "seconds_per_step": float(np.median(steady)) if steady else None, "train_examples": facts["train_examples"]}


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as root:
    data_dir = os.path.join(root, "data")
    _draw(data_dir, FLAGS.images)
    start = time.perf_counter()
    single = _cluster(1, data_dir, root)
    cluster = _cluster(FLAGS.workers, data_dir, root)
  figures = {"dataset_size": cluster["train_examples"], "workers": FLAGS.workers,
             "global_batch_size": FLAGS.batch_size, "decoded_per_worker": cluster["decoded_per_worker"],
             "seen_per_epoch": cluster["seen_per_epoch"],
             "seconds_per_step": {"1": single["seconds_per_step"], str(FLAGS.workers): cluster["seconds_per_step"]},
             "single_worker": {"decoded_per_worker": single["decoded_per_worker"],
                               "seen_per_epoch": single["seen_per_epoch"]},
             "seconds": time.perf_counter() - start}
  write_figures(figures, FLAGS.json)


if __name__ == "__main__":
  app.run(main)
