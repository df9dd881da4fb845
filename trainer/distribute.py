"""Runtime: which tf.distribute strategy runs the training, in which precision, and who writes where.

Kept apart from data and model: they are built inside the strategy's scope but know nothing of it.
Multi-worker follows TensorFlow's conventions: TF_CONFIG describes the cluster, the chief (worker 0 when there is
no "chief" job) writes the run's real files, every other worker writes the same files to a temporary folder of
its own (saving can involve collective ops, so all workers save) and removes it at the end.

`python -m trainer.distribute --workers=HOST:PORT,HOST:PORT --index=I` prints worker I's TF_CONFIG (used by
launch/multi_worker.sh).

A cluster is checked before TensorFlow forms it: TF_CONFIG is read and checked here (one line per mistake), and
every worker waits for its peers for at most --peer_timeout seconds, saying who is missing, with SIGTERM and Ctrl-C
honoured. A peer lost once training runs ends the worker in one line naming it, with exit_codes.PEER_LOST.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import sys
import time

import keras
import tensorflow as tf
from absl import logging

from trainer import exit_codes
from trainer.config import RuntimeConfig
from trainer.errors import UserInputError, exit_on_user_error

# Exit code of a run that saved a checkpoint on SIGTERM (trainer.exit_codes has the table).
PREEMPTED_EXIT_CODE = exit_codes.PREEMPTED
# The jobs of TF_CONFIG that train under MultiWorkerMirroredStrategy (TensorFlow's evaluator and ps jobs do not).
TRAINING_JOBS = ("chief", "worker")
# While waiting for peers: the first line saying who is missing after this many seconds, then one every
# REPORT_EVERY_SECONDS (peers usually come within seconds; a line per probe would bury the rest of the log).
FIRST_REPORT_SECONDS = 10.0
REPORT_EVERY_SECONDS = 30.0
_PROBE_SECONDS = 0.5


def create_strategy(config: RuntimeConfig) -> tf.distribute.Strategy:
  name = config.strategy
  if name == "default":
    return tf.distribute.get_strategy()
  if name == "one_device":
    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
  if name == "mirrored":
    # Every GPU; without GPUs every logical CPU device (one, unless the CPU was split into logical devices).
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
      return tf.distribute.MirroredStrategy([device.name for device in gpus])
    # Logical CPUs share one memory: reducing on one device is all they need, and collective ops keyed per
    # process collide when a process creates a second strategy (seen in the tests: "Shape mismatch in the
    # collective instance").
    return tf.distribute.MirroredStrategy([device.name for device in tf.config.list_logical_devices("CPU")],
                                          cross_device_ops=tf.distribute.ReductionToOneDevice())
  if name == "multi_worker":
    cluster = cluster_from_tf_config()
    if cluster is None:
      logging.warning("--strategy=multi_worker without TF_CONFIG: this process trains alone. "
                      "launch/multi_worker.sh sets TF_CONFIG for each worker.")
    elif cluster.peers:
      wait_for_peers(cluster, config.peer_timeout)
    with exit_on_peer_loss():
      return tf.distribute.MultiWorkerMirroredStrategy()
  if name == "tpu":
    try:
      resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=config.tpu or None)
      tf.config.experimental_connect_to_cluster(resolver)
      tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, tf.errors.OpError) as e:  # No TPU here: 41 lines of resolver traceback before.
      where = f"--tpu={config.tpu}" if config.tpu else "this machine (and TPU_NAME)"
      raise UserInputError(f"--strategy=tpu: no TPU found at {where} ({str(e).strip().splitlines()[0][:160]}). "
                           "Run on a TPU VM, pass --tpu=ADDRESS, or choose another --strategy.") from None
    return tf.distribute.TPUStrategy(resolver)
  raise ValueError(f"strategy {name!r} is not one of trainer.config.STRATEGIES")  # Refused at start.


@dataclasses.dataclass(frozen=True)
class BatchPlan:
  """How the global batch is split over the replicas, and how much the learning rates scale for it."""
  global_batch_size: int
  num_replicas: int
  per_replica_batch_size: int
  lr_scale: float


def plan_batches(batch_size: int, num_replicas: int, lr_base_batch_size: int) -> BatchPlan:
  """Per-replica batch of a global batch; linear learning-rate scaling (Goyal et al. 2017) from a base batch."""
  if batch_size < num_replicas or batch_size % num_replicas:
    fits = max(num_replicas, batch_size // num_replicas * num_replicas)
    raise UserInputError(f"--batch_size={batch_size} is global and must split evenly over the {num_replicas} "
                         f"replicas of this strategy: use a multiple of {num_replicas}, e.g. {fits}.")
  if lr_base_batch_size < 0:
    raise UserInputError(f"--lr_base_batch_size={lr_base_batch_size} must be 0 (rates as given) or the global "
                         "batch size the learning rates were chosen for.")
  lr_scale = batch_size / lr_base_batch_size if lr_base_batch_size else 1.0
  return BatchPlan(batch_size, num_replicas, batch_size // num_replicas, lr_scale)


def resolve_precision(config: RuntimeConfig, strategy: tf.distribute.Strategy) -> str:
  """The Keras dtype policy name: auto picks what the device gains from (float32 on CPU, measured here)."""
  choice = config.mixed_precision
  if choice == "auto":
    if isinstance(strategy, tf.distribute.TPUStrategy):
      choice = "bfloat16"
    elif any(_compute_capability(gpu) >= (7, 0) for gpu in tf.config.list_physical_devices("GPU")):
      choice = "float16"
    else:
      choice = "float32"
  return {"float16": "mixed_float16", "bfloat16": "mixed_bfloat16", "float32": "float32"}[choice]


def _compute_capability(gpu) -> tuple[int, int]:
  details = tf.config.experimental.get_device_details(gpu)
  return tuple(details.get("compute_capability", (0, 0)))


def set_precision(policy: str) -> None:
  keras.mixed_precision.set_dtype_policy(policy)
  if policy != "float32":
    logging.info("Mixed precision policy: %s", policy)


def needs_loss_scaling(policy: str) -> bool:
  """float16 gradients underflow without loss scaling; bfloat16 has float32's range and needs none."""
  return policy == "mixed_float16"


def _cluster(strategy: tf.distribute.Strategy):
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.cluster_spec().as_dict():
    return None
  return resolver


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  resolver = _cluster(strategy)
  if resolver is None:
    return True
  return resolver.task_type in (None, "chief") or (resolver.task_type == "worker" and resolver.task_id == 0
                                                   and "chief" not in resolver.cluster_spec().as_dict())


def input_shard(strategy: tf.distribute.Strategy) -> tuple[int, int]:
  """(index, count) of this worker's input pipeline: the chief first, then the workers, as TensorFlow's
  multi-worker strategy numbers them (InputContext.input_pipeline_id); (0, 1) without a cluster."""
  resolver = _cluster(strategy)
  if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return 0, 1
  spec = resolver.cluster_spec().as_dict()
  tasks = [(job, index) for job in ("chief", "worker") for index in range(len(spec.get(job, [])))]
  return tasks.index((resolver.task_type, resolver.task_id)), len(tasks)


def write_dir(workdir: str, strategy: tf.distribute.Strategy) -> str:
  """Where this process writes the run's files: the workdir on the chief, workdir/workertemp_<id> elsewhere."""
  if is_chief(strategy):
    return workdir
  resolver = _cluster(strategy)
  return os.path.join(workdir, f"workertemp_{resolver.task_type}_{resolver.task_id}")


def remove_worker_files(workdir: str, strategy: tf.distribute.Strategy) -> None:
  """Removes a non-chief worker's temporary folder (nothing on the chief)."""
  if not is_chief(strategy):
    shutil.rmtree(write_dir(workdir, strategy), ignore_errors=True)


def preemption_handler(strategy: tf.distribute.Strategy, manager: tf.train.CheckpointManager,
                       save_fn, exit_fn) -> tf.distribute.experimental.PreemptionCheckpointHandler:
  """TensorFlow's SIGTERM handling: on a signal to any worker, all save at the same step, then `exit_fn` runs.

  `manager` reads the run's real checkpoints (every worker restores the chief's); `save_fn` writes to this
  process's own write path. Restores the latest checkpoint of `manager`, if there is one.
  """
  return tf.distribute.experimental.PreemptionCheckpointHandler(
      _cluster(strategy), manager,
      termination_config=tf.distribute.experimental.TerminationConfig(exit_fn=exit_fn, save_fn=save_fn))


def end_preemption_handling(handler: tf.distribute.experimental.PreemptionCheckpointHandler) -> None:
  """After the last train step: stops the handler's watcher threads while every worker is still alive, and gives
  SIGTERM back its default action (what is left to do after the last checkpoint need not be saved)."""
  # The handler has no public close(); its __del__ stops the threads, but the SIGTERM handler it installed keeps
  # it alive until exit, when the chief (and the cluster's coordination service with it) may be gone.
  handler.__del__()
  signal.signal(signal.SIGTERM, signal.SIG_DFL)


@tf.function
def _all_replicas_sum(strategy: tf.distribute.Strategy):
  return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.constant(1.0)), axis=None)


def wait_for_all_workers(strategy: tf.distribute.Strategy) -> None:
  """Returns when every worker has got here (a collective op), so that no worker exits while another still
  needs the cluster (the chief exporting, say). Immediate for single-worker strategies."""
  if _cluster(strategy) is not None and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    _all_replicas_sum(strategy)


@dataclasses.dataclass(frozen=True)
class Task:
  """One training task of TF_CONFIG's cluster."""
  job: str
  index: int
  address: str

  @property
  def name(self) -> str:
    return f"{self.job} {self.index} ({self.address})"


@dataclasses.dataclass(frozen=True)
class Cluster:
  """TF_CONFIG's training tasks (chief first, then the workers) and which of them this process is."""
  tasks: tuple[Task, ...]
  me: Task

  @property
  def peers(self) -> tuple[Task, ...]:
    return tuple(task for task in self.tasks if task != self.me)


def cluster_from_tf_config(text: str | None = None) -> Cluster | None:
  """TF_CONFIG (`text`, else the environment's) checked: None without one; UserInputError naming the mistake for
  one TensorFlow would reject with a traceback, or hang on (a task outside the cluster)."""
  text = os.environ.get("TF_CONFIG") if text is None else text
  if not text or not text.strip():
    return None
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise UserInputError(f"TF_CONFIG is not JSON ({e.msg} at character {e.pos}): give "
                         '{"cluster": {"worker": ["HOST:PORT", ...]}, "task": {"type": "worker", "index": I}} '
                         "(python -m trainer.distribute --workers=... --index=I prints one).") from None
  if not isinstance(value, dict) or not isinstance(value.get("cluster"), dict) or not isinstance(
      value.get("task"), dict):
    raise UserInputError('TF_CONFIG must be a JSON object with a "cluster" object (job: ["HOST:PORT", ...]) and a '
                         f'"task" object (type, index); it is {_short(text)}.')
  jobs = value["cluster"]
  for job, addresses in jobs.items():
    if job not in (*TRAINING_JOBS, "evaluator"):
      raise UserInputError(f'TF_CONFIG names a "{job}" job: --strategy=multi_worker trains with "chief" and '
                           '"worker" tasks only (no parameter servers).')
    if not isinstance(addresses, list) or not all(isinstance(a, str) and _port_of(a) for a in addresses):
      raise UserInputError(f'TF_CONFIG\'s "{job}" job must be a list of "HOST:PORT" strings; it is {addresses!r}.')
  if len(jobs.get("chief", [])) > 1:
    raise UserInputError(f'TF_CONFIG names {len(jobs["chief"])} chiefs: a cluster has at most one.')
  task = value["task"]
  job, index = task.get("type"), task.get("index")
  if job not in TRAINING_JOBS or job not in jobs:
    raise UserInputError(f'TF_CONFIG\'s task type {job!r} is not one of the cluster\'s training jobs '
                         f'({", ".join(j for j in TRAINING_JOBS if j in jobs) or "none"}).')
  if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(jobs[job]):
    raise UserInputError(f'TF_CONFIG\'s task index {index!r} is not a number in 0..{len(jobs[job]) - 1} (the '
                         f'"{job}" job has {len(jobs[job])} tasks).')
  tasks = tuple(Task(name, i, address) for name in TRAINING_JOBS for i, address in enumerate(jobs.get(name, [])))
  if len({t.address for t in tasks}) != len(tasks):
    raise UserInputError(f"TF_CONFIG names an address twice: {', '.join(t.address for t in tasks)}.")
  return Cluster(tasks, next(t for t in tasks if (t.job, t.index) == (job, index)))


def _short(text: str, limit: int = 80) -> str:
  text = " ".join(text.split())
  return text if len(text) <= limit else text[:limit] + "..."


def _port_of(address: str) -> int | None:
  host, _, port = address.rpartition(":")
  return int(port) if host and port.isdigit() and 0 < int(port) < 65536 else None


def _host_of(address: str) -> str:
  return address.rpartition(":")[0].strip("[]")


class _StopSignal(Exception):
  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = signum


@contextlib.contextmanager
def _signals_stop_the_wait():
  """SIGTERM and SIGINT end the wait (restoring the handlers after it): a scheduler's graceful stop works."""
  def stop(signum, frame):
    del frame
    raise _StopSignal(signum)
  previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


def wait_for_peers(cluster: Cluster, timeout_seconds: float) -> None:
  """Returns once every peer of `cluster` accepts connections at its address; ends the command (SystemExit) with
  one line and exit_codes.PEER_LOST when one has not within `timeout_seconds`, or with 143/130 on SIGTERM/SIGINT.

  TensorFlow's own wait (the strategy's constructor) holds the GIL in C++ for as long as a peer is missing: no
  Python thread or signal handler runs, so it can neither be bounded nor stopped from here. This wait happens
  before it, in Python: while waiting, every worker listens at its own TF_CONFIG port (so that its peers see it
  has come), and probes its peers' ports; a peer already in TensorFlow's constructor listens there too.
  """
  start = time.monotonic()
  next_report = start + FIRST_REPORT_SECONDS
  listener = None
  missing = list(cluster.peers)
  try:
    with _signals_stop_the_wait():
      while True:
        listener = listener or _listen(_port_of(cluster.me.address))
        _accept_pending(listener)
        # Every peer each time: one seen earlier may have gone since (TensorFlow's wait would then never end).
        missing = [peer for peer in cluster.peers if not _reachable(peer.address)]
        waited = time.monotonic() - start
        if not missing:
          break
        if waited >= timeout_seconds:
          _stop(f"{_names(missing)} did not come within --peer_timeout={timeout_seconds:g} s (this is "
               f"{cluster.me.name}). Start every worker of TF_CONFIG, or raise --peer_timeout.",
               exit_codes.PEER_LOST)
        if time.monotonic() >= next_report:
          logging.warning("Waiting for %s: %.0f s of --peer_timeout=%g s.", _names(missing), waited, timeout_seconds)
          next_report += REPORT_EVERY_SECONDS
        time.sleep(_PROBE_SECONDS)
  except _StopSignal as stop:
    name, code = (("SIGTERM", exit_codes.PREEMPTED) if stop.signum == signal.SIGTERM
                  else ("Ctrl-C", exit_codes.INTERRUPTED))
    _stop(f"Stopped by {name} while waiting for {_names(missing)}: nothing was trained in this start.", code)
  finally:
    if listener is not None:
      listener.close()
  if time.monotonic() - start >= FIRST_REPORT_SECONDS:
    logging.warning("Every worker has come (after %.0f s).", time.monotonic() - start)


def _listen(port: int) -> socket.socket | None:
  """A socket listening at `port` on every interface (as TensorFlow's server will), or None while the port is
  still taken (a previous process of this worker that is ending): the next probe tries again."""
  try:
    listener = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
  except (OSError, ValueError):
    try:
      listener = socket.create_server(("", port))
    except OSError:
      return None
  listener.setblocking(False)
  return listener


def _accept_pending(listener: socket.socket | None) -> None:
  """Closes the connections of peers' probes, so that the backlog never fills."""
  while listener is not None:
    try:
      connection, _ = listener.accept()
    except (BlockingIOError, OSError):
      return
    connection.close()


def _reachable(address: str) -> bool:
  try:
    with socket.create_connection((_host_of(address), _port_of(address)), timeout=1.0):
      return True
  except OSError:  # Refused, unreachable, or a name not yet in DNS (a pod not yet scheduled).
    return False


def _names(tasks) -> str:
  return ", ".join(task.name for task in tasks)


def _stop(message: str, code: int) -> None:
  """One line on stderr and SystemExit(code): before the cluster is formed, an ordinary exit is safe."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  raise SystemExit(code)


def _end(message: str, code: int) -> None:
  """One line on stderr and exit `code`, from anywhere: os._exit, because after a peer is lost TensorFlow's
  shutdown can wait for it (the coordination service's barrier), and exit handlers must not run again."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(code)


# Errors of a collective op or of the coordination service when a peer is gone (or restarted with a new
# incarnation): TensorFlow raises these from the step, the evaluation or the strategy's constructor.
_PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.DeadlineExceededError,
                tf.errors.CancelledError)


@contextlib.contextmanager
def exit_on_peer_loss():
  """Under a multi-worker TF_CONFIG: a peer's loss ends this worker in one line naming the peer and
  exit_codes.PEER_LOST (retried by schedulers), instead of a traceback and exit 1. The workdir is consistent: the
  error comes from a collective, between this process's writes (each checkpoint and report file is written whole
  or not at all), and a restart resumes from the last checkpoint. Other errors, and single-worker runs, pass."""
  try:
    yield
  except _PEER_ERRORS as e:
    cluster = cluster_from_tf_config()
    if cluster is None or not cluster.peers:
      raise
    # TensorFlow's message starts with the op's name in braces and runs over lines: its words, shortened.
    reason = _short(re.sub(r"\{\{[^}]*\}\}", "", str(e)), 160)
    _end(f"lost {_lost_peer(cluster, str(e))} ({type(e).__name__}: {reason}). This is {cluster.me.name}; restart "
         "the job to continue from the last checkpoint.", exit_codes.PEER_LOST)


def _lost_peer(cluster: Cluster, message: str) -> str:
  """The peers a TensorFlow error names (/job:worker/replica:0/task:1 or /job:worker/task:1), else the peers it may
  be."""
  named = {(job, int(index)) for job, index in re.findall(r"/job:(\w+)(?:/replica:\d+)?/task:(\d+)", message)}
  lost = [peer for peer in cluster.peers if (peer.job, peer.index) in named]
  if lost:
    return _names(lost)
  return _names(cluster.peers) if len(cluster.peers) == 1 else f"a peer (one of {_names(cluster.peers)})"


def tf_config(workers: list[str], index: int) -> dict:
  """TF_CONFIG of worker `index` in a cluster of `workers` (HOST:PORT each); worker 0 is the chief."""
  if not workers:
    raise UserInputError("--workers is empty: give HOST:PORT of every worker, the chief first.")
  for address in workers:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
      raise UserInputError(f"--workers: '{address}' is not HOST:PORT.")
  if len(set(workers)) != len(workers):
    raise UserInputError(f"--workers names an address twice: {','.join(workers)}.")
  if not 0 <= index < len(workers):
    raise UserInputError(f"--index={index} is not a worker of the {len(workers)} given (0..{len(workers) - 1}).")
  return {"cluster": {"worker": list(workers)}, "task": {"type": "worker", "index": index}}


def _main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(prog="python -m trainer.distribute", description="Print one worker's TF_CONFIG.")
  parser.add_argument("--workers", required=True, help="HOST:PORT,HOST:PORT,... of every worker, the chief first.")
  parser.add_argument("--index", type=int, required=True, help="Which worker (0 is the chief).")
  args = parser.parse_args(argv)
  with exit_on_user_error():
    print(json.dumps(tf_config([w.strip() for w in args.workers.split(",") if w.strip()], args.index)))


if __name__ == "__main__":
  _main(sys.argv[1:])
