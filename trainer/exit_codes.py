"""The one table of exit codes of every command, and what a scheduler should do with each.

Kubeflow's training operator (restartPolicy: ExitCode) decides in `IsRetryableExitCode`
(pkg/util/train/train_util.go). Its releases differ: older ones retry only 130, 137, 143 (Ctrl-C, SIGKILL, SIGTERM)
and 138 (128 + SIGUSR1, kept "for user defined retryable error"), and fail the job on every other code; newer ones
retry every code >= 128. So every fault that a restart cures exits with one of those four codes, which both retry,
and every mistake that a restart repeats (a bad flag, a wrong file) with a code below 128, which neither retries.
Vertex AI restarts a worker on any non-zero exit (a few times, then the whole job) and cannot be told which codes
are permanent. README.md has this table for users; launch/ follows it.
"""

# The run finished (or had nothing left to do): its files are complete.
DONE = 0
# An unexpected error (a bug, or a fault we do not know): a traceback was printed. Not retried automatically.
CRASHED = 1
# A mistake the user can fix (a flag, a file, a full disk, a malformed TF_CONFIG): one line names it. Nothing was
# lost; rerunning the same command repeats it until it is fixed.
USER_ERROR = 2
# Stopped by Ctrl-C (SIGINT) after saving a checkpoint: run the same command again to continue.
INTERRUPTED = 130
# Killed by SIGKILL (out of memory, a scheduler's forced stop): written by the system, never by us. Epochs whose
# checkpoint was written are kept; a restart continues.
KILLED = 137
# Multi-worker: another worker of the cluster was lost mid-run, or did not come within --peer_timeout (one line
# names it); or, with --data_service, a service worker was lost mid-epoch (the epoch came up short) or the
# dispatcher restarted without its journal. This worker's files are consistent (the last checkpoint); restart the
# whole job to continue.
PEER_LOST = 138
# Stopped by SIGTERM (a scheduler's preemption) after saving a checkpoint: restart to continue.
PREEMPTED = 143

# The codes both of Kubeflow's rules retry (see above): the ones a scheduler following this table restarts.
RETRYABLE = frozenset({INTERRUPTED, KILLED, PEER_LOST, PREEMPTED})


def retryable(code: int) -> bool:
  """Whether a scheduler following this table restarts a process that ended with `code`. A negative code (Python's
  subprocess for a process ended by signal N) is read as the shell's 128 + N."""
  return (128 - code if code < 0 else code) in RETRYABLE
