"""The predict command classifies files and folders, reports unreadable files and still classifies the rest."""

import csv
import io
import json
import re
import subprocess
import sys

import pytest
import tensorflow as tf

from conftest import REPO, write_image
from export import classify


@pytest.fixture
def photos(tmp_path):
  folder = tmp_path / "photos"
  write_image(folder / "a.jpg", (220, 40, 40))
  write_image(folder / "nested" / "b.png", (40, 200, 60), mode="L")
  (folder / "nested" / "scan.tif").write_bytes(b"II*\0")
  (folder / "notes.txt").write_text("not an image, and not named like one")
  (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
  (folder / "fake.gif").write_text("hello")
  return folder


def test_bad_files_are_reported_and_the_others_classified_as_the_model_does(trained_export_dir, photos):
  paths, not_images = classify.image_paths([str(photos), str(photos / "missing.jpg")])
  assert sorted(p.rsplit("/", 1)[-1] for p in paths) == ["a.jpg", "b.png", "broken.jpg", "fake.gif", "missing.jpg"]
  assert sorted(p.rsplit("/", 1)[-1] for p in not_images) == ["notes.txt", "scan.tif"]

  classified = classify.Classifier(str(trained_export_dir)).classify(paths, top_k=2)
  predictions = {p.path.rsplit("/", 1)[-1]: p for p in classified}

  assert "JPEG" in predictions["broken.jpg"].error
  assert "not a JPEG, PNG, GIF, BMP or WebP image" in predictions["fake.gif"].error
  assert predictions["missing.jpg"].error
  serve = tf.saved_model.load(str(trained_export_dir)).signatures["serving_default"]
  for name in ("a.jpg", "b.png"):
    expected = serve(image_bytes=tf.constant([(photos.rglob(name).__next__()).read_bytes()]))
    top = predictions[name].top
    assert not predictions[name].error and len(top) == 2
    assert top[0][0] == expected["classes"].numpy()[0].decode()
    assert top[0][1] == pytest.approx(float(expected["probabilities"].numpy().max()), abs=1e-6)
    assert top[0][1] >= top[1][1]


def test_csv_and_json_formats_hold_every_file():
  predictions = [classify.Prediction("x, y.jpg", (("red", 0.75), ("blue", 0.25))),
                 classify.Prediction("bad.jpg", error="the file is not a JPEG")]

  rows = list(csv.DictReader(io.StringIO(classify.format_predictions(predictions, "csv"))))
  parsed = json.loads(classify.format_predictions(predictions, "json"))

  assert [(r["path"], r["label_1"], float(r["score_1"] or 0), r["error"]) for r in rows] == [
      ("x, y.jpg", "red", 0.75, ""), ("bad.jpg", "", 0.0, "the file is not a JPEG")]
  assert parsed[0]["predictions"][1] == {"label": "blue", "score": 0.25}
  assert parsed[1]["error"] == "the file is not a JPEG"


def test_command_prints_json_and_exits_1_when_a_file_failed(trained_export_dir, photos):
  result = subprocess.run([sys.executable, "-m", "export.predict", f"--model={trained_export_dir}", "--format=json",
                           "--top_k=1", str(photos / "a.jpg"), str(photos / "fake.gif"), str(photos / "nested")],
                          capture_output=True, text=True)

  assert result.returncode == 1, result.stderr
  parsed = json.loads(result.stdout)
  assert [len(p["predictions"]) for p in parsed] == [1, 0, 1]
  assert parsed[1]["error"]
  assert "Not classified: 1 file(s)" in result.stderr and "scan.tif" in result.stderr



def test_the_readme_quotes_the_error_a_request_of_no_image_gets(trained_export_dir):
  readme = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
  quoted = re.search(r"status `INVALID_ARGUMENT` and the message `([^`]+)`", readme).group(1)
  serve = tf.saved_model.load(str(trained_export_dir)).signatures["serving_default"]

  with pytest.raises(tf.errors.InvalidArgumentError) as error:
    serve(image_bytes=tf.constant([b"hello"]))

  assert quoted.replace("[i]", "[0]").replace("(n bytes)", "(5 bytes)") in error.value.message


def test_running_the_library_module_says_which_command_classifies(capsys):
  """`python -m export.classify --model=MISSING img.jpg` printed nothing and exited 0."""
  import runpy
  with pytest.raises(SystemExit) as exit_:
    runpy.run_module("export.classify", run_name="__main__")
  errors = capsys.readouterr().err.splitlines()
  assert exit_.value.code == 2 and len(errors) == 1 and "python -m export.predict" in errors[0]
