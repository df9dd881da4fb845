"""The label audit: confident learning finds flipped labels, near-duplicate pairs by blocks equal the whole product,
re-encoded copies are paired and distinct images are not, the report files, once per run, --drop_suspects."""

import csv
import io
import json
import types

import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_run, write_color_dataset
from PIL import Image

from trainer import config_checks
from trainer.errors import UserInputError
from trainer.input import images
from trainer.loop import train
from trainer.reporting import label_audit


def _clustered_features(classes=5, per_class=60, dim=32, views=2, seed=0):
  """[views, N, dim] features of well separated classes (each view a little noisier), and their labels."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(0, 1, (classes, dim)) * 3
  labels = np.repeat(np.arange(classes), per_class)
  base = centres[labels] + rng.normal(0, 1, (len(labels), dim))
  views = np.stack([base + rng.normal(0, 0.3, base.shape) for _ in range(views)]).astype(np.float32)
  return views, labels


def test_flipped_labels_rank_first_and_clean_labels_stay():
  features, labels = _clustered_features()
  rng = np.random.default_rng(1)
  flipped = rng.choice(len(labels), 15, replace=False)
  noisy = labels.copy()
  noisy[flipped] = (labels[flipped] + rng.integers(1, 5, len(flipped))) % 5
  findings = label_audit.audit(features, noisy, 5, seed=3, train_thumbnails=np.zeros((0, 3), np.float32),
                               val_thumbnails=np.zeros((0, 3), np.float32))
  top = set(findings.suspects[:2 * len(flipped)].tolist())
  assert len(top & set(flipped.tolist())) >= 0.8 * len(flipped)
  # The suggestion is the true class for the flipped images it found.
  found = [row for row in flipped if row in top]
  assert np.mean(findings.suggested[found] == labels[found]) >= 0.9
  clean = label_audit.audit(features, labels, 5, seed=3, train_thumbnails=np.zeros((0, 3), np.float32),
                            val_thumbnails=np.zeros((0, 3), np.float32))
  assert len(clean.suspects) <= 3


def test_an_image_whose_label_is_its_most_probable_class_is_never_flagged():
  rng = np.random.default_rng(0)
  probabilities = rng.dirichlet(np.ones(4), 200).astype(np.float32)
  labels = rng.integers(0, 4, 200)
  flagged = label_audit.label_issues(probabilities, labels)
  assert len(flagged)  # Random labels: plenty of doubt.
  assert not np.any(probabilities[flagged].argmax(axis=1) == labels[flagged])
  # Ranked by the probability of the given label, lowest first.
  scores = probabilities[flagged, labels[flagged]]
  assert np.all(np.diff(scores) >= 0)


def test_a_class_of_one_image_gives_no_suspects_instead_of_failing():
  features, labels = _clustered_features(classes=3, per_class=5)
  labels = labels.copy()
  labels[0] = 3  # A fourth class with a single image: no fold split can learn it and hold it out.
  findings = label_audit.audit(features, labels, 4, seed=0, train_thumbnails=np.zeros((0, 3), np.float32),
                               val_thumbnails=np.zeros((0, 3), np.float32))
  assert len(findings.suspects) == 0


def _unit(rows: np.ndarray) -> np.ndarray:
  return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_pairs_found_in_blocks_equal_the_whole_product():
  rng = np.random.default_rng(0)
  a = _unit(rng.normal(0, 1, (53, 16)))
  b = _unit(np.concatenate([a[:5] + rng.normal(0, 0.01, (5, 16)), rng.normal(0, 1, (30, 16))]))
  a[40] = a[3]  # A copy within a.
  for other in (b, None):
    whole = label_audit.similar_pairs(a, other, 0.95, block=1000)
    blocked = label_audit.similar_pairs(a, other, 0.95, block=7)
    as_set = lambda found: {(int(i), int(j)) for i, j in zip(found[0], found[1])}  # noqa: E731
    assert as_set(blocked) == as_set(whole)
    assert len(as_set(whole)) >= (5 if other is not None else 1)
  # Within one split each pair once, never an image with itself.
  rows_a, rows_b, _ = label_audit.similar_pairs(a, None, 0.95, block=7)
  assert np.all(rows_a < rows_b)


def _thumbnails_of(paths, size=48):
  elements = [(images.load(tf.io.read_file(str(path)), size), 0, index) for index, path in enumerate(paths)]
  dataset = tf.data.Dataset.from_tensor_slices(tuple(np.array([e[k] for e in elements]) for k in range(3)))
  return label_audit.thumbnails(dataset)


def _photo(path, seed: int):
  """A PNG with a scene of its own: random shapes of colour (a 4 x 4 random image smoothly enlarged)."""
  rng = np.random.default_rng(seed)
  coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3)).astype(np.uint8), "RGB")
  coarse.resize((64, 64), Image.BICUBIC).save(path)
  return path


def test_reencoded_copies_are_paired_and_distinct_images_are_not(tmp_path):
  originals = [_photo(tmp_path / f"photo_{i}.png", i) for i in range(8)]
  copies = []
  for path in originals[:3]:
    with Image.open(path) as image:
      smaller = image.resize((58, 58))
    buffer = io.BytesIO()
    smaller.save(buffer, format="JPEG", quality=75)
    copies.append(tmp_path / f"copy_of_{path.stem}.jpg")
    copies[-1].write_bytes(buffer.getvalue())
  val, val_ids = _thumbnails_of(originals)
  train_set, train_ids = _thumbnails_of(copies)
  pairs = label_audit.near_duplicates(train_set, val)
  assert {(row_a, row_b) for _, row_a, _, row_b, _ in pairs} == {(0, 0), (1, 1), (2, 2)}
  assert label_audit.near_duplicates(val[:0], val) == []  # Distinct images: no pair within val.
  assert list(val_ids) == list(range(8)) and list(train_ids) == [0, 1, 2]


def test_suspect_csv_columns_and_rows_for_the_report_page(tmp_path):
  suspects = [label_audit.Suspect("/data/cats/1.jpg", "cats", "dogs", 0.01),
              label_audit.Suspect("/data/dogs/7.jpg", "dogs", "cats", 0.2)]
  label_audit.write_suspects_csv(str(tmp_path / "suspect_labels.csv"), suspects)
  with open(tmp_path / "suspect_labels.csv", newline="", encoding="utf-8") as f:
    assert next(csv.reader(f)) == ["path", "given_label", "suggested_label", "score"]
  assert label_audit.suspect_rows(str(tmp_path)) == suspects
  assert label_audit.suspect_rows(str(tmp_path), limit=1) == suspects[:1]
  assert label_audit.suspect_rows(str(tmp_path / "no_run")) == []
  label_audit.write_duplicates_csv(str(tmp_path / "near_duplicates.csv"), [("/a.jpg", "train", "/b.jpg", "val", 0.99)])
  with open(tmp_path / "near_duplicates.csv", newline="", encoding="utf-8") as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["path_a", "split_a", "path_b", "split_b", "similarity"]
  assert rows[1][:4] == ["/a.jpg", "train", "/b.jpg", "val"]


def test_the_audit_runs_once_per_identity(tmp_path, monkeypatch):
  features, labels = _clustered_features(classes=3, per_class=10)
  labels = labels.copy()
  labels[:2] = 2  # Two images of class 0 labelled 2.
  cache = types.SimpleNamespace(train_features=features, train_labels=labels, train_ids=np.arange(len(labels)))
  pixels = np.random.default_rng(0).integers(0, 255, (len(labels), 32, 32, 3)).astype(np.float32)
  train_images = tf.data.Dataset.from_tensor_slices((pixels, labels, np.arange(len(labels))))
  val_images = train_images.take(0)
  names = {"train": {i: f"/data/{i}.jpg" for i in range(len(labels))}, "val": {}}
  arguments = dict(names=names, classes=("a", "b", "c"), seed=0, report_dir=str(tmp_path / "report"), write=True,
                   tensorboard_dir=str(tmp_path / "tensorboard"), image_size=32)
  first = label_audit.audit_run(cache, train_images, val_images, identity="features-1", **arguments)
  assert {0, 1} <= first
  rows = label_audit.suspect_rows(str(tmp_path / "report"))
  assert {row.path for row in rows} >= {"/data/0.jpg", "/data/1.jpg"}
  assert (tmp_path / "report" / "near_duplicates.csv").is_file()
  assert list((tmp_path / "tensorboard").iterdir())  # The grid of suspects.

  def no_second_audit(*args, **kwargs):
    raise AssertionError("audited again")
  monkeypatch.setattr(label_audit, "audit", no_second_audit)
  assert label_audit.audit_run(cache, train_images, val_images, identity="features-1", **arguments) == first
  with pytest.raises(AssertionError, match="audited again"):  # Other features: audited anew.
    label_audit.audit_run(cache, train_images, val_images, identity="features-2", **arguments)


def test_drop_suspects_needs_the_frozen_features():
  for weights, settings in (("none", {}), ("imagenet", {"cache_features": False}),
                            ("imagenet", {"frozen_epochs": 0})):
    with pytest.raises(UserInputError, match="--drop_suspects"):
      config_checks.validate(tiny_run(weights, drop_suspects=True, **settings))
  config_checks.validate(tiny_run("imagenet", drop_suspects=True))


def test_a_run_writes_the_audit_and_drop_suspects_trains_without_them(tmp_path, random_mobilenet_025_weights,
                                                                        monkeypatch):
  data_dir = write_color_dataset(tmp_path / "data", 6)
  # Random backbone weights suspect nothing reliably: the first two training images are made the suspects.
  monkeypatch.setattr(label_audit, "label_issues", lambda probabilities, labels: np.array([0, 1]))
  config = tiny_run(random_mobilenet_025_weights, batch_size=8, augment="none", data_dir=str(data_dir),
                    validation_split=0.34, drop_suspects=True, example_log=str(tmp_path / "examples"))
  run = train.setup(config, str(tmp_path / "run"))
  train.train_epochs(run)  # Not the export of `finalize`: the audit and the dropping happen in the epochs.
  run.tensorboard.close()
  report = tmp_path / "run" / "report"
  dropped = set(json.loads((report / "label_audit.json").read_text())["suspect_ids"])
  assert len(dropped) == 2
  assert len(label_audit.suspect_rows(str(report))) == 2
  assert (report / "near_duplicates.csv").is_file()
  # The report page shows them: the grid, the table of the worst, the CSVs.
  from trainer.reporting import report_page
  page = (tmp_path / "run" / "report" / "index.html")
  report_page.write_page(str(tmp_path / "run"))
  text = page.read_text(encoding="utf-8")
  assert "<h2>Suspect labels</h2>" in text and (report / label_audit.SUSPECTS_PNG).is_file()
  assert f'src="{label_audit.SUSPECTS_PNG}"' in text and text.count("<td>") >= 2 * 4
  epochs = [json.loads(line) for line in (tmp_path / "examples" / "worker_0.jsonl").read_text().splitlines()
            if "epoch" in json.loads(line)]
  assert [record["epoch"] for record in epochs] == [1, 2]  # The frozen phase on features, then fine-tuning.
  training_images = json.loads((tmp_path / "run" / "config.json").read_text())["run"]["train_examples"]
  for record in epochs:
    assert not dropped & set(record["ids"])
    assert len(record["ids"]) == training_images - 2


def test_bench_smoke(tmp_path, random_mobilenet_025_weights):
  from bench import label_errors
  for split, count in (("train", 8), ("val", 3)):
    write_color_dataset(tmp_path / "dataset" / split, count)
  before = sorted(tmp_path.joinpath("dataset").rglob("*"))
  figures = label_errors.main(["bench.label_errors", f"--dataset={tmp_path / 'dataset'}", "--flip=0.1", "--copies=2",
                               "--backbone=mobilenet", "--alpha=0.25", f"--weights={random_mobilenet_025_weights}",
                               "--image_size=32", "--augment=none", "--feature_views=1", "--batch_size=8",
                               f"--json={tmp_path / 'figures.json'}"])
  assert json.loads((tmp_path / "figures.json").read_text()) == json.loads(json.dumps(figures))
  assert {"flipped", "recall_at_2n", "copies", "copies_found", "false_pairs_clean", "seconds"} <= set(figures)
  assert figures["flipped"] == 2 and figures["copies"] == 2
  assert figures["copies_found"] == 2  # Re-encoded copies of noise-textured colours: the thumbnails match.
  assert 0.0 <= figures["recall_at_2n"] <= 1.0 and figures["seconds"] > 0
  assert sorted(tmp_path.joinpath("dataset").rglob("*")) == before  # The copies and flips live elsewhere.
