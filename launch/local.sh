#!/usr/bin/env bash
# One host, all of its GPUs (or its CPU): MirroredStrategy. Usage:
#   launch/local.sh --data_dir=DIR --workdir=DIR [more trainer flags]
# --batch_size is global (split over the GPUs); pass --lr_base_batch_size to scale the learning rates with it.
# Rerunning the same command after an interruption continues the run from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec "$PYTHON" -m trainer.main --strategy=mirrored "$@"
