#!/usr/bin/env bash
# Multi-worker training (MultiWorkerMirroredStrategy): one process per host, each with its own TF_CONFIG.
# Usage:
#   launch/multi_worker.sh HOST:PORT,HOST:PORT[,...] --data_dir=DIR --workdir=DIR [more trainer flags]
# The first host is the chief: it writes the workdir's checkpoints, TensorBoard logs, report and export; the other
# workers write to temporary folders inside the workdir and remove them at the end. --workdir and --data_dir must
# name the same storage on every host (a shared file system). Workers on 127.0.0.1/localhost start here;
# others start over ssh (SSH overrides the command, REMOTE_DIR the checkout's folder on the remote hosts).
# Exit codes follow trainer/exit_codes.py: when a worker ends with one a restart cures (138 a lost peer, 143
# SIGTERM, 137 SIGKILL, 130 Ctrl-C), the job is started again from its last checkpoint, up to RESTARTS times
# (default 3); a user error (2) or a crash (1) stops every worker and ends the job with that code. Exits 0 when the
# chief finished. Ctrl-C or SIGTERM to this script stops the workers (they save a checkpoint) without a restart.
set -uo pipefail
if [ $# -lt 1 ] || [[ "$1" == --* ]]; then
  sed -n '2,12p' "$0" >&2
  exit 2
fi
WORKERS="$1"; shift
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
SSH="${SSH:-ssh}"
REMOTE_DIR="${REMOTE_DIR:-$PWD}"
RESTARTS="${RESTARTS:-3}"
# Seconds the other workers get to end on their own once the job's end is decided (a lost peer is noticed within
# about 10 s), then to save and stop after SIGTERM, before SIGKILL.
GRACE_SECONDS="${GRACE_SECONDS:-60}"
IFS=',' read -r -a HOSTS <<< "$WORKERS"

retryable() {  # The one table: trainer/exit_codes.py (which imports nothing else).
  "$PYTHON" -c 'import sys; from trainer import exit_codes as e; sys.exit(0 if e.retryable(int(sys.argv[1])) else 1)' \
    "$1"
}

start_workers() {
  pids=(); chief_pid=""
  for index in "${!HOSTS[@]}"; do
    tf_config="$("$PYTHON" -m trainer.cluster --workers="$WORKERS" --index="$index")" || exit 2
    host="${HOSTS[$index]%:*}"
    if [ "$host" = "127.0.0.1" ] || [ "$host" = "localhost" ]; then
      TF_CONFIG="$tf_config" "$PYTHON" -m trainer.main --strategy=multi_worker "$@" &
    else
      $SSH "$host" "cd $(printf %q "$REMOTE_DIR") && TF_CONFIG=$(printf %q "$tf_config") $(printf %q "$PYTHON")" \
        "-m trainer.main --strategy=multi_worker $(printf '%q ' "$@")" &
    fi
    pids+=($!)
    [ -n "$chief_pid" ] || chief_pid=$!
  done
}

# The job's code so far and a worker's: the chief's 0 wins, then the first code a restart would not cure, then the
# first one it would.
decide() {
  local code=$1 pid=$2
  if [ "$pid" = "$chief_pid" ] && [ "$code" -eq 0 ]; then
    job_code=0
  elif [ "$code" -ne 0 ] && [ "$job_code" != 0 ]; then
    if ! retryable "$code"; then
      if [ -z "$job_code" ] || retryable "$job_code"; then job_code=$code; fi
    elif [ -z "$job_code" ]; then
      job_code=$code
    fi
  fi
}

run_job() {
  start_workers "$@"
  local live=("${pids[@]}") timer="" stage=0 finished code
  job_code=""
  while [ ${#live[@]} -gt 0 ]; do
    finished=""
    wait -n -p finished "${live[@]}" ${timer:+"$timer"}
    code=$?
    [ -n "$finished" ] || continue  # A signal to this script (the trap stops the workers).
    if [ "$finished" = "$timer" ]; then
      stage=$((stage + 1))
      if [ $stage -eq 1 ]; then kill -TERM "${live[@]}" 2>/dev/null; else kill -KILL "${live[@]}" 2>/dev/null; fi
      sleep "$GRACE_SECONDS" & timer=$!
      continue
    fi
    local still=()
    for pid in "${live[@]}"; do [ "$pid" = "$finished" ] || still+=("$pid"); done
    live=("${still[@]+"${still[@]}"}")
    decide "$code" "$finished"
    if [ -n "$job_code" ] && [ -z "$timer" ] && [ ${#live[@]} -gt 0 ]; then
      if [ "$job_code" != 0 ] && ! retryable "$job_code"; then kill -TERM "${live[@]}" 2>/dev/null; stage=1; fi
      sleep "$GRACE_SECONDS" & timer=$!
    fi
  done
  if [ -n "$timer" ]; then kill "$timer" 2>/dev/null; wait "$timer" 2>/dev/null; fi
  [ -n "$job_code" ] || job_code=0  # Every worker ended with 0 (the chief included).
}

stopping=""
trap 'stopping=1; kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM
attempt=0
while true; do
  run_job "$@"
  if [ "$job_code" -eq 0 ] || [ -n "$stopping" ] || ! retryable "$job_code" || [ "$attempt" -ge "$RESTARTS" ]; then
    exit "$job_code"
  fi
  attempt=$((attempt + 1))
  echo "launch/multi_worker.sh: a worker ended with exit code $job_code; starting the job again from its last" \
       "checkpoint (restart $attempt of $RESTARTS)." >&2
done
