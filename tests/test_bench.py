"""Every benchmark runs today: each module's main, in-process on tiny data (32 px, MobileNet alpha 0.25 from a
random-init weights file, one epoch, a few images), with --json, and the JSON has the module's documented keys
with sane values. A benchmark whose trainer API went away fails here, not months later when someone reruns it for
BUILD_NOTES. `test_every_bench_module_has_a_smoke_test` keeps a new module from arriving without one.
"""

import json
import pathlib
import re

import pytest
from absl import flags
from conftest import REPO, write_color_dataset

import bench
from bench import (candidates, finetune, frozen_phase, image_size, input_order, input_pipeline, modes, reporting,
                   scale, serving, synthetic, training_loop, tune_runs, tuning)
from trainer.config import Config
from trainer.modeling import model as model_lib

# The tiny model of every smoke test (tests/conftest.py's TINY_RUN) as benchmark flags.
TINY_MODEL = ["--backbone=mobilenet", "--alpha=0.25"]
PER_CLASS_TRAIN, PER_CLASS_VAL, CLASSES = 6, 3, 3


def _figures(module, tmp_path: pathlib.Path, *arguments: str) -> dict:
  """Runs the module's main with `arguments` and --json; returns what it wrote (and checks main returned it)."""
  path = tmp_path / f"{module.__name__}.json"
  returned = module.main([module.__name__, *arguments, f"--json={path}"])
  written = json.loads(path.read_text(encoding="utf-8"))
  assert json.loads(json.dumps(returned)) == written
  return written


@pytest.fixture
def dataset(tmp_path) -> pathlib.Path:
  """train/ and val/ of red, green and blue 40x32 JPEGs."""
  write_color_dataset(tmp_path / "data" / "train", PER_CLASS_TRAIN)
  write_color_dataset(tmp_path / "data" / "val", PER_CLASS_VAL)
  return tmp_path / "data"


def _positive(*values) -> bool:
  return all(isinstance(value, (int, float)) and value > 0 for value in values)


def _accuracy(value) -> bool:
  return 0.0 <= value <= 1.0


def test_every_bench_module_has_a_smoke_test():
  tests = "\n".join(path.read_text(encoding="utf-8") for path in (REPO / "tests").glob("*.py"))
  modules = sorted(path.stem for path in (REPO / "bench").glob("*.py") if path.stem != "__init__")
  untested = [name for name in modules
              if not re.search(rf"\bbench\.{name}\b|from bench import [\w\s,()]*\b{name}\b", tests)]
  assert not untested, f"bench modules without a smoke test in tests/: {untested}"


def _flags() -> flags.FlagValues:
  own = flags.FlagValues()
  flags.DEFINE_integer("epochs", 5, "Epochs.", flag_values=own)
  return own


def test_a_bad_flag_ends_in_one_line_with_exit_2(capsys):
  with pytest.raises(SystemExit) as exit_info:
    bench.parse_flags(_flags(), ["bench.x", "--epochs=2", "--no_such_flag=1"], "usage")
  assert exit_info.value.code == 2
  error = capsys.readouterr().err.strip()
  assert "no_such_flag" in error and "\n" not in error


def test_a_stray_argument_ends_in_one_line_with_exit_2(capsys):
  with pytest.raises(SystemExit) as exit_info:
    bench.parse_flags(_flags(), ["bench.x", "epochs=2"], "usage")
  assert exit_info.value.code == 2
  assert "epochs=2" in capsys.readouterr().err


def test_flags_start_from_their_defaults_on_every_call():
  own = _flags()
  bench.parse_flags(own, ["bench.x", "--epochs=2"], "usage")
  assert own.epochs == 2
  bench.parse_flags(own, ["bench.x"], "usage")  # A second main in the same process, without --epochs.
  assert own.epochs == 5


def test_help_lists_the_flags_and_exits_0(capsys):
  with pytest.raises(SystemExit) as exit_info:
    bench.parse_flags(_flags(), ["bench.x", "--help"], "python -m bench.x: what it measures")
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  assert "what it measures" in out and "--epochs" in out


def test_input_pipeline(dataset, tmp_path):
  figures = _figures(input_pipeline, tmp_path, f"--data_dir={dataset / 'train'}", "--image_size=32",
                     "--batch_size=4", "--repeats=1", "--cached_epochs=1")
  rates = ("ours_first_epoch", "ours_cached_epoch", "image_dataset_from_directory", "image_data_generator_classic",
           "image_data_generator_plain", "decode_only")
  assert _positive(*(figures[name] for name in rates))
  # Every image of the folder in one pass of ours (its training and validation splits together).
  assert figures["facts"]["images"] == figures["facts"]["ours_images"] == CLASSES * PER_CLASS_TRAIN


def test_input_order(dataset, tmp_path):
  figures = _figures(input_order, tmp_path, f"--data_dir={dataset}", "--image_size=32", "--rounds=1")
  assert figures["files"] == CLASSES * (PER_CLASS_TRAIN + PER_CLASS_VAL)
  assert _positive(figures["in_order_images_per_sec"], figures["any_order_images_per_sec"],
                   figures["ratio_in_order_to_any"])


def test_image_size(dataset, tmp_path, random_mobilenet_025_weights):
  figures = _figures(image_size, tmp_path, f"--data_dir={dataset}", *TINY_MODEL,
                     f"--weights={random_mobilenet_025_weights}", "--sizes=32", "--seeds=1", "--epochs=1",
                     "--views=1")
  size = figures["sizes"]["32"]
  assert (size["train_images"], size["val_images"]) == (CLASSES * PER_CLASS_TRAIN, CLASSES * PER_CLASS_VAL)
  assert _positive(size["extraction_seconds"]) and _accuracy(size["val_accuracy"]["mean"])


def test_frozen_phase(dataset, tmp_path, random_mobilenet_025_weights):
  figures = _figures(frozen_phase, tmp_path, f"--data_dir={dataset}", *TINY_MODEL,
                     f"--weights={random_mobilenet_025_weights}", "--image_size=32", "--frozen_epochs=2",
                     "--feature_views=1", "--augment=none")
  for run in ("end_to_end", "cache_features"):
    assert _positive(figures[run]["first_epoch_seconds"], figures[run]["later_epoch_seconds"])
    assert _accuracy(figures[run]["val_accuracy"])
  assert _positive(figures["later_epoch_speedup"])


def test_modes(dataset, tmp_path, random_mobilenet_025_weights):
  figures = _figures(modes, tmp_path, f"--data_dir={dataset}", *TINY_MODEL, f"--weights={random_mobilenet_025_weights}",
                     "--image_size=32", "--epochs=1", "--batch_size=8", "--modes=unfrozen")
  run = figures["modes"]["unfrozen"][0]
  assert run["phases"] == ["finetune"]
  assert _accuracy(run["val_accuracy_last"]) and _positive(run["seconds_per_epoch"])


def test_modes_train_the_tutorials_three_ways():
  """The modes not trained above (each run costs seconds), as the phases they give a run."""
  bench.parse_flags(modes.FLAGS, ["bench.modes", "--epochs=3"], "")
  base = Config().replace(weights="weights.h5")
  trained = {mode: [(phase, epochs) for phase, epochs in model_lib.phases(modes.mode_config(mode, base)) if epochs]
             for mode in ("frozen", "unfrozen", "scratch")}
  assert trained == {"frozen": [("frozen", 3)], "unfrozen": [("finetune", 3)], "scratch": [("scratch", 3)]}


def test_finetune(dataset, tmp_path, random_mobilenet_025_weights):
  figures = _figures(finetune, tmp_path, f"--data_dir={dataset}", *TINY_MODEL,
                     f"--weights={random_mobilenet_025_weights}", "--image_size=32", "--seeds=1", "--frozen_epochs=1",
                     "--finetune_epochs=1", "--finetune_lrs=1e-4", "--unfreeze_from=conv_dw_13")
  setting = figures["settings"]["conv_dw_13 lr=1e-4"]
  assert _accuracy(setting["val_accuracy"]["mean"]) and _positive(setting["finetune_seconds"]["mean"])
  assert len(setting["val_accuracy_after_each_finetune_epoch"]) == 1
  assert _accuracy(figures["frozen_only"]["mean"])


def test_tuning(dataset, tmp_path, random_mobilenet_025_weights):
  figures = _figures(tuning, tmp_path, f"--data_dirs={dataset}", *TINY_MODEL,
                     f"--weights={random_mobilenet_025_weights}", "--image_size=32", "--seeds=1", "--views=1,2",
                     "--max_trials=1", "--tune_folds=2", "--frozen_epochs=2", "--tune_epochs=2",
                     f"--workdir={tmp_path / 'tuning'}")
  result = figures["data"]
  assert (result["train_images"], result["val_images"]) == (CLASSES * PER_CLASS_TRAIN, CLASSES * PER_CLASS_VAL)
  assert sorted(result["feature_views"]) == ["1", "2"]
  assert _accuracy(result["tune"]["tune"]["mean"]) and _accuracy(result["tutorial_head"]["mean"])
  assert result["tune"]["decisions"][0]["decision"] in ("tuned", "defaults")


@pytest.mark.slow  # Two whole `python -m trainer.main` runs (one with --tune): ~40 s on 2 quiet cores.
def test_tune_runs(dataset, tmp_path, random_mobilenet_025_weights):
  tiny = ["--backbone=mobilenet", "--alpha=0.25", "--image_size=32", "--batch_size=8", "--frozen_epochs=1",
          "--finetune_epochs=1", "--head_units=8", "--max_trials=1", "--tune_folds=2", "--tune_epochs=1"]
  figures = _figures(tune_runs, tmp_path, f"--data_dirs={dataset}", f"--weights={random_mobilenet_025_weights}",
                     "--seeds=1", f"--extra_flags={','.join(tiny)}")
  result = figures["datasets"][str(dataset)]
  seed = result["seeds"][0]
  assert _accuracy(seed["tune"]["val_accuracy"]) and _accuracy(seed["plain"]["val_accuracy"])
  assert seed["tune"]["decision"] in ("tuned", "defaults")
  assert _positive(*result["tune_over_plain_seconds"])


def test_serving(dataset, tmp_path, random_mobilenet_025_weights):
  figures = _figures(serving, tmp_path, f"--val_dir={dataset / 'val'}", *TINY_MODEL,
                     f"--weights={random_mobilenet_025_weights}", "--image_size=32", "--batch_sizes=1,32",
                     "--repeats=1")
  assert figures["files"] == CLASSES * PER_CLASS_VAL
  # A batch larger than the folder serves every file, and the figures are per image served.
  assert (figures["batch_1_images"], figures["batch_32_images"]) == (1, CLASSES * PER_CLASS_VAL)
  for batch in (1, 32):
    assert _positive(*figures[f"batch_{batch}_ms_per_image"].values())
  assert max(figures["parity"]["max_abs_diff"].values()) <= figures["parity"]["tolerance"]


def test_training_loop(tmp_path, random_mobilenet_025_weights):
  figures = _figures(training_loop, tmp_path, *TINY_MODEL, f"--weights={random_mobilenet_025_weights}",
                     "--image_size=32", "--batch_size=4", "--steps=2", "--repeats=1")
  assert figures["replicas"] == 1
  assert _positive(figures["loop_seconds_per_step"], figures["fit_seconds_per_step"])


def test_reporting(tmp_path):
  figures = _figures(reporting, tmp_path, "--classes=2", "--epochs=1")
  assert list(figures["classes"]) == ["2"]
  for costs in figures["classes"].values():
    assert _positive(costs["log_epoch_ms"], costs["write_reports_ms"])


def test_synthetic_writes_a_folder_once(tmp_path):
  arguments = [f"--output={tmp_path / 'photos'}", "--images=4", "--width=64", "--height=48", "--classes=2"]
  figures = _figures(synthetic, tmp_path, *arguments)
  photos = sorted((tmp_path / "photos").glob("*/*.jpg"))
  assert (figures["images"], len(photos), len({path.parent for path in photos})) == (4, 4, 2)
  modified = [path.stat().st_mtime_ns for path in photos]
  assert synthetic.main(["bench.synthetic", *arguments]) == figures  # Reused, not written again.
  assert [path.stat().st_mtime_ns for path in photos] == modified


def test_scale_rows(tmp_path):
  """Each row in this process (`python -m bench.scale` runs each in a child of its own, for its peak memory), and
  the targets computed from them."""
  photos = 20  # bench.synthetic's 10 classes, 2 photos each: one of each class is held out for validation.
  folder = synthetic.folder(str(tmp_path / "photos"), photos, 64, 48)
  common = [f"--data_dir={folder}", "--image_size=32", "--batch_size=4", f"--root={tmp_path}"]
  ours = _figures(scale, tmp_path, "--row=ours", "--cache=memory", "--epochs=2", *common)
  keras_row = {"images": photos, **_figures(scale, tmp_path, "--row=keras", *common)}
  floor = _figures(scale, tmp_path, "--row=floor", *common)
  assert keras_row["images_per_epoch"] == photos
  assert ours["cache"] == "memory" and 0 < ours["images_per_epoch"] < photos  # The training split.
  assert _positive(ours["first_epoch_images_per_sec"], ours["later_epoch_images_per_sec"], ours["peak_rss_bytes"],
                   keras_row["first_epoch_images_per_sec"], floor["ratio_8_decode_cpu_us_per_image"],
                   floor["bound_on_first_epoch_over_image_dataset_from_directory"])
  targets = scale._targets([{"images": photos, **ours}], [keras_row], {}, 32)
  assert _positive(targets[f"memory_first_epoch_over_image_dataset_from_directory_{photos}"])


@pytest.mark.slow  # Two whole `python -m trainer.main` runs, export included: ~30 s on 2 quiet cores.
def test_candidates(dataset, tmp_path, random_mobilenet_025_weights):
  tiny = ["--image_size=32", "--batch_size=8", "--frozen_epochs=1", "--finetune_epochs=1", "--head_units=8"]
  figures = _figures(candidates, tmp_path, f"--data_dirs={dataset}", *TINY_MODEL,
                     f"--weights={random_mobilenet_025_weights}", "--seeds=1", "--first_seed=43",
                     f"--extra_flags={','.join(tiny)}", "--candidates=defaults=;smooth=--label_smoothing=0.1",
                     f"--cache_dir={tmp_path / 'cache'}")
  rows = figures["rows"]
  assert [(row["dataset"], row["candidate"], row["seed"]) for row in rows] == [("data", "defaults", 43),
                                                                                ("data", "smooth", 43)]
  assert [row["flags"] for row in rows] == ["", "--label_smoothing=0.1"]
  for row in rows:
    assert _accuracy(row["val_accuracy"]) and _accuracy(row["frozen_val_accuracy"])
    # The model is the better phase's (--keep_better_phase): its accuracy is the one the row reports.
    assert row["kept_phase"] in ("frozen", "finetune") and row["val_accuracy"] == pytest.approx(
        max(row["frozen_val_accuracy"], row["finetune_val_accuracy"]))
    assert _positive(row["seconds"], row["finetune_seconds"])
  # Label smoothing leaves the frozen phase's features as they were: the second run reads the first one's.
  assert [row["features_extracted"] for row in rows] == [True, False]
  summary = figures["summary"]["data"]
  assert list(summary) == ["defaults", "smooth"]
  assert summary["defaults"]["seconds_ratio_to_first_candidate"] == 1.0
  assert summary["defaults"]["seconds_ratio_to_first_candidate_extracting"] == 1.0
  for name, row in zip(summary, rows):
    assert summary[name]["mean"] == summary[name]["min"] == summary[name]["max"] == row["val_accuracy"]
    assert summary[name]["std"] == 0.0 and _positive(summary[name]["seconds_ratio_to_first_candidate"])
