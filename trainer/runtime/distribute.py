"""Runtime: which tf.distribute strategy runs the training, in which precision, and who writes where.

Kept apart from data and model: they are built inside the strategy's scope but know nothing of it.
Multi-worker follows TensorFlow's conventions: TF_CONFIG describes the cluster, the chief (worker 0 when there is
no "chief" job) writes the run's real files, every other worker writes the same files to a temporary folder of
its own (saving can involve collective ops, so all workers save) and removes it at the end.

A cluster is checked before TensorFlow forms it (trainer.runtime.cluster: TF_CONFIG read and checked, one line per
mistake, and a bounded wait for the peers). A peer lost once training runs ends the worker in one line naming it,
with exit_codes.PEER_LOST.
"""

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import sys
import threading

import keras
import tensorflow as tf
from absl import logging

from trainer import exit_codes
from trainer.config import RuntimeConfig
from trainer.errors import UserInputError
from trainer.runtime import cluster as cluster_lib


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
    cluster = cluster_lib.cluster_from_tf_config()
    if cluster is None:
      logging.warning("--strategy=multi_worker without TF_CONFIG: this process trains alone. "
                      "launch/multi_worker.sh sets TF_CONFIG for each worker.")
    elif cluster.peers:
      cluster_lib.wait_for_peers(cluster, config.peer_timeout)
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


class CtrlCAsSigterm:
  """While epochs train, Ctrl-C (SIGINT) stops the run as SIGTERM does: TensorFlow's PreemptionCheckpointHandler
  saves a checkpoint at the next step, then the run exits (exit_codes.INTERRUPTED). Before, Ctrl-C raised
  KeyboardInterrupt wherever the loop was, lost the epoch's steps and printed a traceback."""

  def __init__(self):
    self.ctrl_c = False
    self._previous = None

  def __enter__(self) -> "CtrlCAsSigterm":
    if threading.current_thread() is threading.main_thread():  # Python's signal handlers live there only.
      self._previous = signal.signal(signal.SIGINT, self._on_sigint)
    return self

  def _on_sigint(self, signum, frame) -> None:
    self.ctrl_c = True
    signal.raise_signal(signal.SIGTERM)

  def __exit__(self, *exc_info) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)


def exit_after_checkpoint(completed_epochs: int, epoch_steps: int, ctrl_c: bool) -> None:
  """After the checkpoint PreemptionCheckpointHandler saved on SIGTERM (or Ctrl-C): one line and the exit code of
  the table in trainer.exit_codes (both are retryable: the same command continues)."""
  logging.warning("Stopped by %s: saved a checkpoint after %d step(s) of epoch %d. Run the same command again to "
                  "continue.", "Ctrl-C" if ctrl_c else "SIGTERM", epoch_steps, completed_epochs + 1)
  sys.exit(exit_codes.INTERRUPTED if ctrl_c else exit_codes.PREEMPTED)


def end_preemption_handling(handler: tf.distribute.experimental.PreemptionCheckpointHandler) -> bool:
  """After the last train step: stops the handler's watcher threads while every worker is still alive, and gives
  SIGTERM back its default action (what is left to do after the last checkpoint need not be saved). Returns whether
  this process got a SIGTERM (or Ctrl-C) that no step was left to act on: it was swallowed, and the run went on to
  its export past a scheduler's grace period. The last epoch's checkpoint is saved by then, so the caller exits as
  after a preemption checkpoint."""
  # The handler has no public state for it: its own flag, where this TensorFlow keeps it.
  received = getattr(handler, "_received_own_sigterm", None)
  signalled = received is not None and received.is_set()
  # The handler has no public close(); its __del__ stops the threads, but the SIGTERM handler it installed keeps
  # it alive until exit, when the chief (and the cluster's coordination service with it) may be gone.
  handler.__del__()
  signal.signal(signal.SIGTERM, signal.SIG_DFL)
  return signalled


@tf.function
def _all_replicas_sum(strategy: tf.distribute.Strategy):
  return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.constant(1.0)), axis=None)


def wait_for_all_workers(strategy: tf.distribute.Strategy) -> None:
  """Returns when every worker has got here (a collective op), so that no worker exits while another still
  needs the cluster (the chief exporting, say). Immediate for single-worker strategies."""
  if _cluster(strategy) is not None and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    _all_replicas_sum(strategy)


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
  or not at all), and a restart resumes from the last checkpoint. So does a tf.data service worker's loss, which
  leaves an epoch short (trainer.input.service.whole) before its history and checkpoint are saved. Other errors, and
  single-worker runs' peer errors, pass."""
  try:
    yield
  except (tf.errors.FailedPreconditionError, tf.errors.NotFoundError) as e:
    from trainer.input import service  # Only a --data_service input raises these as a lost part of the service.
    lost = service.what_was_lost(str(e))
    if lost is None:
      raise
    _end(lost, exit_codes.PEER_LOST)
  except _PEER_ERRORS as e:
    cluster = cluster_lib.cluster_from_tf_config()
    if cluster is None or not cluster.peers:
      raise
    # TensorFlow's message starts with the op's name in braces and runs over lines: its words, shortened.
    reason = cluster_lib.short(re.sub(r"\{\{[^}]*\}\}", "", str(e)), 160)
    _end(f"lost {_lost_peer(cluster, str(e))} ({type(e).__name__}: {reason}). This is {cluster.me.name}; restart "
         "the job to continue from the last checkpoint.", exit_codes.PEER_LOST)


def _lost_peer(cluster: cluster_lib.Cluster, message: str) -> str:
  """The peers a TensorFlow error names (/job:worker/replica:0/task:1 or /job:worker/task:1), else the peers it may
  be."""
  named = {(job, int(index)) for job, index in re.findall(r"/job:(\w+)(?:/replica:\d+)?/task:(\d+)", message)}
  lost = [peer for peer in cluster.peers if (peer.job, peer.index) in named]
  if lost:
    return cluster_lib.names(lost)
  return (cluster_lib.names(cluster.peers) if len(cluster.peers) == 1
          else f"a peer (one of {cluster_lib.names(cluster.peers)})")
