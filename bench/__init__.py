"""Benchmarks run by hand; results and commands in BUILD_NOTES.md."""

import json


def write_figures(figures: dict, path: str) -> None:
  """Writes a benchmark's figures as JSON to `path` (its --json flag), nothing when path is empty."""
  if path:
    with open(path, "w", encoding="utf-8") as f:
      json.dump(figures, f, indent=2)
