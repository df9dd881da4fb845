"""Bad and odd image files, made for real in each test: found before training, skipped or refused, reported."""

import json
import logging
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from conftest import CLASS_COLORS, write_image
from PIL import Image

from export import end_of_run
from trainer.config import Config
from trainer.errors import UserInputError
from trainer.input import data, data_checks
from trainer.loop import train


def _truncated_jpeg(path):
  content = write_image(path, (200, 30, 30)).read_bytes()
  path.write_bytes(content[:len(content) // 2])


BROKEN = {
    "truncated.jpg": _truncated_jpeg,
    "text.jpg": lambda path: path.write_text("this is not a photo"),
    "zero.jpg": lambda path: path.write_bytes(b""),
}


def _load(root, tmp_path, **values):
  return data.load(Config().replace(data_dir=str(root), **values).data, 16, str(tmp_path / "cache"))


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_undecodable_files_are_skipped_with_one_warning(color_folder, tmp_path, caplog, name):
  BROKEN[name](color_folder / "red" / name)
  with caplog.at_level(logging.WARNING):
    inputs = _load(color_folder, tmp_path)
  broken = str(color_folder / "red" / name)
  assert list(inputs.skipped) == [broken]
  assert broken not in inputs.train.paths + inputs.val.paths
  assert len(inputs.train) + len(inputs.val) == 18
  warnings = [r.getMessage() for r in caplog.records if "Skipping" in r.getMessage()]
  assert len(warnings) == 1 and "1 image file(s)" in warnings[0] and broken in warnings[0]


@pytest.mark.parametrize("cache", ["memory", "none"])
def test_strict_data_refuses_every_broken_file_by_name_before_training(color_folder, tmp_path, cache):
  for name, make in BROKEN.items():
    make(color_folder / "green" / name)
  with pytest.raises(UserInputError, match="3 image file") as error:
    _load(color_folder, tmp_path, strict_data=True, cache=cache)
  assert all(name in str(error.value) for name in BROKEN)


def test_huge_images_are_skipped_before_decoding(color_folder, tmp_path):
  write_image(color_folder / "blue" / "huge.png", (40, 60, 220), size=(300, 200), fmt="PNG")
  inputs = _load(color_folder, tmp_path, max_image_pixels=300 * 200 - 1)
  assert list(inputs.skipped) == [str(color_folder / "blue" / "huge.png")]
  assert "300x200 pixels" in inputs.skipped[str(color_folder / "blue" / "huge.png")]


def _png_header_only(path, width, height):
  """A PNG whose header declares width x height pixels (a decompression bomb's) over one pixel of data."""
  import struct
  import zlib
  write_image(path, (40, 60, 220), size=(1, 1), fmt="PNG")
  content = path.read_bytes()
  ihdr = b"IHDR" + struct.pack(">II", width, height) + content[24:29]  # bit depth, colour type, ... kept
  path.write_bytes(content[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + content[33:])


def test_an_image_larger_than_pils_own_bomb_limit_is_skipped_by_its_size(color_folder, tmp_path):
  """PIL refuses to open a 400 MP header (its own limit), which read as a 0x0 size that passed the check."""
  _png_header_only(color_folder / "blue" / "bomb.png", 20_000, 20_000)
  inputs = _load(color_folder, tmp_path)
  assert "20000x20000 pixels exceeds --max_image_pixels" in inputs.skipped[str(color_folder / "blue" / "bomb.png")]


def _odd_but_valid(folder):
  """Files that TensorFlow decodes: each must be used, as RGB, with its true colours."""
  red = np.zeros((24, 32, 3), np.uint8) + np.array(CLASS_COLORS["red"], np.uint8)
  Image.fromarray(red).save(folder / "bitmap named.jpg", format="BMP")
  Image.fromarray(red).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
  sixteen_bit = np.full((24, 32), 200 * 257, np.uint16)  # gray 200 of 255, in 16 bits
  Image.fromarray(sixteen_bit).save(folder / "gray16.png")
  frames = [Image.fromarray(red)] + [Image.fromarray(np.zeros_like(red)) for _ in range(2)]
  frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100)
  return {"bitmap named.jpg": CLASS_COLORS["red"], "cmyk.jpg": CLASS_COLORS["red"], "gray16.png": (200, 200, 200),
          "animated.gif": CLASS_COLORS["red"]}


def test_odd_but_valid_files_are_used_as_rgb(color_folder, tmp_path):
  expected = _odd_but_valid(color_folder / "red")
  inputs = _load(color_folder, tmp_path, validation_split=0.1)
  assert not inputs.skipped
  found = {}
  for examples in (inputs.train, inputs.val):
    for (image, _), path in zip(examples.images, examples.paths):
      if os.path.basename(path) in expected:
        found[os.path.basename(path)] = np.asarray(image).reshape(-1, 3).mean(axis=0)
  assert sorted(found) == sorted(expected)
  for name, colour in expected.items():
    np.testing.assert_allclose(found[name], colour, atol=6, err_msg=name)


def test_a_class_left_without_usable_images_is_an_error(tmp_path):
  for name in ("cat", "dog"):
    for i in range(3):
      write_image(tmp_path / "d" / name / f"{i}.jpg", (50, 50, 50))
  for path in (tmp_path / "d" / "dog").iterdir():
    path.write_bytes(b"")
  with pytest.raises(UserInputError, match=r"\['dog'\] have no usable training images"):
    _load(tmp_path / "d", tmp_path)


def test_the_same_image_in_train_and_val_is_reported_as_leakage(tmp_path, caplog):
  for split in ("train", "val"):
    for name, color in CLASS_COLORS.items():
      write_image(tmp_path / "d" / split / name / f"{split}_{name}.jpg", color)
  for name in ("red", "blue"):
    shutil.copy(tmp_path / "d" / "train" / name / f"train_{name}.jpg", tmp_path / "d" / "val" / name / "copy.jpg")
  with caplog.at_level(logging.WARNING):
    _load(tmp_path / "d", tmp_path)
  warnings = [r.getMessage() for r in caplog.records if "leakage" in r.getMessage()]
  assert len(warnings) == 1 and warnings[0].startswith("Data leakage: 2 validation image(s)")


def test_leaked_pairs_match_by_content_not_name():
  digests = {"t/a.jpg": "1", "t/b.jpg": "2", "v/x.jpg": "2", "v/a.jpg": "3"}
  assert data_checks.leaked(["t/a.jpg", "t/b.jpg"], ["v/x.jpg", "v/a.jpg"], digests) == [("t/b.jpg", "v/x.jpg")]


def test_odd_paths_and_broken_files_work_end_to_end(tmp_path, tiny_config):
  """Spaces and non-ASCII in folders and class names reach the export's labels; the skipped file, the report."""
  root = tmp_path / "mes photos"
  names = {"chat noir": (20, 20, 20), "éléphant gris": (130, 130, 130), "пчела": (230, 200, 40)}
  for name, color in names.items():
    for i in range(4):
      write_image(root / name / f"photo {i} é.jpg", color)
  (root / "пчела" / "broken ü.jpg").write_bytes(b"GIF89a but nothing else")
  config = tiny_config.replace(data_dir=str(root), frozen_epochs=1, finetune_epochs=0, validation_split=0.25,
                               top_k=3)
  metrics = train.train_and_evaluate(config, str(tmp_path / "run"), exporter=end_of_run.SavedModelExport())
  with open(tmp_path / "run" / "report" / "metrics.json", encoding="utf-8") as f:
    report = json.load(f)
  assert [entry["path"] for entry in report["skipped_files"]] == [str(root / "пчела" / "broken ü.jpg")]
  assert report["classes"] == sorted(names)
  facts = json.loads((tmp_path / "run" / "config.json").read_text(encoding="utf-8"))["run"]
  assert facts["train_examples"] + facts["val_examples"] == 12  # The skipped file is not counted.
  served = tf.saved_model.load(metrics["export_path"]).signatures["serving_default"]
  image_bytes = (root / "éléphant gris" / "photo 0 é.jpg").read_bytes()
  outputs = served(image_bytes=tf.constant([image_bytes]))
  assert {label.decode("utf-8") for label in outputs["top_k_classes"].numpy()[0]} == set(names)
