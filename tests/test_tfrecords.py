"""TFRecord shards: folder -> shards -> scan/dataset round trip, bad records skipped and counted with the shard
named (or refused with --strict_data), class names, shards split across input pipelines by file."""

import collections
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO, write_color_dataset

from trainer.config import Config
from trainer.errors import UserInputError
from trainer.input import data, images, tfrecords


def _jpeg(color=(200, 30, 30), size=(20, 16)) -> bytes:
  pixels = np.full((size[1], size[0], 3), color, np.uint8)
  return tf.io.encode_jpeg(pixels).numpy()


def _write(path, records) -> str:
  """A shard of (image bytes, label, text) examples, or raw bytes records."""
  with tf.io.TFRecordWriter(str(path)) as writer:
    for record in records:
      writer.write(record if isinstance(record, bytes) else tfrecords.example(*record).SerializeToString())
  return str(path)


def _contents(dataset) -> collections.Counter:
  return collections.Counter((bytes(image), int(label)) for image, label in dataset.as_numpy_iterator())


def _file_contents(split, classes=None) -> collections.Counter:
  return collections.Counter((open(path, "rb").read(), label) for path, label in zip(split.paths, split.labels))


def test_folder_to_shards_round_trip_keeps_every_image_its_label_and_class_names(tmp_path):
  config = Config().replace(data_dir=str(write_color_dataset(tmp_path / "colors", 5)), validation_split=0.4).data
  written = tfrecords.convert(config, str(tmp_path / "shards"), shards=2)
  files = tfrecords.usable_files(config)
  assert written == {"train": len(files.train), "val": len(files.val)}
  assert len(tf.io.gfile.glob(str(tmp_path / "shards" / "train-*"))) == 2
  for split, name in ((files.train, "train"), (files.val, "val")):
    glob = str(tmp_path / "shards" / f"{name}-*")
    classes, labels, skipped = tfrecords.scan(glob)
    assert classes == files.classes and not skipped
    assert collections.Counter(labels) == collections.Counter(split.labels)
    assert _contents(tfrecords.dataset(glob)) == _file_contents(split)


def test_the_command_writes_train_and_val_shards_and_refuses_to_mix_with_old_ones(tmp_path):
  data_dir, output = write_color_dataset(tmp_path / "colors", 4), tmp_path / "out"
  command = [sys.executable, "-m", "trainer.to_tfrecord", f"--data_dir={data_dir}", f"--output={output}",
             "--shards=3"]
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert "--tfrecord=" in done.stdout
  assert sorted(os.listdir(output)) == [f"{split}-{i:05d}-of-00003.tfrecord" for split in ("train", "val")
                                        for i in range(3)]
  config = Config().replace(data_dir=str(data_dir)).data
  with pytest.raises(UserInputError, match="--output=.*already holds 6 shard"):
    tfrecords.convert(config, str(output), shards=3)


def test_truncated_shard_keeps_its_readable_records_and_is_counted_and_named(tmp_path):
  good = _write(tmp_path / "a-0", [(_jpeg(), 0, "red"), (_jpeg(), 1, "blue")])
  cut = _write(tmp_path / "a-1", [(_jpeg((0, 0, 200)), 1, "blue")] * 4)
  content = open(cut, "rb").read()
  with open(cut, "wb") as f:
    f.write(content[:-30])  # The last record is cut short.
  scanned = tfrecords.scan(str(tmp_path / "a-*"))
  assert scanned.labels == (0, 1, 1, 1, 1)
  assert list(scanned.skipped) == [f"{cut} from record 3"]
  assert "truncated" in scanned.skipped[f"{cut} from record 3"]
  assert sum(_contents(tfrecords.dataset(scanned)).values()) == 5
  with pytest.raises(UserInputError, match=f"1 TFRecord record.*--strict_data.*{cut}"):
    tfrecords.scan(str(tmp_path / "a-*"), strict=True)
  assert good


def test_undecodable_unparseable_and_unlabelled_records_are_skipped_counted_and_named(tmp_path):
  shard = _write(tmp_path / "s-0", [(_jpeg(), 0, "red"), (_jpeg()[:40], 0, "red"), b"not an Example",
                                    (_jpeg(), -1, ""), (_jpeg((0, 0, 200)), 1, "blue")])
  scanned = tfrecords.scan(str(tmp_path / "s-*"))
  assert scanned.labels == (0, 1)
  assert sorted(scanned.skipped) == [f"{shard} record {i}" for i in (1, 2, 3)]
  assert "cannot be decoded" in scanned.skipped[f"{shard} record 1"]
  assert "not a tf.train.Example" in scanned.skipped[f"{shard} record 2"]
  assert "label -1" in scanned.skipped[f"{shard} record 3"]
  assert [tfrecords.record_name(scanned, position) for position in (0, 1)] == [f"{shard} record 0",
                                                                             f"{shard} record 4"]
  # The stream skips the same records: every image it yields decodes.
  streamed = list(tfrecords.dataset(scanned).map(
      lambda image, label: (images.load(image, 8), label)).as_numpy_iterator())
  assert [int(label) for _, label in streamed] == [0, 1]
  with pytest.raises(UserInputError, match="3 TFRecord record"):
    tfrecords.scan(str(tmp_path / "s-*"), strict=True)
  # Decoding at the training size finds the same records.
  assert tfrecords.scan(str(tmp_path / "s-*"), image_size=8).skipped.keys() == scanned.skipped.keys()


def test_training_decodes_each_record_once_and_names_the_one_that_fails_when_an_epoch_meets_it(tmp_path):
  noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
  cut = tf.io.encode_jpeg(noise).numpy()[:2000]  # Its header is whole: it fails only when decoded.
  shard = _write(tmp_path / "s-0", [(_jpeg(), 0, "red"), (cut, 0, "red"), (_jpeg((0, 0, 200)), 1, "blue"),
                                    (_jpeg((0, 0, 190)), 1, "blue")])
  given = dict(tfrecord=str(tmp_path / "s-*"), tfrecord_val=str(tmp_path / "s-*"), cache="none")
  inputs = data.load(Config().replace(**given).data, 8)
  assert not inputs.skipped and len(inputs.train) == 4  # Only read and parsed: nothing decoded yet.
  elements = list(inputs.train.epoch(1).as_numpy_iterator())
  assert sorted(int(index) for *_, index in elements) == [-2, 0, 2, 3]  # The stand-in of record 1: id -1 - 1.
  assert [float(weight) for _, _, weight, index in elements if index < 0] == [0.0]
  assert list(inputs.skipped) == [f"{shard} record 1"] and "cannot be decoded" in inputs.skipped[f"{shard} record 1"]
  with pytest.raises(UserInputError, match="1 TFRecord record.*--strict_data"):
    data.load(Config().replace(**given, strict_data=True).data, 8)
  # A disk cache holds the stand-in: a later process that reuses the cache names the record too.
  for _ in range(2):
    cached = data.load(Config().replace(**{**given, "cache": "disk"}).data, 8, str(tmp_path / "cache"))
    assert cached.train.cache.mode == "disk" and not cached.skipped
    list(cached.train.epoch(2))
    assert list(cached.skipped) == [f"{shard} record 1"]
  # One cache file (the training split's), filled by the first load and read by the second.
  assert len([name for name in os.listdir(tmp_path / "cache") if name.endswith(".index")]) == 1


def test_records_whose_header_exceeds_max_image_pixels_are_skipped_before_decoding(tmp_path, monkeypatch):
  # 60x50 = 3,000 pixels: over a limit of 2,000, whatever the format.
  png = tf.io.encode_png(np.zeros((50, 60, 3), np.uint8)).numpy()
  shard = _write(tmp_path / "s-0", [(_jpeg(size=(60, 50)), 0, "a"), (png, 0, "a"), (_jpeg(), 1, "b")])
  scanned = tfrecords.scan(str(tmp_path / "s-*"), max_pixels=2000)
  assert scanned.labels == (1,)
  for index in (0, 1):
    assert scanned.skipped[f"{shard} record {index}"] == ("its image is 60x50 pixels, more than "
                                                          "--max_image_pixels=2000")
  assert tfrecords.scan(str(tmp_path / "s-*"), max_pixels=3000).labels == (0, 0, 1)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP"])
def test_header_size_reads_height_and_width_without_decoding(fmt):
  import io

  from PIL import Image
  encoded = io.BytesIO()
  Image.fromarray(np.zeros((37, 53, 3), np.uint8)).save(encoded, fmt)
  assert images.header_size(encoded.getvalue()).numpy().tolist() == [37, 53]


def test_class_names_come_from_class_text_else_the_label_ids(tmp_path):
  _write(tmp_path / "named", [(_jpeg(), 2, "zebra"), (_jpeg(), 0, "ant"), (_jpeg(), 1, "bee")])
  assert tfrecords.scan(str(tmp_path / "named")).classes == ("ant", "bee", "zebra")
  _write(tmp_path / "ids", [(_jpeg(), 1, ""), (_jpeg(), 0, "")])
  assert tfrecords.scan(str(tmp_path / "ids")).classes == ("0", "1")
  _write(tmp_path / "conflict", [(_jpeg(), 0, "ant"), (_jpeg(), 0, "bee")])
  with pytest.raises(UserInputError, match="label 0 is named"):
    tfrecords.scan(str(tmp_path / "conflict"))


def test_a_glob_of_nothing_names_the_flag(tmp_path):
  with pytest.raises(UserInputError, match="--tfrecord_val=.*matches no files"):
    tfrecords.scan(str(tmp_path / "none-*"), flag="--tfrecord_val")


def test_shards_are_split_across_input_pipelines_by_file(tmp_path):
  for shard in range(3):
    _write(tmp_path / f"t-{shard}", [(_jpeg((shard * 100, 0, 0)), shard, f"c{shard}")] * (shard + 1))
  glob = str(tmp_path / "t-*")
  scanned = tfrecords.scan(glob)

  def labels_read(pipeline):
    context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline)
    return sorted(int(label) for _, label in tfrecords.dataset(scanned, context).as_numpy_iterator())

  assert labels_read(0) == [0, 2, 2, 2]  # Shards 0 and 2, whole.
  assert labels_read(1) == [1, 1]
  with pytest.raises(UserInputError, match="3 shard.*4 input pipelines.*--shards=4"):
    tfrecords.dataset(scanned, tf.distribute.InputContext(num_input_pipelines=4))


def test_select_keeps_exactly_the_chosen_usable_records(tmp_path):
  _write(tmp_path / "u-0", [(_jpeg(), 0, ""), b"bad", (_jpeg(), 1, ""), (_jpeg(), 2, "")])
  _write(tmp_path / "u-1", [(_jpeg(), 3, ""), (_jpeg(), 4, "")])
  scanned = tfrecords.scan(str(tmp_path / "u-*"))
  assert scanned.labels == (0, 1, 2, 3, 4)
  chosen = tfrecords.dataset(scanned, select=[1, 3])
  assert sorted(int(label) for _, label in chosen.as_numpy_iterator()) == [1, 3]


def test_validation_shards_must_have_the_training_classes(tmp_path):
  train = tfrecords.scan(_write(tmp_path / "train", [(_jpeg(), 0, "ant"), (_jpeg(), 1, "")]))
  named_val = tfrecords.scan(_write(tmp_path / "val", [(_jpeg(), 1, "bee")]))
  assert tfrecords.merged_classes(train, named_val) == ("ant", "bee")
  extra = tfrecords.scan(_write(tmp_path / "extra", [(_jpeg(), 2, "")]))
  with pytest.raises(UserInputError, match=r"--tfrecord_val: .*label\(s\) \[2\]"):
    tfrecords.merged_classes(train, extra)
  renamed = tfrecords.scan(_write(tmp_path / "renamed", [(_jpeg(), 0, "wasp")]))
  with pytest.raises(UserInputError, match="Label 0 is 'ant' in --tfrecord but 'wasp'"):
    tfrecords.merged_classes(train, renamed)
