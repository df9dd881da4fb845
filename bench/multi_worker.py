"""Multi-worker input and fault tolerance, measured: how many images each worker decodes, how many distinct training
examples every epoch trains on over all workers, seconds per step, for 1 and W workers on loopback; and with
--kill_every, the same cluster under a scheduler that restarts what the exit-code table says while workers are
killed at random points.

  python -m bench.multi_worker --workers=2 --json=FILE [--images=96 --image_size=64 --epochs=2]
  python -m bench.multi_worker --workers=2 --kill_every=20 --kills=5 --json=FILE

Each row is a real `python -m trainer.main --strategy=multi_worker` cluster on 127.0.0.1 with the defaults'
augmentation and dropout and without --deterministic, on drawn colour images (MobileNet alpha 0.25, random init:
the input path is what is measured, not accuracy). Counts come from --example_log: the ids each worker trained on
per epoch (a worker's last record of an epoch: an epoch replayed after a restart is logged again), and the size of
the share each worker decoded.

--kill_every=N: SIGKILLs a random live worker at random points (every N seconds on average, uniform in [N/2, 3N/2])
until --kills were made, and plays Kubeflow's restartPolicy ExitCode: a worker that exits with a retryable code
(trainer.exit_codes.retryable) is started again, any other non-zero code fails the job, and the job succeeds when
the chief exits 0. The figures add {"kills", "restarts", "final_history_matches" (every epoch's loss, accuracy,
val_loss and val_accuracy within 1e-4 of an uninterrupted cluster's), "seen_per_epoch", "exports", "exit_codes"}.
"""

import dataclasses
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import flags
from PIL import Image

import bench
from trainer import exit_codes

FLAGS = flags.FlagValues()
flags.DEFINE_integer("workers", 2, "Workers of the cluster compared with one.", flag_values=FLAGS)
flags.DEFINE_integer("images", 96, "Drawn training and validation images (3 classes).", flag_values=FLAGS)
flags.DEFINE_integer("image_size", 64, "Input size of the model.", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 16, "Global batch size.", flag_values=FLAGS)
flags.DEFINE_integer("epochs", 2, "Fine-tune epochs (from scratch: no frozen phase).", flag_values=FLAGS)
flags.DEFINE_float("kill_every", 0.0, "Mean seconds between SIGKILLs of a random worker under the restarting "
                   "scheduler (0: no kills, and the 1-worker comparison instead).", flag_values=FLAGS)
flags.DEFINE_integer("kills", 5, "With --kill_every: how many kills (then the job is left to finish).",
                     flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Seed of the kill times and victims.", flag_values=FLAGS)
flags.DEFINE_float("job_timeout", 1800.0, "Seconds after which a cluster still running is stopped (a failure).",
                   flag_values=FLAGS)
flags.DEFINE_string("json", "", "Write the figures to this JSON file.", flag_values=FLAGS)

_COLORS = ((220, 40, 40), (40, 200, 60), (40, 60, 220))
# The per-epoch numbers an interrupted run must reproduce, and how closely (README: a resumed run continues exactly).
_COMPARED = ("loss", "accuracy", "val_loss", "val_accuracy")
_TOLERANCE = 1e-4
_POLL_SECONDS = 0.2
_FINISH_SECONDS = 60.0


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


def tf_configs(workers: int) -> list[str]:
  """TF_CONFIG of each worker of a loopback cluster (as trainer.cluster.tf_config builds them)."""
  addresses = [f"127.0.0.1:{port}" for port in _free_ports(workers)]
  return [json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}})
          for index in range(workers)]


@dataclasses.dataclass
class JobResult:
  """How a supervised job ended: the chief's code (0: done), kills and restarts made, every exit code seen."""
  code: int
  kills: int
  restarts: int
  exit_codes: list[int]
  logs: list[str]


def supervise(command: list[str], workers: int, log_dir: str, kill_every: float = 0.0, kills: int = 0,
              seed: int = 0, timeout: float = 1800.0, env: dict | None = None) -> JobResult:
  """Runs `command` as a loopback cluster of `workers` and plays the scheduler of README's policy (Kubeflow's
  restartPolicy ExitCode): a worker that exits with a retryable code is started again with the same TF_CONFIG;
  the job fails on any other non-zero code (the others are stopped) and succeeds when the chief (worker 0) exits 0.
  With `kill_every` > 0, SIGKILLs a random live worker `kills` times at random points. Each process's output goes
  to its own file in `log_dir`."""
  rng = random.Random(seed)
  configs = tf_configs(workers)
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
  os.makedirs(log_dir, exist_ok=True)
  processes, logs, codes = {}, [], []
  made_kills = restarts = 0

  def start(index: int) -> None:
    path = os.path.join(log_dir, f"worker_{index}.{len(logs)}.log")
    logs.append(path)
    with open(path, "w", encoding="utf-8") as log:
      processes[index] = subprocess.Popen(command, env={**env, "TF_CONFIG": configs[index]}, stdout=log,
                                          stderr=subprocess.STDOUT)

  def next_kill() -> float:
    return time.monotonic() + rng.uniform(kill_every / 2, kill_every * 3 / 2) if kill_every > 0 else float("inf")

  for index in range(workers):
    start(index)
  deadline, kill_at = time.monotonic() + timeout, next_kill()
  code = None
  try:
    while code is None:
      if time.monotonic() > deadline:
        raise TimeoutError(f"the job ran over {timeout:g} s; logs in {log_dir}")
      # No kill once a worker has finished the run (exited 0): a worker killed then would be restarted to wait for a
      # peer that is gone, a case of a scheduler's, not of the run's.
      if made_kills < kills and time.monotonic() >= kill_at and 0 not in codes:
        alive = [index for index, process in processes.items() if process.poll() is None]
        if alive:
          processes[rng.choice(alive)].kill()
          made_kills += 1
        kill_at = next_kill()
      for index, process in list(processes.items()):
        returncode = process.poll()
        if returncode is None:
          continue
        codes.append(returncode)
        del processes[index]
        if returncode == 0:
          code = 0 if index == 0 else code
        elif exit_codes.retryable(returncode):
          start(index)
          restarts += 1
        else:
          code = returncode
      time.sleep(_POLL_SECONDS)
    # The chief is done: the other workers end on their own (a scheduler would stop them after a while).
    for process in processes.values():
      try:
        process.wait(timeout=_FINISH_SECONDS if code == 0 else 0)
      except subprocess.TimeoutExpired:
        pass
  finally:
    for process in processes.values():
      if process.poll() is None:
        process.kill()
      process.wait()
  return JobResult(code, made_kills, restarts, codes, logs)


def _trainer_command(workdir: str, data_dir: str, ids: str) -> list[str]:
  return [sys.executable, "-m", "trainer.main", f"--data_dir={data_dir}", f"--workdir={workdir}",
          "--strategy=multi_worker", "--backbone=mobilenet", "--alpha=0.25", "--weights=none",
          f"--image_size={FLAGS.image_size}", f"--batch_size={FLAGS.batch_size}", "--frozen_epochs=0",
          f"--finetune_epochs={FLAGS.epochs}", f"--example_log={ids}", "--verbosity=-1", "--peer_timeout=120"]


def seen_per_epoch(example_log: str) -> list[list[int]]:
  """[distinct, total] ids trained on per epoch over all workers, from each worker's last record of the epoch."""
  last = {}
  for name in sorted(os.listdir(example_log)):
    with open(os.path.join(example_log, name), encoding="utf-8") as f:
      for line in f:
        record = json.loads(line)
        if "epoch" in record:
          last[(record["worker"], record["epoch"])] = record["ids"]
  seen = []
  for epoch in sorted({epoch for _, epoch in last}):
    trained = [i for (_, e), ids in last.items() if e == epoch for i in ids]
    seen.append([len(set(trained)), len(trained)])
  return seen


def histories_match(history: list[dict], reference: list[dict]) -> bool:
  return len(history) == len(reference) and all(
      abs(record[name] - expected[name]) <= _TOLERANCE for record, expected in zip(history, reference)
      for name in _COMPARED)


def _cluster(workers: int, data_dir: str, root: str, name: str, kill_every: float = 0.0) -> dict:
  workdir, ids = os.path.join(root, f"run_{name}"), os.path.join(root, f"ids_{name}")
  result = supervise(_trainer_command(workdir, data_dir, ids), workers, os.path.join(root, f"logs_{name}"),
                     kill_every, FLAGS.kills if kill_every else 0, FLAGS.seed, FLAGS.job_timeout)
  if result.code != 0:
    with open(result.logs[-1], encoding="utf-8") as f:
      raise SystemExit(f"the {name} job failed with exit code {result.code}; the last log:\n{f.read()[-3000:]}")
  records = [json.loads(line) for file in sorted(os.listdir(ids))
             for line in open(os.path.join(ids, file), encoding="utf-8")]
  shares = {r["worker"]: r["decoded"] for r in records if "decoded" in r}
  with open(os.path.join(workdir, "report", "history.json"), encoding="utf-8") as f:
    history = json.load(f)
  # Steady steps only: the first step of an epoch traces and compiles the step function.
  steady = [FLAGS.batch_size / r["steady_images_per_sec"] for r in history if r.get("steady_images_per_sec")]
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    facts = json.load(f)["run"]
  model_dir = os.path.join(workdir, "export", "classifier")
  return {"decoded_per_worker": [shares[w] for w in sorted(shares)], "seen_per_epoch": seen_per_epoch(ids),
          "seconds_per_step": float(np.median(steady)) if steady else None, "train_examples": facts["train_examples"],
          "history": history, "exports": sorted(os.listdir(model_dir)) if os.path.isdir(model_dir) else [],
          "kills": result.kills, "restarts": result.restarts, "exit_codes": result.exit_codes}


def main(argv: list[str]) -> dict:
  """Runs the clusters, prints and writes --json; returns the figures."""
  bench.parse_flags(FLAGS, argv, __doc__)
  with tempfile.TemporaryDirectory() as root:
    data_dir = os.path.join(root, "data")
    _draw(data_dir, FLAGS.images)
    start = time.perf_counter()
    cluster = _cluster(FLAGS.workers, data_dir, root, "cluster")
    figures = {"dataset_size": cluster["train_examples"], "workers": FLAGS.workers,
               "global_batch_size": FLAGS.batch_size, "decoded_per_worker": cluster["decoded_per_worker"],
               "seen_per_epoch": cluster["seen_per_epoch"]}
    if FLAGS.kill_every:
      killed = _cluster(FLAGS.workers, data_dir, root, "killed", FLAGS.kill_every)
      figures.update({"kills": killed["kills"], "restarts": killed["restarts"],
                      "final_history_matches": histories_match(killed["history"], cluster["history"]),
                      "seen_per_epoch": killed["seen_per_epoch"], "uninterrupted_seen_per_epoch":
                      cluster["seen_per_epoch"], "exports": len(killed["exports"]),
                      "exit_codes": killed["exit_codes"]})
    else:
      single = _cluster(1, data_dir, root, "single")
      figures.update({"seconds_per_step": {"1": single["seconds_per_step"],
                                           str(FLAGS.workers): cluster["seconds_per_step"]},
                      "single_worker": {"decoded_per_worker": single["decoded_per_worker"],
                                        "seen_per_epoch": single["seen_per_epoch"]}})
    figures["seconds"] = time.perf_counter() - start
  print(json.dumps(figures))
  bench.write_figures(figures, FLAGS.json)
  return figures


if __name__ == "__main__":
  bench.run(main)
