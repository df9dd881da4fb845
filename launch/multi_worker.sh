#!/usr/bin/env bash
# Multi-worker training (MultiWorkerMirroredStrategy): one process per host, each with its own TF_CONFIG.
# Usage:
#   launch/multi_worker.sh HOST:PORT,HOST:PORT[,...] --data_dir=DIR --workdir=DIR [more trainer flags]
# The first host is the chief: it writes the workdir's checkpoints, TensorBoard logs, report and export; the other
# workers write to temporary folders inside the workdir and remove them at the end. --workdir and --data_dir must
# name the same storage on every host (a shared file system). Workers on 127.0.0.1/localhost start here;
# others start over ssh (SSH overrides the command, REMOTE_DIR the checkout's folder on the remote hosts).
# Exits with the first non-zero exit code of a worker; 143 means a worker was stopped by SIGTERM after saving a
# checkpoint: run the same command again to continue.
set -euo pipefail
if [ $# -lt 1 ] || [[ "$1" == --* ]]; then
  sed -n '2,11p' "$0" >&2
  exit 2
fi
WORKERS="$1"; shift
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
SSH="${SSH:-ssh}"
REMOTE_DIR="${REMOTE_DIR:-$PWD}"
IFS=',' read -r -a HOSTS <<< "$WORKERS"

pids=()
for index in "${!HOSTS[@]}"; do
  tf_config="$("$PYTHON" -m trainer.distribute --workers="$WORKERS" --index="$index")"
  host="${HOSTS[$index]%:*}"
  if [ "$host" = "127.0.0.1" ] || [ "$host" = "localhost" ]; then
    TF_CONFIG="$tf_config" "$PYTHON" -m trainer.main --strategy=multi_worker "$@" &
  else
    $SSH "$host" "cd $(printf %q "$REMOTE_DIR") && TF_CONFIG=$(printf %q "$tf_config") $(printf %q "$PYTHON")" \
      "-m trainer.main --strategy=multi_worker $(printf '%q ' "$@")" &
  fi
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM

status=0
for pid in "${pids[@]}"; do
  wait "$pid" || { code=$?; [ "$status" -ne 0 ] || status=$code; }
done
exit "$status"
