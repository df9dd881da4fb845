"""The trainers' side of a tf.data service (and the servers python -m trainer.data_service starts): their input
pipeline sent to the dispatcher, decoded by its workers in `distributed_epoch` mode (each example of an epoch read
once, split among the workers and the trainers), every element counted.
"""

import re
import socket
import time
import urllib.parse

from trainer.errors import UserInputError

# TensorFlow is imported where it is used: --help, a flag mistake and a missing dispatcher answer without it.

# How long a trainer waits for the dispatcher to answer before it ends in an error (not a hang).
TRAINER_TIMEOUT_SECONDS = 30.0
_PROBE_INTERVAL_SECONDS = 0.5


def host_and_port(address: str, flag: str = "--data_service") -> tuple[str, int]:
  """('HOST', PORT) of 'grpc://HOST:PORT' or 'HOST:PORT'."""
  parsed = urllib.parse.urlsplit(address if "://" in address else f"grpc://{address}")
  try:
    port = parsed.port
  except ValueError:
    port = None
  if parsed.scheme != "grpc" or not parsed.hostname or port is None:
    raise UserInputError(f"{flag}={address}: give the dispatcher as grpc://HOST:PORT (e.g. grpc://dispatcher:5050).")
  return parsed.hostname, port


def wait_for_dispatcher(address: str, timeout: float = TRAINER_TIMEOUT_SECONDS, flag: str = "--data_service") -> None:
  """Returns once the dispatcher accepts connections; UserInputError naming it after `timeout` seconds (tf.data
  itself would retry forever)."""
  host, port = host_and_port(address, flag)
  deadline = time.monotonic() + timeout
  while True:
    try:
      with socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
        return
    except OSError as e:
      if time.monotonic() + _PROBE_INTERVAL_SECONDS > deadline:
        raise UserInputError(
            f"{flag}={address}: no tf.data service dispatcher answers at {host}:{port} after {timeout:g} s "
            f"({e.strerror or e}). Start one there (python -m trainer.data_service --dispatcher --port={port})"
            f"{', or drop the flag to decode in this process' if flag == '--data_service' else ''}.") from None
      time.sleep(_PROBE_INTERVAL_SECONDS)


def distribute(dataset: "tf.data.Dataset", address: str, job_name: str, elements: int,
               timeout: float = TRAINER_TIMEOUT_SECONDS) -> "tf.data.Dataset":
  """`dataset`, of `elements` elements, produced by the tf.data service at `address` in distributed_epoch mode:
  every element of an epoch once, split among the workers and among the consumers that share `job_name` (the
  trainers of one run).

  A service worker lost mid-epoch loses the elements it held (distributed_epoch hands each out at most once): the
  epoch ends short once the worker is back at its address, and `whole` turns that end into an error before the
  epoch is saved (trainer.runtime.distribute.exit_on_peer_loss: one line, exit 138, the epoch redone from the last
  checkpoint). Nothing bounds the wait for a worker that never comes back: this client retries it for as long as
  the job lists its task, and the dispatcher's worker_timeout_ms only marks it lost (for snapshots), leaving its
  task in the job (measured on TensorFlow 2.21)."""
  import tensorflow as tf
  wait_for_dispatcher(address, timeout)
  # ShardingPolicy.DYNAMIC is what processing_mode="distributed_epoch" names.
  return whole(dataset.apply(tf.data.experimental.service.distribute(
      processing_mode=tf.data.experimental.service.ShardingPolicy.DYNAMIC, service=_grpc(address),
      job_name=job_name)), elements)


# TensorFlow's words when a dispatcher restarted without its journal (--work_dir) no longer knows a trainer's job.
LOST_JOB = re.compile(r"Iteration id \d+ not found|Unknown iteration client id \d+")

# TensorFlow's words when a dataset under `whole` ends early.
SHORT_EPOCH = re.compile(r"expected to contain (\d+) elements but contained only (\d+) elements")


def whole(dataset: "tf.data.Dataset", elements: int) -> "tf.data.Dataset":
  """`dataset`, raising FailedPreconditionError (whose message SHORT_EPOCH matches) instead of ending when fewer
  than `elements` arrive: examples lost with a service worker are never trained as if the epoch had none."""
  import tensorflow as tf
  return dataset.apply(tf.data.experimental.assert_cardinality(elements))


def what_was_lost(error_message: str) -> str | None:
  """The one line a trainer ends with (exit 138: a restart continues) when a TensorFlow error says a part of the
  service was lost mid-run; None for any other error."""
  short = SHORT_EPOCH.search(error_message)
  if short:
    return (f"a tf.data service epoch ended after {short.group(2)} of its {short.group(1)} examples: a service worker "
            "was lost mid-epoch with the examples it held. Restart to redo the epoch from the last checkpoint "
            "(--data_service).")
  if LOST_JOB.search(error_message):
    return ("the tf.data service dispatcher no longer knows this trainer's job: it restarted without its journal. "
            "Restart to continue from the last checkpoint, and give the dispatcher --work_dir so that a restart "
            "keeps its jobs (--data_service).")
  return None


def _grpc(address: str) -> str:
  host, port = host_and_port(address)
  return f"grpc://{host}:{port}"


def start_dispatcher(port: int = 0, work_dir: str = "") -> "tf.data.experimental.service.DispatchServer":
  """A started DispatchServer (port 0: any free port; its address is `server.target`). work_dir: its journal, so
  a restarted dispatcher resumes the jobs (fault-tolerant mode)."""
  import tensorflow as tf
  config = tf.data.experimental.service.DispatcherConfig(port=port, work_dir=work_dir or None,
                                                         fault_tolerant_mode=bool(work_dir))
  return tf.data.experimental.service.DispatchServer(config)


def start_worker(dispatcher_address: str, port: int = 0, worker_address: str = "",
                 timeout: float = 60.0) -> "tf.data.experimental.service.WorkerServer":
  """A started WorkerServer registered with the dispatcher, reachable at worker_address:port (default: this
  machine's name; 'localhost' for a cluster on one machine). `timeout` bounds the first wait for the dispatcher and
  each later one (TensorFlow's own default is an hour)."""
  wait_for_dispatcher(dispatcher_address, timeout, flag="--dispatcher_address")
  import tensorflow as tf
  host, dispatcher_port = host_and_port(dispatcher_address, "--dispatcher_address")
  config = tf.data.experimental.service.WorkerConfig(
      dispatcher_address=f"{host}:{dispatcher_port}", port=port,
      worker_address=f"{worker_address or socket.getfqdn()}:%port%", dispatcher_timeout_ms=int(timeout * 1000))
  return tf.data.experimental.service.WorkerServer(config)
