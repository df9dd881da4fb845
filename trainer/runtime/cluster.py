"""TF_CONFIG, read and checked before TensorFlow forms a cluster, and the bounded wait for the peers it names.

No TensorFlow here: a malformed TF_CONFIG is one line before anything loads, and `tf_config` is what
`python -m trainer.cluster` prints at once (launch/multi_worker.sh).
"""

import contextlib
import dataclasses
import json
import os
import signal
import socket
import sys
import time

from absl import logging

from trainer import exit_codes
from trainer.errors import UserInputError

# The jobs of TF_CONFIG that train under MultiWorkerMirroredStrategy (TensorFlow's evaluator and ps jobs do not).
TRAINING_JOBS = ("chief", "worker")
# While waiting for peers: the first line saying who is missing after this many seconds, then one every
# REPORT_EVERY_SECONDS (peers usually come within seconds; a line per probe would bury the rest of the log).
FIRST_REPORT_SECONDS = 10.0
REPORT_EVERY_SECONDS = 30.0
_PROBE_SECONDS = 0.5


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
                         "(python -m trainer.cluster --workers=... --index=I prints one).") from None
  if not isinstance(value, dict) or not isinstance(value.get("cluster"), dict) or not isinstance(
      value.get("task"), dict):
    raise UserInputError('TF_CONFIG must be a JSON object with a "cluster" object (job: ["HOST:PORT", ...]) and a '
                         f'"task" object (type, index); it is {short(text)}.')
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


def short(text: str, limit: int = 80) -> str:
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
          _stop(f"{names(missing)} did not come within --peer_timeout={timeout_seconds:g} s (this is "
               f"{cluster.me.name}). Start every worker of TF_CONFIG, or raise --peer_timeout.",
               exit_codes.PEER_LOST)
        if time.monotonic() >= next_report:
          logging.warning("Waiting for %s: %.0f s of --peer_timeout=%g s.", names(missing), waited, timeout_seconds)
          next_report += REPORT_EVERY_SECONDS
        time.sleep(_PROBE_SECONDS)
  except _StopSignal as stop:
    name, code = (("SIGTERM", exit_codes.PREEMPTED) if stop.signum == signal.SIGTERM
                  else ("Ctrl-C", exit_codes.INTERRUPTED))
    _stop(f"Stopped by {name} while waiting for {names(missing)}: nothing was trained in this start.", code)
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


def names(tasks) -> str:
  return ", ".join(task.name for task in tasks)


def _stop(message: str, code: int) -> None:
  """One line on stderr and SystemExit(code): before the cluster is formed, an ordinary exit is safe."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  raise SystemExit(code)


def tf_config(workers: list[str], index: int) -> dict:
  """TF_CONFIG of worker `index` in a cluster of `workers` (HOST:PORT each); worker 0 is the chief."""
  if not workers:
    raise UserInputError("--workers is empty: give HOST:PORT of every worker, the chief first.")
  for address in workers:
    if _port_of(address) is None:  # The check TF_CONFIG's addresses get (cluster_from_tf_config).
      raise UserInputError(f"--workers: '{address}' is not HOST:PORT.")
  if len(set(workers)) != len(workers):
    raise UserInputError(f"--workers names an address twice: {','.join(workers)}.")
  if not 0 <= index < len(workers):
    raise UserInputError(f"--index={index} is not a worker of the {len(workers)} given (0..{len(workers) - 1}).")
  return {"cluster": {"worker": list(workers)}, "task": {"type": "worker", "index": index}}
