"""The training loop under the default strategy and MirroredStrategy over two logical CPUs, in-process, with the
defaults' randomness on: every training example is trained on exactly once per epoch (counted by id, not
inferred from a mean), replicas draw their own augmentation, the random streams follow (seed, epoch, step), and
float16's loss scale skips a non-finite step."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_run, write_color_dataset

from trainer.config import Config
from trainer.loop import steps, train
from trainer.modeling import augment, randomness
from trainer.runtime import runtime


def _train(config: Config, workdir) -> train.Run:
  run = train.setup(config, str(workdir))
  train.train_epochs(run)
  run.tensorboard.close()
  return run


def _logged_ids(folder) -> dict[int, list[int]]:
  by_epoch = {}
  for path in folder.glob("worker_*.jsonl"):
    for line in path.read_text().splitlines():
      record = json.loads(line)
      if "epoch" in record:  # The other lines give the share's size.
        by_epoch.setdefault(record["epoch"], []).extend(record["ids"])
  return by_epoch


@pytest.mark.parametrize("strategy,cache", [("default", "auto"), ("mirrored", "auto"), ("mirrored", "none")])
def test_every_example_is_trained_on_once_per_epoch_with_the_defaults_randomness(
    strategy, cache, tmp_path, random_mobilenet_025_weights):
  # 3 x 5 images with a validation share: 12 training images in global batches of 8 leave a partial last batch,
  # which mirrored pads (weight 0) so that both replicas get whole batches.
  data_dir = write_color_dataset(tmp_path / "colors", 5)
  broken = data_dir / "red" / "red_0.jpg"
  if cache == "none":  # Decoded in the epochs: it becomes a stand-in of weight 0, never trained on.
    broken.write_bytes(b"not a photo")
  config = tiny_run(random_mobilenet_025_weights, data_dir=str(data_dir), strategy=strategy, batch_size=8,
                    frozen_epochs=2, finetune_epochs=1, example_log=str(tmp_path / "ids"), cache=cache)
  assert (config.train.augment, config.model.dropout, config.data.deterministic) == ("light", 0.2, False)
  run = _train(config, tmp_path / "run")
  assert run.plan.num_replicas == (2 if strategy == "mirrored" else 1)
  expected = set(range(len(run.inputs.train.all_labels)))
  if cache == "none":
    assert list(run.inputs.skipped) == [str(broken)] and str(broken) in run.inputs.train.paths
    expected -= {run.inputs.train.ids[run.inputs.train.paths.index(str(broken))]}
  seen = _logged_ids(tmp_path / "ids")
  assert sorted(seen) == [1, 2, 3]
  for epoch, ids in seen.items():
    assert sorted(ids) == sorted(expected), (epoch, sorted(ids))
  history = json.loads((tmp_path / "run" / "report" / "history.json").read_text())
  assert [r["phase"] for r in history] == ["frozen", "frozen", "finetune"]


def test_mirrored_computes_the_default_strategys_steps_when_nothing_is_random(tmp_path, random_mobilenet_025_weights):
  """Beside the test above: with augmentation, dropout and padding out of the way (12 images, batches of 4), a
  mirrored global batch is the default strategy's batch split in two, so the losses agree to summation order."""
  data_dir = write_color_dataset(tmp_path / "colors", 5)
  histories = {}
  for strategy in ("default", "mirrored"):
    config = tiny_run(random_mobilenet_025_weights, data_dir=str(data_dir), strategy=strategy, augment="none",
                      dropout=0.0, cache_features=False)
    histories[strategy] = _train(config, tmp_path / strategy).history
  for one, other in zip(histories["default"], histories["mirrored"]):
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
      assert other[key] == pytest.approx(one[key], abs=1e-4), (key, one, other)


def _augment_on_replicas(seeds, augmenter, strategy, image, epoch, step):
  @tf.function
  def augmented():
    def replica():
      replica_id = tf.distribute.get_replica_context().replica_id_in_sync_group
      with seeds.scope(randomness.step_seed(7, replica_id, epoch, step)):
        return augmenter(image, training=True)
    return strategy.run(replica)
  return [np.asarray(value) for value in strategy.experimental_local_results(augmented())]


def test_two_replicas_augment_the_same_image_differently_and_a_step_replays_exactly():
  strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
  config = Config().replace(augment="strong")
  seeds = randomness.StepSeeds(7)
  augmenter = augment.build(config.train, 7)
  assert randomness.install(augmenter, seeds) >= 5  # Flip, rotation, translation, shear, zoom, ...
  image = tf.constant(np.random.default_rng(0).uniform(0, 255, (4, 24, 24, 3)), tf.float32)
  first, second = _augment_on_replicas(seeds, augmenter, strategy, image, epoch=0, step=3)
  assert not np.allclose(first, second)
  again = _augment_on_replicas(seeds, augmenter, strategy, image, epoch=0, step=3)
  assert np.array_equal(again[0], first) and np.array_equal(again[1], second)
  later = _augment_on_replicas(seeds, augmenter, strategy, image, epoch=0, step=4)
  assert not np.allclose(later[0], first)


def test_dropout_draws_from_the_step_seeds_too():
  seeds = randomness.StepSeeds(1)
  layer = keras.layers.Dropout(0.5, seed=1)
  assert randomness.install(layer, seeds) == 1
  ones = tf.ones([1, 64])
  with seeds.scope(randomness.step_seed(1, 0, 2, 5)):
    a = layer(ones, training=True)
  with seeds.scope(randomness.step_seed(1, 0, 2, 5)):
    b = layer(ones, training=True)
  with seeds.scope(randomness.step_seed(1, 1, 2, 5)):
    c = layer(ones, training=True)
  assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_float16_loss_scale_skips_a_non_finite_step(tmp_path, random_mobilenet_025_weights):
  previous = keras.config.dtype_policy().name
  try:
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    config = runtime.resolve(tiny_run(random_mobilenet_025_weights, augment="none", mixed_precision="float16"))
    trainer = steps.Trainer(config, 3, tf.distribute.get_strategy())
    trainer.set_phase("finetune")
    optimizer = trainer.optimizers["finetune"]
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    images = np.full((4, 32, 32, 3), 100, np.uint8)
    labels, weights, ids = tf.constant([0, 1, 2, 0]), tf.ones([4]), tf.range(4, dtype=tf.int64)
    before = [v.numpy().copy() for v in trainer.model.trainable_variables]
    scale = float(optimizer.dynamic_scale)
    trainer.class_weights = tf.constant([np.inf, 1.0, 1.0])  # An infinite loss: its gradients are not finite.
    trainer._train_step = None
    trainer.run_epoch([(images, labels, weights, ids)], training=True, steps=1, progress=False)
    assert all(np.array_equal(b, v.numpy()) for b, v in zip(before, trainer.model.trainable_variables))
    assert float(optimizer.dynamic_scale) < scale  # The scale backs off instead of the weights going NaN.
    trainer.class_weights, trainer._train_step = None, None
    # Finite steps train again (after the scale has backed off far enough for float16 gradients).
    trainer.run_epoch([(images, labels, weights, ids)] * 20, training=True, steps=20, progress=False)
    assert any(not np.array_equal(b, v.numpy()) for b, v in zip(before, trainer.model.trainable_variables))
    assert all(np.isfinite(v.numpy()).all() for v in trainer.model.trainable_variables)
  finally:
    keras.mixed_precision.set_dtype_policy(previous)
