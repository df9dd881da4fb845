#!/usr/bin/env bash
# One host, all of its GPUs (or its CPU): MirroredStrategy. Usage:
#   launch/local.sh --data_dir=DIR --workdir=DIR [more trainer flags]
# --batch_size is global (split over the GPUs); pass --lr_base_batch_size to scale the learning rates with it.
# Rerunning the same command after an interruption continues the run from its last checkpoint.
set -euo pipefail
# Runs in the caller's directory, so relative paths (--data_dir, --workdir, --flagfile) mean what they mean there;
# the repository is found through the import path instead.
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-$( [ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python3 )}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m trainer.main --strategy=mirrored "$@"
