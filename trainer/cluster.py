"""python -m trainer.cluster --workers=HOST:PORT,HOST:PORT --index=I: print worker I's TF_CONFIG.

The one TF_CONFIG of a cluster of workers (worker 0 the chief), as launch/multi_worker.sh exports it; no TensorFlow
loads, so it answers at once.
"""

import argparse
import json
import sys

from trainer.errors import exit_on_user_error
from trainer.runtime import cluster


def _main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(prog="python -m trainer.cluster", description="Print one worker's TF_CONFIG.")
  parser.add_argument("--workers", required=True, help="HOST:PORT,HOST:PORT,... of every worker, the chief first.")
  parser.add_argument("--index", type=int, required=True, help="Which worker (0 is the chief).")
  args = parser.parse_args(argv)
  with exit_on_user_error():
    print(json.dumps(cluster.tf_config([w.strip() for w in args.workers.split(",") if w.strip()], args.index)))


if __name__ == "__main__":
  _main(sys.argv[1:])
