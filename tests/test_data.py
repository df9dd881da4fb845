"""Sources (folders, CSV, TFDS), their user errors, the decoded-image cache, shuffling and class weights."""

import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from conftest import CLASS_COLORS, write_image

from trainer import config_checks
from trainer.config import Config
from trainer.errors import UserInputError
from trainer.input import cache as cache_lib
from trainer.input import data, data_checks

SIZE = 16


def _load(tmp_path, **values):
  return data.load(Config().replace(**values).data, SIZE, str(tmp_path / "cache"))


def _labelled(examples: data.Examples, classes) -> dict[str, str]:
  return {os.path.basename(path): classes[label] for path, label in zip(examples.paths, examples.labels)}


def _mean_colour_class(image) -> int:
  """Index in CLASS_COLORS of the colour nearest to the image's mean colour."""
  mean = np.asarray(image).reshape(-1, 3).mean(axis=0)
  return int(np.argmin([np.abs(mean - np.array(c)).sum() for c in CLASS_COLORS.values()]))


def test_class_folders_yield_every_file_once_with_its_label(color_folder, tmp_path):
  inputs = _load(tmp_path, data_dir=str(color_folder), validation_split=0.5)
  assert inputs.classes == ("blue", "green", "red")
  every = {**_labelled(inputs.train, inputs.classes), **_labelled(inputs.val, inputs.classes)}
  assert len(inputs.train) + len(inputs.val) == len(every) == 18
  assert all(name.startswith(label) for name, label in every.items())
  for image, label in inputs.train.images:
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == tf.float32
    assert list(CLASS_COLORS)[_mean_colour_class(image)] == inputs.classes[int(label)]


def test_train_and_val_folders_keep_their_split(tmp_path):
  for split, count in (("train", 3), ("validation", 2)):
    for name, color in CLASS_COLORS.items():
      for i in range(count):
        write_image(tmp_path / "d" / split / name / f"{name}_{i}.png", color, fmt="PNG")
  inputs = _load(tmp_path, data_dir=str(tmp_path / "d"))
  assert (len(inputs.train), len(inputs.val)) == (9, 6)
  assert all("/validation/" in path for path in inputs.val.paths)


def test_csv_rows_with_spaces_unicode_and_a_header_yield_their_labels(tmp_path):
  rows = ["path,label"]
  for name, color in CLASS_COLORS.items():
    label = f"{name} clé"
    for i in range(3):
      write_image(tmp_path / "photos dir" / f"{name} ü {i}.jpg", color)
      rows.append(f"photos dir/{name} ü {i}.jpg,{label}")
  (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
  inputs = _load(tmp_path, csv=str(tmp_path / "labels.csv"), validation_split=0.34)
  assert inputs.classes == ("blue clé", "green clé", "red clé")
  assert (len(inputs.train), len(inputs.val)) == (6, 3)
  for examples in (inputs.train, inputs.val):
    for name, label in _labelled(examples, inputs.classes).items():
      assert label.startswith(name.split(" ")[0])
    for (image, label), path in zip(examples.images, examples.paths):
      assert list(CLASS_COLORS)[_mean_colour_class(image)] == inputs.classes[int(label)].split(" ")[0], path


@pytest.mark.parametrize("rows, message", [
    (["a.jpg,cat", "missing.jpg,dog"], "do not exist"),
    (["a.jpg,cat", "b.jpg,"], "line 2"),
    (["a.jpg,cat", "b.jpg,cat"], "at least two"),
    (["a.jpg,cat", "a.jpg,dog"], "labelled both"),
])
def test_csv_mistakes_are_named(tmp_path, rows, message):
  for name in ("a.jpg", "b.jpg"):
    write_image(tmp_path / name, (100, 100, 100))
  (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
  with pytest.raises(UserInputError, match=message):
    _load(tmp_path, csv=str(tmp_path / "labels.csv"))


def test_folder_mistakes_are_named(color_folder, tmp_path):
  with pytest.raises(UserInputError, match="no such folder"):
    _load(tmp_path, data_dir=str(tmp_path / "nowhere"))
  with pytest.raises(UserInputError, match="Pass only one data source"):
    _load(tmp_path, data_dir=str(color_folder), csv="x.csv")
  (color_folder / "empty").mkdir()
  with pytest.raises(UserInputError, match=r"empty holds no images"):
    _load(tmp_path, data_dir=str(color_folder))
  with pytest.raises(UserInputError, match=r"1 class\(es\) \['only'\]"):
    write_image(tmp_path / "single" / "only" / "a.jpg", (1, 2, 3))
    _load(tmp_path, data_dir=str(tmp_path / "single"))


def test_train_and_val_class_folders_must_match(tmp_path):
  for split, names in (("train", ("cat", "dog")), ("val", ("cat", "bird"))):
    for name in names:
      write_image(tmp_path / "d" / split / name / "a.jpg", (9, 9, 9))
  with pytest.raises(UserInputError, match=r"only in train: \['dog'\], only in validation: \['bird'\]"):
    _load(tmp_path, data_dir=str(tmp_path / "d"))


def test_hidden_files_and_folders_are_ignored(color_folder, tmp_path):
  (color_folder / "red" / ".DS_Store").write_bytes(b"\0\1 not an image")
  (color_folder / "red" / "._red_0.jpg").write_bytes(b"resource fork")
  (color_folder / ".thumbnails").mkdir()
  write_image(color_folder / ".thumbnails" / "x.jpg", (0, 0, 0))
  inputs = _load(tmp_path, data_dir=str(color_folder))
  assert inputs.classes == ("blue", "green", "red")
  assert not inputs.skipped
  assert not any(os.path.basename(p).startswith(".") for p in inputs.train.paths + inputs.val.paths)


class _TinyColors:
  """A TFDS dataset built locally (tfds downloads fail offline): 12 solid images, 'dark' and 'light'."""

  @staticmethod
  def build(data_dir, with_validation: bool):
    import tensorflow_datasets as tfds

    class TinyColors(tfds.core.GeneratorBasedBuilder):
      VERSION = tfds.core.Version("1.0.0")
      name = "tiny_colors_val" if with_validation else "tiny_colors"

      def _info(self):
        features = tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(None, None, 3)),
                                               "label": tfds.features.ClassLabel(names=["dark", "light"])})
        return tfds.core.DatasetInfo(builder=self, features=features, supervised_keys=("image", "label"))

      def _split_generators(self, dl_manager):
        splits = {"train": self._generate_examples(12)}
        if with_validation:
          splits["validation"] = self._generate_examples(4)
        return splits

      def _generate_examples(self, count):
        for i in range(count):
          yield i, {"image": np.full((20, 24, 3), 30 + 200 * (i % 2), np.uint8), "label": i % 2}

    TinyColors(data_dir=str(data_dir)).download_and_prepare()
    return TinyColors.name


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds")
  return root, _TinyColors.build(root, with_validation=False), _TinyColors.build(root, with_validation=True)


def _assert_brightness_matches_label(examples):
  seen = 0
  for image, label in examples.images:
    assert (float(tf.reduce_mean(image)) > 128) == (int(label) == 1)
    seen += 1
  assert seen == len(examples)


def test_tfds_carves_a_stratified_validation_split(tfds_dir, tmp_path):
  root, carved, _ = tfds_dir
  inputs = _load(tmp_path, tfds=carved, tfds_data_dir=str(root), validation_split=0.2)
  assert inputs.classes == ("dark", "light")
  assert (len(inputs.train), len(inputs.val)) == (10, 2)
  assert sorted(inputs.val.labels) == [0, 1] and inputs.train.paths is None
  _assert_brightness_matches_label(inputs.train)
  _assert_brightness_matches_label(inputs.val)
  # The export is checked on files; TFDS has none, so validation images are written as PNGs.
  samples = data.sample_files(inputs.val, str(tmp_path / "samples"), 8)
  assert len(samples) == 2 and all(os.path.getsize(path) for path in samples)


def test_tfds_uses_its_own_validation_split(tfds_dir, tmp_path):
  root, _, with_val = tfds_dir
  inputs = _load(tmp_path, tfds=with_val, tfds_data_dir=str(root))
  assert (len(inputs.train), len(inputs.val)) == (12, 4)
  _assert_brightness_matches_label(inputs.val)


def test_tfds_not_prepared_says_how_to_prepare(tfds_dir, tmp_path):
  root, carved, _ = tfds_dir
  with pytest.raises(UserInputError, match="tfds build"):
    _load(tmp_path, tfds=carved, tfds_data_dir=str(tmp_path / "empty"))


def _epoch(examples: data.Examples, seed):
  """(images, labels, weights, ids) of one epoch as numpy arrays."""
  parts = list(zip(*[tuple(t.numpy() for t in element) for element in examples.epoch(seed)]))
  return tuple(np.stack(part) for part in parts)


def test_a_disk_cache_of_changed_files_is_never_reused(color_folder, tmp_path):
  """The reported bug: the same file names with other pixels found the old cache and trained on old pixels."""
  cache = tmp_path / "shared_cache"
  first = _load(tmp_path, data_dir=str(color_folder), cache_dir=str(cache), cache="disk", validation_split=0.34)
  assert first.train.cache.mode == "disk"
  _epoch(first.train, None)
  cache_files = lambda: {name.split(".")[0] for name in os.listdir(cache) if name.startswith("images_")}  # noqa
  before = cache_files()
  for i in range(6):  # Swap the pixels of two classes, keeping every file name.
    red, blue = color_folder / "red" / f"red_{i}.jpg", color_folder / "blue" / f"blue_{i}.jpg"
    red_bytes = red.read_bytes()
    red.write_bytes(blue.read_bytes())
    blue.write_bytes(red_bytes)
  second = _load(tmp_path, data_dir=str(color_folder), cache_dir=str(cache), cache="disk", validation_split=0.34)
  images, labels, weights, _ = _epoch(second.train, None)
  classes = second.classes
  swapped = {"red": "blue", "blue": "red", "green": "green"}
  for image, label in zip(images, labels):
    assert list(CLASS_COLORS)[_mean_colour_class(image)] == swapped[classes[label]]
  assert second.identity != first.identity
  assert before < cache_files() and len(cache_files()) == 2 * len(before)  # New caches beside the old ones.


def test_disk_caches_shared_by_concurrent_runs_and_truncated_ones_are_rebuilt(color_folder, tmp_path, caplog):
  """Two runs sharing a --cache_dir with --cache=disk crashed with AlreadyExistsError on tf.data's lock file; a
  truncated cache file failed every rerun with OutOfRange."""
  import logging
  import threading
  cache = tmp_path / "shared_cache"
  values = dict(data_dir=str(color_folder), cache_dir=str(cache), cache="disk", validation_split=0.34)
  alone = _epoch(_load(tmp_path, **values).train, 3)
  shutil.rmtree(cache)
  results, errors = {}, []

  def run(name):
    try:
      results[name] = _epoch(_load(tmp_path, **values).train, 3)
    except Exception as e:  # noqa: BLE001 - the test reports whatever a thread raised.
      errors.append(e)
  threads = [threading.Thread(target=run, args=(name,)) for name in ("a", "b")]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert not errors, errors
  for name in ("a", "b"):
    for got, expected in zip(results[name], alone):
      np.testing.assert_array_equal(got, expected)
  assert not [name for name in os.listdir(cache) if "@" in name]  # No writer's file is left.

  data_file = next(path for path in cache.iterdir() if ".data-" in path.name and "images_" in path.name)
  data_file.write_bytes(data_file.read_bytes()[:1000])
  with caplog.at_level(logging.WARNING):
    rebuilt = _epoch(_load(tmp_path, **values).train, 3)
  for got, expected in zip(rebuilt, alone):
    np.testing.assert_array_equal(got, expected)
  assert any("does not read back" in r.getMessage() for r in caplog.records)
  assert (cache / "corrupt").is_dir()


@pytest.mark.parametrize("mode", ["memory", "disk", "none"])
def test_every_cache_mode_gives_the_same_uint8_pixels_in_the_same_seeded_order(color_folder, tmp_path, mode):
  reference = _load(tmp_path, data_dir=str(color_folder), cache="memory")
  inputs = _load(tmp_path, data_dir=str(color_folder), cache=mode, cache_dir=str(tmp_path / "c"))
  assert inputs.train.cache.mode == mode
  images, labels, weights, ids = _epoch(inputs.train, 7)
  assert images.dtype == np.uint8 and images.shape[1:] == (SIZE, SIZE, 3)
  expected = _epoch(reference.train, 7)
  if mode == "disk":  # Stored in a seeded random order, shuffled in a bounded buffer: the same examples.
    order, expected_order = np.argsort(ids), np.argsort(expected[3])
    images, labels, weights, ids = (part[order] for part in (images, labels, weights, ids))
    expected = tuple(part[expected_order] for part in expected)
  for got, want in zip((images, labels, weights, ids), expected):
    assert np.array_equal(got, want)
  assert not np.array_equal(_epoch(inputs.train, 7)[3], _epoch(inputs.train, 8)[3])  # Another seed, another order.
  assert sorted(ids) == sorted(inputs.train.ids)  # Every example once.


@pytest.mark.parametrize("order", [data.WHOLE, data.BUFFERED])
def test_a_runs_epoch_order_is_the_same_in_every_cache_mode(color_folder, tmp_path, order):
  """A resume whose cache mode changed (--memory_budget or free disk moved it from disk to none) trained other
  epochs: the run's order now decides the shuffle, never where the decoded images live."""
  epochs = {}
  for mode in ("memory", "disk", "none"):
    inputs = data.load(Config().replace(data_dir=str(color_folder), cache=mode, cache_dir=str(tmp_path / mode)).data,
                       SIZE, order=order)
    assert inputs.train.order == order
    if order == data.WHOLE and mode == "disk":
      assert inputs.train.cache.mode == "none" and "shuffled whole" in inputs.train.cache.reason
    epochs[mode] = _epoch(inputs.train, 7)
  for mode in ("disk", "none"):
    for got, want in zip(epochs[mode], epochs["memory"]):
      np.testing.assert_array_equal(got, want)
  assert sorted(epochs["memory"][3]) == sorted(inputs.train.ids)  # Every example once.


def test_auto_picks_memory_then_disk_then_none_from_the_budget_and_the_free_disk(color_folder, tmp_path,
                                                                                 monkeypatch):
  assert _load(tmp_path, data_dir=str(color_folder)).train.cache.mode == "memory"
  small = _load(tmp_path, data_dir=str(color_folder), memory_budget="100B")
  assert small.train.cache.mode == "disk" and "memory budget" in small.train.cache.reason
  monkeypatch.setattr(cache_lib, "_free_bytes", lambda folder: 10)
  full = _load(tmp_path, data_dir=str(color_folder), memory_budget="100B")
  assert full.train.cache.mode == "none"
  with pytest.raises(UserInputError, match="--cache=none"):
    _load(tmp_path, data_dir=str(color_folder), cache="disk")


@pytest.mark.parametrize("workers,pad_multiple", [(2, 4), (3, 2)])
def test_worker_shares_are_disjoint_padded_alike_and_cover_every_example_once(color_folder, tmp_path, workers,
                                                                               pad_multiple):
  shares = [data.load(Config().replace(data_dir=str(color_folder), validation_split=0.2).data, SIZE,
                      str(tmp_path / "cache"), data.Shard(index, workers), pad_multiple) for index in range(workers)]
  total = len(shares[0].train.all_labels)
  lengths = {share.train.padded_length for share in shares}
  assert len(lengths) == 1 and lengths.pop() % pad_multiple == 0
  for seed in (3, 4):
    real_ids = []
    for share in shares:
      images, labels, weights, ids = _epoch(share.train, seed)
      assert len(ids) == share.train.padded_length
      real_ids += list(ids[weights > 0])
      assert set(ids[weights == 0]) <= set(ids[weights > 0])  # Padding repeats the worker's own examples.
    assert sorted(real_ids) == list(range(total))  # Each example exactly once per epoch, over all workers.


def test_balanced_class_weights():
  assert data.class_weights("", [0, 0, 0, 1], 2) is None
  assert data.class_weights("balanced", [0, 0, 0, 1], 2) == [4 / 6, 2.0]
  with pytest.raises(UserInputError, match="--class_weight"):
    config_checks.validate(Config().replace(class_weight="inverse"))


def test_tfrecord_shards_give_the_folders_pixels_and_split_by_file_across_workers(color_folder, tmp_path):
  from trainer.input import tfrecords
  folder = Config().replace(data_dir=str(color_folder), validation_split=0.34).data
  tfrecords.convert(folder, str(tmp_path / "shards"), shards=2)
  from_files = data.load(folder, SIZE, str(tmp_path / "cache"))
  records = Config().replace(tfrecord=str(tmp_path / "shards" / "train-*"),
                             tfrecord_val=str(tmp_path / "shards" / "val-*")).data
  from_records = data.load(records, SIZE, str(tmp_path / "cache"))
  assert from_records.classes == from_files.classes
  assert sorted(from_records.train.labels) == sorted(from_files.train.labels)
  as_pixels = lambda examples: sorted(image.tobytes() for image in _epoch(examples, None)[0])  # noqa: E731
  assert as_pixels(from_records.train) == as_pixels(from_files.train)  # The same images.load: the same pixels.
  shares = [data.load(records, SIZE, str(tmp_path / "cache"), data.Shard(index, 2), 2) for index in range(2)]
  assert len({share.train.padded_length for share in shares}) == 1
  real = [i for share in shares for i, w in zip(*_epoch(share.train, 5)[3:1:-1]) if w > 0]
  assert sorted(real) == list(range(len(from_records.train.all_labels)))


def _undecodable(color_folder) -> str:
  broken = color_folder / "red" / "red_9.jpg"
  broken.write_bytes(b"not an image at all")
  return str(broken)


def _decodes_in_checks(monkeypatch) -> list[str]:
  """The file names that data_checks.check_file decodes from now on."""
  decoded, original = [], data_checks.check_file

  def check_file(path, max_pixels, decode=True):
    if decode:
      decoded.append(os.path.basename(path))
    return original(path, max_pixels, decode)
  monkeypatch.setattr(data_checks, "check_file", check_file)
  return decoded


def test_without_a_cache_an_undecodable_file_becomes_a_stand_in_of_weight_0_and_is_reported_once(
    color_folder, tmp_path, monkeypatch, caplog):
  broken = _undecodable(color_folder)
  decoded_in_checks = _decodes_in_checks(monkeypatch)
  inputs = _load(tmp_path, data_dir=str(color_folder), cache="none", validation_split=0.34)
  assert not decoded_in_checks and not inputs.skipped  # Nothing is decoded before the first epoch.
  split = inputs.train if broken in inputs.train.paths else inputs.val
  broken_id = split.ids[split.paths.index(broken)]
  for seed in (3, 4):
    images, labels, weights, ids = _epoch(split, seed)
    assert len(ids) == split.padded_length  # The same steps as if every file decoded.
    assert sorted(ids[weights > 0]) == sorted(set(split.ids) - {broken_id})  # Every other example once.
    assert list(ids[ids < 0]) == [-1 - broken_id] and weights[ids < 0] == [0] and not images[ids < 0].any()
  # The decoder's own words (called in a tf.data thread, its error starts "Graph execution error:").
  assert list(inputs.skipped) == [broken] and "cannot be decoded (Unknown image file format" in inputs.skipped[broken]
  assert decoded_in_checks == ["red_9.jpg"]  # Once, for the decoder's message.
  assert len([r for r in caplog.records if broken in r.getMessage()]) == 1  # Warned once over two epochs.
  assert len(list(split.images)) == len(split) - 1  # Extraction and evaluation see the real examples only.
  assert broken not in data.sample_files(split, str(tmp_path / "samples"), len(split))
  # Features extracted by an earlier process lack the example: training names it from their ids.
  again = _load(tmp_path, data_dir=str(color_folder), cache="none", validation_split=0.34)
  (again.train if broken in again.train.paths else again.val).note_undecodable([broken_id])
  assert list(again.skipped) == [broken] and "Unknown image file format" in again.skipped[broken]


def test_a_data_service_decodes_the_share_and_gives_every_example_once(color_folder, tmp_path, monkeypatch):
  from trainer.input import service as data_service
  broken = _undecodable(color_folder)
  dispatcher = data_service.start_dispatcher()
  worker = data_service.start_worker(dispatcher.target, worker_address="localhost")
  try:
    local = _load(tmp_path, data_dir=str(color_folder), cache="none")
    decoded_in_checks = _decodes_in_checks(monkeypatch)
    served = _load(tmp_path, data_dir=str(color_folder), cache="none", data_service=dispatcher.target)
    assert not decoded_in_checks and broken in served.train.paths  # The trainer decodes nothing: the service does.
    want = {int(i): image for image, i in zip(_epoch(local.train, None)[0], _epoch(local.train, None)[3])}
    for seed in (None, 3):
      images, labels, weights, ids = _epoch(served.train, seed)
      assert sorted(ids) == sorted(want)
      assert all(np.array_equal(image, want[int(i)]) for image, i in zip(images, ids))  # The same pixels.
      assert list(ids[ids < 0]) == [-1 - served.train.ids[served.train.paths.index(broken)]]
      assert weights[ids < 0] == [0]
    assert list(served.skipped) == [broken]  # The stand-in made on the service is recorded here.
  finally:
    worker.stop()
    dispatcher.stop()


def test_a_cached_split_decodes_each_file_once_and_still_skips_undecodable_ones(color_folder, tmp_path,
                                                                                 monkeypatch, caplog):
  broken = _undecodable(color_folder)
  decoded_in_checks = _decodes_in_checks(monkeypatch)
  inputs = _load(tmp_path, data_dir=str(color_folder), cache="memory", validation_split=0.34)
  # Only the file the cache fill could not decode is decoded by the check, for the decoder's message.
  assert decoded_in_checks == ["red_9.jpg"] and broken not in inputs.train.paths + inputs.val.paths
  assert list(inputs.skipped) == [str(color_folder / "red" / "red_9.jpg")]
  assert "cannot be decoded" in inputs.skipped[str(color_folder / "red" / "red_9.jpg")]
  assert len(inputs.train) + len(inputs.val) == 18
  assert "Skipping 1 image file" in caplog.text


def test_records_are_shuffled_alike_whether_kept_in_memory_or_streamed(color_folder, tmp_path, monkeypatch):
  """A TFRecord run's epochs depended on where its records lived (a whole shuffle in memory, a buffer when
  streamed): a resume whose memory budget changed trained other epochs. A buffer smaller than the split, as it is
  for any real one."""
  from trainer.input import tfrecords
  monkeypatch.setattr(data, "_MAX_SHUFFLE_BUFFER", 4)
  tfrecords.convert(Config().replace(data_dir=str(color_folder), validation_split=0.34).data,
                    str(tmp_path / "shards"), shards=2)
  records = dict(tfrecord=str(tmp_path / "shards" / "train-*"), tfrecord_val=str(tmp_path / "shards" / "val-*"))
  epochs = [_epoch(data.load(Config().replace(cache=mode, **records).data, SIZE, str(tmp_path / mode)).train, 7)
            for mode in ("memory", "none")]
  for in_memory, streamed in zip(*epochs):
    np.testing.assert_array_equal(in_memory, streamed)


def test_a_full_disk_while_filling_the_image_cache_is_one_line(color_folder, tmp_path, monkeypatch):
  """The last of the places where a full disk ended in a traceback; the partial fill is removed."""
  def full_disk(decoded):
    raise tf.errors.ResourceExhaustedError(None, None, "cache_dataset_ops: No space left on device")
  monkeypatch.setattr(cache_lib, "_positions_in", full_disk)
  cache = tmp_path / "cache"
  with pytest.raises(UserInputError, match=f"The disk holding {cache} is full: the decoded-image cache needs"):
    _load(tmp_path, data_dir=str(color_folder), cache="disk")
  assert not [name for name in os.listdir(cache) if "@" in name]
