"""--example_log=DIR: every worker writes which training examples it decoded and trained on, one JSON line per
record in DIR/worker_<i>.jsonl, the check that each example is trained on once per epoch (bench.multi_worker and
the tests read it)."""

import json
import os


def log_share(folder: str, worker: int, decoded: int, examples: int, of: int) -> None:
  """How many training images this worker decodes (its share, padding included), of how many real examples."""
  _append(folder, worker, {"decoded": decoded, "examples": examples, "of": of})


def log_epoch(folder: str, worker: int, epoch: int, ids: list[int]) -> None:
  """The ids this worker trained on in the (1-based) epoch."""
  _append(folder, worker, {"epoch": epoch, "ids": sorted(ids)})


def _append(folder: str, worker: int, record: dict) -> None:
  """One JSON line in FOLDER/worker_<i>.jsonl (nothing without --example_log)."""
  if folder:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"worker_{worker}.jsonl"), "a", encoding="utf-8") as f:
      f.write(json.dumps({"worker": worker, **record}) + "\n")
