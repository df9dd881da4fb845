"""The one table of exit codes of every command, and what a scheduler should do with each.

Kubeflow's training operator (restartPolicy: ExitCode) retries a pod whose exit code is 128 or more and fails the
job on any other non-zero code; Vertex AI and a shell loop can follow the same rule. So every fault that a restart
cures (a preemption, a lost peer) exits with a code >= 128, and every mistake that a restart repeats (a bad flag,
a wrong file) with one below it. README.md has this table for users; launch/ follows it.
"""

# The run finished (or had nothing left to do): its files are complete.
DONE = 0
# An unexpected error (a bug, or a fault we do not know): a traceback was printed. Not retried automatically.
CRASHED = 1
# A mistake the user can fix (a flag, a file, a full disk): one line names it. Nothing was lost; rerunning the
# same command repeats it until it is fixed.
USER_ERROR = 2
# Stopped by Ctrl-C (SIGINT) after saving a checkpoint: run the same command again to continue.
INTERRUPTED = 130
# Stopped by SIGTERM (a scheduler's preemption) after saving a checkpoint: restart to continue.
PREEMPTED = 143

TABLE = (
    (DONE, "done", "no", "the finished run: checkpoints, report, export"),
    (CRASHED, "unexpected error (traceback)", "no", "the last checkpoint; a rerun continues from it"),
    (USER_ERROR, "user mistake, one line names the flag or file", "no: fix the command",
     "nothing new (checked before any work) or the last checkpoint"),
    (INTERRUPTED, "Ctrl-C, checkpoint saved", "yes (the same command continues)", "a checkpoint of the step reached"),
    (PREEMPTED, "SIGTERM, checkpoint saved", "yes", "a checkpoint of the step reached"),
)


def retryable(code: int) -> bool:
  """What a scheduler following this table (and Kubeflow's ExitCode policy) does: restart on 128 and above."""
  return code >= 128
