"""python -m bench.candidates: whole default runs against candidate changes of the defaults, over seeds.

For each dataset of --data_dirs, each seed (--first_seed, 42 unless given, and the ones after it) and each
candidate of --candidates (`name=FLAGS`, the first one the reference, usually the defaults with no flags), one
whole training as a user runs it, export
included: `python -m trainer.main --data_dir=D --workdir=W --seed=S --verbosity=-1 <backbone flags> <candidate
flags>` in a subprocess. Each run's figures come from its report/metrics.json (val accuracy) and
report/history.json (the last frozen epoch's val accuracy, the fine-tune phase's seconds); wall seconds are the
subprocess's. Prints a markdown table and writes --json after every run (a stopped measurement keeps what finished).

With --cache_dir, the runs of one dataset share DIR/<dataset>/: the frozen phase's features are keyed by content
(the images, the backbone, the seed's augmented views), so a candidate that does not change the frozen phase reads
the features an earlier candidate of its seed extracted, and its wall seconds leave out that extraction (each row
says whether it extracted; `seconds_ratio_to_first_candidate_extracting` puts the extraction back, see _summary).

python -m bench.candidates --data_dirs=../shared/datasets/hymenoptera,../shared/datasets/sign_language_digits \
  --seeds=3 --cache_dir=/tmp/candidates_cache --json=/tmp/candidates.json \
  '--candidates=defaults=;smooth=--label_smoothing=0.1;deep=--unfreeze_from=block_10_expand'
"""

import glob
import json
import os
import shlex
import shutil
import sys
import tempfile

import numpy as np
from absl import flags

import bench

FLAGS = flags.FlagValues()
flags.DEFINE_list("data_dirs", ["../shared/datasets/hymenoptera", "../shared/datasets/sign_language_digits"],
                  "Datasets (train/ + val/), measured one after the other.", flag_values=FLAGS)
bench.define_backbone_flags(FLAGS)
flags.DEFINE_integer("seeds", 3, "Seeds per dataset and candidate (--first_seed, the one after, ...).",
                     flag_values=FLAGS)
flags.DEFINE_integer("first_seed", 42, "The first seed: more seeds of an earlier measurement start after its last.",
                     flag_values=FLAGS)
flags.DEFINE_string("candidates", "defaults=;no_smoothing=--finetune_label_smoothing=0;top_stage=--unfreeze_from="
                    "block_13_expand",
                    "Semicolon-separated name=FLAGS (FLAGS split as a shell would: several flags are space-separated)"
                    "; the first candidate is the one the others' seconds are compared with.", flag_values=FLAGS)
flags.DEFINE_list("extra_flags", [], "More flags for every run (e.g. --finetune_epochs=2).", flag_values=FLAGS)
flags.DEFINE_string("cache_dir", "", "Shared --cache_dir of the runs: DIR/<dataset name>/ per dataset ('': each run "
                    "caches in its own workdir).", flag_values=FLAGS)
flags.DEFINE_string("json", "", "Write the figures to this file (after each run).", flag_values=FLAGS)


def parse_candidates(text: str) -> list[tuple[str, list[str]]]:
  """`a=;b=--x=1 --y=2` -> [("a", []), ("b", ["--x=1", "--y=2"])], in order."""
  candidates = []
  for item in filter(None, (part.strip() for part in text.split(";"))):
    name, separator, candidate_flags = item.partition("=")
    if not separator or not name.strip():
      raise ValueError(f"--candidates: {item!r} is not name=FLAGS")
    candidates.append((name.strip(), shlex.split(candidate_flags)))
  names = [name for name, _ in candidates]
  if not names or len(set(names)) != len(names):
    raise ValueError(f"--candidates: needs at least one candidate and distinct names, got {names}")
  return candidates


def _feature_files(folder: str) -> set[str]:
  return set(glob.glob(os.path.join(folder, "**", "features_*.npz"), recursive=True))


def _run(data_dir: str, seed: int, name: str, candidate_flags: list[str], root: str, cache_dir: str) -> dict:
  """One whole training in a subprocess; its figures. The workdir is removed after (an export is tens of MB)."""
  workdir = os.path.join(root, f"{os.path.basename(data_dir.rstrip('/'))}_{name}_{seed}")
  cache = [f"--cache_dir={cache_dir}"] if cache_dir else []
  command = [sys.executable, "-m", "trainer.main", f"--data_dir={data_dir}", f"--workdir={workdir}", f"--seed={seed}",
             "--verbosity=-1", f"--backbone={FLAGS.backbone}", f"--alpha={FLAGS.alpha}", f"--weights={FLAGS.weights}",
             *cache, *FLAGS.extra_flags, *candidate_flags]
  features_before = _feature_files(cache_dir) if cache_dir else set()
  metrics, seconds = bench.train_command(command, workdir)
  with open(os.path.join(workdir, "report", "history.json"), encoding="utf-8") as f:
    history = json.load(f)
  frozen = [epoch for epoch in history if epoch["phase"] == "frozen"]
  finetune = [epoch for epoch in history if epoch["phase"] == "finetune"]
  row = {"dataset": os.path.basename(data_dir.rstrip("/")), "candidate": name, "flags": shlex.join(candidate_flags),
         "seed": seed, "val_accuracy": metrics["val_accuracy"],
         "frozen_val_accuracy": frozen[-1]["val_accuracy"] if frozen else None,
         # The last fine-tune epoch's, and the phase whose weights the run kept (--keep_better_phase).
         "finetune_val_accuracy": finetune[-1]["val_accuracy"] if finetune else None,
         "kept_phase": metrics.get("phase_choice", {}).get("kept"),
         "seconds": seconds, "finetune_seconds": sum(epoch["seconds"] for epoch in finetune),
         # The features are extracted (or read from the cache) inside the first frozen epoch, so its seconds say
         # what this run paid for them.
         "first_frozen_epoch_seconds": frozen[0]["seconds"] if frozen else None,
         "features_extracted": bool(_feature_files(cache_dir or workdir) - features_before),
         "load_average_after": list(os.getloadavg())}
  shutil.rmtree(workdir)
  print(json.dumps(row), flush=True)
  return row


def _summary(rows: list[dict], reference: dict | None, extraction_seconds: float | None) -> dict:
  """Mean and spread of one (dataset, candidate)'s rows. `reference` is the first candidate's summary (None for the
  first itself). `extraction_seconds` is the mean first frozen epoch of the dataset's rows that extracted their
  features: a row that read them from the shared cache gets that epoch's seconds swapped for it in
  seconds_ratio_to_first_candidate_extracting, the ratio a user who runs the candidate alone would see."""
  accuracy = [row["val_accuracy"] for row in rows]
  seconds = [row["seconds"] for row in rows]
  extracting = [row["seconds"] if row["features_extracted"] or extraction_seconds is None
                or row["first_frozen_epoch_seconds"] is None
                else row["seconds"] - row["first_frozen_epoch_seconds"] + extraction_seconds for row in rows]
  summary = {"mean": float(np.mean(accuracy)), "std": float(np.std(accuracy, ddof=1)) if len(rows) > 1 else 0.0,
             "min": float(np.min(accuracy)), "max": float(np.max(accuracy)), "runs": accuracy,
             "seconds_mean": float(np.mean(seconds)),
             "finetune_seconds_mean": float(np.mean([row["finetune_seconds"] for row in rows])),
             "features_extracted_runs": sum(row["features_extracted"] for row in rows),
             "seconds_extracting_mean": float(np.mean(extracting))}
  reference = reference or summary
  summary["seconds_ratio_to_first_candidate"] = summary["seconds_mean"] / reference["seconds_mean"]
  summary["seconds_ratio_to_first_candidate_extracting"] = (summary["seconds_extracting_mean"]
                                                            / reference["seconds_extracting_mean"])
  summary["finetune_seconds_ratio_to_first_candidate"] = (summary["finetune_seconds_mean"]
                                                          / max(reference["finetune_seconds_mean"], 1e-9))
  return summary


def _summaries(rows: list[dict], candidates: list[tuple[str, list[str]]]) -> dict:
  """{dataset: {candidate: summary}} of the rows so far, candidates in --candidates order."""
  summaries = {}
  for dataset in dict.fromkeys(row["dataset"] for row in rows):
    of_dataset = [row for row in rows if row["dataset"] == dataset]
    extracted = [row["first_frozen_epoch_seconds"] for row in of_dataset
                 if row["features_extracted"] and row["first_frozen_epoch_seconds"] is not None]
    extraction_seconds = float(np.mean(extracted)) if extracted else None
    summaries[dataset] = {}
    reference = None
    for name, _ in candidates:
      of_candidate = [row for row in of_dataset if row["candidate"] == name]
      if of_candidate:
        summaries[dataset][name] = _summary(of_candidate, reference, extraction_seconds)
        reference = reference or summaries[dataset][name]
  return summaries


def table(figures: dict) -> str:
  """The markdown table of the figures: one line per (dataset, candidate)."""
  lines = ["| dataset | candidate | val acc per seed | mean +- std | wall s | fine-tune s | wall ratio "
           "| wall ratio, extracting |", "|---|---|---|---:|---:|---:|---:|---:|"]
  for dataset, of_dataset in figures["summary"].items():
    for name, summary in of_dataset.items():
      runs = " ".join(f"{value:.4f}" for value in summary["runs"])
      lines.append(f"| {dataset} | {name} | {runs} | {summary['mean']:.4f} +- {summary['std']:.4f} "
                   f"| {summary['seconds_mean']:.0f} | {summary['finetune_seconds_mean']:.0f} "
                   f"| {summary['seconds_ratio_to_first_candidate']:.2f} "
                   f"| {summary['seconds_ratio_to_first_candidate_extracting']:.2f} |")
  return "\n".join(lines)


def main(argv: list[str]) -> dict:
  """Measures, prints, writes --json (after every run); returns the figures."""
  bench.parse_flags(FLAGS, argv, __doc__)
  candidates = parse_candidates(FLAGS.candidates)
  root = tempfile.mkdtemp(prefix="bench_candidates_")
  figures = {"load_average_before": list(os.getloadavg()), "backbone": FLAGS.backbone, "weights": FLAGS.weights,
             "extra_flags": FLAGS.extra_flags,
             "candidates": {name: shlex.join(candidate_flags) for name, candidate_flags in candidates},
             "cache_dir": FLAGS.cache_dir,
             "cache_note": ("runs of one dataset share <cache_dir>/<dataset>/: a candidate that does not change the "
                            "frozen phase reads the features an earlier run of its seed extracted (features_extracted"
                            " false), so its wall seconds leave out the extraction; see "
                            "seconds_ratio_to_first_candidate_extracting") if FLAGS.cache_dir else
                           "no shared cache: every run extracts its own features",
             "rows": [], "summary": {}}
  for data_dir in FLAGS.data_dirs:
    cache_dir = os.path.join(FLAGS.cache_dir, os.path.basename(data_dir.rstrip("/"))) if FLAGS.cache_dir else ""
    # Candidates inside seeds: a seed's runs follow one another under the same load, and the first candidate is the
    # one that extracts the seed's features.
    for seed in range(FLAGS.first_seed, FLAGS.first_seed + FLAGS.seeds):
      for name, candidate_flags in candidates:
        figures["rows"].append(_run(data_dir, seed, name, candidate_flags, root, cache_dir))
        figures["summary"] = _summaries(figures["rows"], candidates)
        bench.write_figures(figures, FLAGS.json)
  shutil.rmtree(root)
  figures["load_average_after"] = list(os.getloadavg())
  print(table(figures))
  bench.write_figures(figures, FLAGS.json)
  return figures


if __name__ == "__main__":
  bench.run(main)
