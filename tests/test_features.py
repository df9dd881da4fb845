"""The frozen phase on cached features trains the same head as end-to-end frozen training, and fine-tuning goes on
from it."""

import json

import numpy as np
import pytest
import tensorflow as tf

from trainer.input import data
from trainer.loop import features, train
from trainer.loop.restore import restore
from trainer.modeling import augment
from trainer.modeling import model as model_lib
from trainer.runtime import runtime


def _history(workdir):
  with open(workdir / "report" / "history.json", encoding="utf-8") as f:
    return json.load(f)


def test_cached_features_train_the_same_head_and_fine_tuning_continues_from_it(color_folder, tmp_path, tiny_config):
  config = tiny_config.replace(data_dir=str(color_folder), frozen_epochs=2, finetune_epochs=1,
                               frozen_lr=1e-2, finetune_lr=1e-3, dropout=0.3)
  runs = {}
  for cached in (False, True):
    workdir = tmp_path / f"cached_{cached}"
    train.train_and_evaluate(config.replace(cache_features=cached), str(workdir))
    runs[cached] = (_history(workdir), restore(str(workdir)).model)

  (plain_history, plain), (cached_history, cached) = runs[False], runs[True]
  for plain_epoch, cached_epoch in zip(plain_history, cached_history):
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
      np.testing.assert_allclose(cached_epoch[key], plain_epoch[key], rtol=1e-4, atol=1e-5, err_msg=key)
  # After fine-tuning (which changed the head and the top of the backbone) all weights still agree.
  assert plain_history[0]["loss"] != plain_history[-1]["loss"]
  for plain_weight, cached_weight in zip(plain.weights, cached.weights):
    np.testing.assert_allclose(cached_weight.numpy(), plain_weight.numpy(), rtol=1e-4, atol=1e-5,
                               err_msg=plain_weight.path)


def _model_and_images(tiny_config, color_folder, tmp_path):
  config = runtime.resolve(tiny_config.replace(data_dir=str(color_folder)))
  inputs = data.load(config.data, config.data.image_size, str(tmp_path / "cache"))
  model = model_lib.build_classifier(config.model, len(inputs.classes), config.data.image_size, config.data.seed)
  return config, model, inputs.train.images


def test_extract_gives_the_models_pooled_features_and_the_head_gives_its_output(tiny_config, color_folder,
                                                                                 tmp_path):
  config, model, images = _model_and_images(tiny_config, color_folder, tmp_path)
  found, labels = features.extract(model, images, batch_size=5)
  batch = np.stack([image for image, _ in images.as_numpy_iterator()])
  assert found.shape == (len(batch), model.get_layer("pool").output.shape[-1])
  np.testing.assert_array_equal(labels, [label for _, label in images.as_numpy_iterator()])
  # Batches of 5 against one batch of all: oneDNN picks other kernels and summation orders (measured up to 1e-4);
  # a wrong layer or order would be off by O(1).
  np.testing.assert_allclose(found, features.feature_model(model)(batch), atol=1e-3)
  np.testing.assert_allclose(features.head_of(model)(found), model(batch), atol=1e-3)


def test_augmented_views_differ_and_unaugmented_ones_are_one(tiny_config, color_folder, tmp_path):
  config, model, images = _model_and_images(tiny_config, color_folder, tmp_path)
  augmenter = augment.build(config.replace(augment="classic").train, seed=0)
  views, _ = features.extract_views(model, images, 8, augmenter, views=3)
  assert views.shape[0] == 3
  assert not np.allclose(views[0], views[1]) and not np.allclose(views[1], views[2])
  plain, _ = features.extract_views(model, images, 8, None, views=3)
  assert plain.shape[0] == 1
  cache = features.FeatureCache(model, images, images, 8, augmenter, views=3)
  epoch_batches = [np.concatenate([f for f, _ in cache.train_batches(epoch, 8, shuffle_seed=0)
                                   .as_numpy_iterator()]) for epoch in (0, 1, 3)]
  # Epoch e trains on view e mod 3, in the same shuffled order for the same seed.
  np.testing.assert_array_equal(epoch_batches[0], epoch_batches[2])
  assert not np.allclose(epoch_batches[0], epoch_batches[1])
  assert tf.reduce_all(tf.equal(cache.val_features.shape, plain[0].shape))


def test_load_or_extract_extracts_once_and_reads_the_same_features_back(tiny_config, color_folder, tmp_path,
                                                                          monkeypatch):
  config, model, images = _model_and_images(tiny_config, color_folder, tmp_path)
  augmenter = augment.build(config.replace(augment="classic").train, seed=0)
  first = features.load_or_extract(model, images, images, 8, augmenter, 2, str(tmp_path / "cache"), "k1")
  monkeypatch.setattr(features, "extract_views", lambda *args: pytest.fail("extracted again"))
  again = features.load_or_extract(model, images, images, 8, augmenter, 2, str(tmp_path / "cache"), "k1")
  for name in ("train_features", "train_labels", "val_features", "val_labels"):
    np.testing.assert_array_equal(getattr(again, name), getattr(first, name), err_msg=name)
  assert again.views == 2
  assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith("features_")] == ["features_k1.npz"]


def test_a_corrupt_or_unwritable_features_file_is_rebuilt_not_fatal(tiny_config, color_folder, tmp_path,
                                                                     monkeypatch, caplog):
  """A truncated .npz failed every rerun (BadZipFile); a full disk while writing it stopped the run and left a 0-byte
  partial; a killed writer's .partial.npz stayed forever."""
  import errno
  import logging
  config, model, images = _model_and_images(tiny_config, color_folder, tmp_path)
  cache = tmp_path / "cache"
  first = features.load_or_extract(model, images, images, 8, None, 1, str(cache), "k1")
  stored = cache / "features_k1.npz"
  stored.write_bytes(stored.read_bytes()[:100])
  dead = cache / "features_k2.npz.thathost.1.partial.npz"  # Another host's: never removed from here.
  own_dead = cache / f"features_k3.npz.{features.socket.gethostname()}.999999999.partial.npz"
  dead.write_bytes(b"x")
  own_dead.write_bytes(b"x")
  with caplog.at_level(logging.WARNING):
    again = features.load_or_extract(model, images, images, 8, None, 1, str(cache), "k1")
  np.testing.assert_array_equal(again.train_features, first.train_features)
  assert (cache / "corrupt" / "features_k1.npz").is_file() and stored.is_file()
  assert any("do not read back" in r.getMessage() for r in caplog.records)
  assert dead.exists() and not own_dead.exists()

  def full_disk(path, **arrays):
    with open(path, "wb") as f:
      f.write(b"partial")
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(features.np, "savez", full_disk)
  with caplog.at_level(logging.WARNING):
    in_memory = features.load_or_extract(model, images, images, 8, None, 1, str(cache), "k4")
  np.testing.assert_array_equal(in_memory.train_features, first.train_features)
  assert not list(cache.glob("features_k4*"))  # Neither the file nor its partial.
  assert any(f"disk holding {cache} is full" in r.getMessage() for r in caplog.records)


def test_runs_sharing_a_cache_dir_extract_the_features_once(color_folder, tmp_path, tiny_config, monkeypatch):
  # Another fine-tune rate and head: the same features (a sweep extracts once); the decoded images are shared too.
  config = tiny_config.replace(data_dir=str(color_folder), frozen_epochs=1, finetune_epochs=1,
                               cache_dir=str(tmp_path / "shared"))
  train.train_and_evaluate(config, str(tmp_path / "first"))
  assert len(list((tmp_path / "shared").glob("features_*.npz"))) == 1
  monkeypatch.setattr(features, "extract_views", lambda *args: pytest.fail("extracted again"))
  train.train_and_evaluate(config.replace(finetune_lr=3e-4, head_units=16), str(tmp_path / "second"))
  assert not list((tmp_path / "second" / "cache").glob("features_*.npz"))


def test_the_cache_key_changes_with_what_the_features_depend_on_only(tiny_config, tmp_path):
  weights = tmp_path / "weights.h5"
  weights.write_bytes(b"weights")
  config = runtime.resolve(tiny_config.replace(weights=str(weights), augment="light", feature_views=2))
  key = features.cache_key(config, "data-a", "float32")
  assert features.cache_key(config.replace(head_units=64, dropout=0.5, frozen_lr=0.1, finetune_epochs=9),
                            "data-a", "float32") == key
  changed = [config.replace(image_size=40), config.replace(seed=1), config.replace(feature_views=3),
             config.replace(augment="classic"), config.replace(rotation=5.0), config.replace(alpha=0.5),
             config.replace(batch_size=4), config.replace(feature_layer="conv_pw_12")]
  keys = {features.cache_key(other, "data-a", "float32") for other in changed}
  keys |= {features.cache_key(config, "data-b", "float32"), features.cache_key(config, "data-a", "mixed_float16")}
  weights.write_bytes(b"other weights")  # the same file name, replaced
  keys.add(features.cache_key(config, "data-a", "float32"))
  assert key not in keys and len(keys) == len(changed) + 3
  # Without augmentation the views setting does not change the one plain view computed.
  plain = config.replace(augment="none")
  assert features.cache_key(plain, "d", "float32") == features.cache_key(plain.replace(feature_views=4), "d",
                                                                          "float32")
