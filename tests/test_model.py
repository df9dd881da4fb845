"""Training modes: from scratch, the whole backbone unfrozen, BatchNorm frozen or training, a backbone cut at a
named layer; the phase plan, the layer listing and the one-line refusals."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import write_color_dataset

from export import end_of_run
from trainer import config_checks
from trainer.config import Config
from trainer.errors import UserInputError
from trainer.loop import restore, train
from trainer.modeling import backbones
from trainer.modeling import model as model_lib
from trainer.runtime import runtime


def _tiny(**values) -> Config:
  return Config().replace(backbone="mobilenet", alpha=0.25, image_size=32, batch_size=8, head_units=8,
                          augment="none", verbosity=-1, **values)


def _weights(base: keras.Model) -> dict[str, list[np.ndarray]]:
  return {layer.name: [np.array(w) for w in layer.weights] for layer in base.layers if layer.weights}


def _changed(before: dict, after: dict) -> set[str]:
  return {name for name, weights in before.items()
          if not all(np.array_equal(a, b) for a, b in zip(weights, after[name]))}


def _batchnorm_names(base: keras.Model) -> set[str]:
  return {layer.name for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)}


def test_from_scratch_is_one_phase_of_every_epoch_and_transfer_is_frozen_then_finetune():
  transfer = _tiny(weights="pretrained.h5", frozen_epochs=3, finetune_epochs=2)
  assert [model_lib.phase_of_epoch(epoch, transfer) for epoch in range(5)] == ["frozen"] * 3 + ["finetune"] * 2
  scratch = transfer.replace(weights="none")
  assert [model_lib.phase_of_epoch(epoch, scratch) for epoch in range(5)] == ["scratch"] * 5
  assert runtime.resolve(scratch).model.batchnorm == "train" and runtime.resolve(transfer).model.batchnorm == "frozen"


@pytest.fixture(scope="module")
def scratch_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("scratch")
  write_color_dataset(root / "data", 6)
  config = _tiny(weights="none", data_dir=str(root / "data"), frozen_epochs=1, finetune_epochs=1)
  metrics = train.train_and_evaluate(config, str(root / "run"), exporter=end_of_run.SavedModelExport())
  return root / "run", metrics


def test_a_run_from_scratch_trains_every_layer_and_batchnorm_from_the_first_epoch(scratch_run):
  workdir, _ = scratch_run
  checkpoints = tf.train.get_checkpoint_state(str(workdir / "checkpoints")).all_model_checkpoint_paths
  assert len(checkpoints) == 2  # after epoch 1 and after epoch 2
  config = runtime.resolve(Config.from_dict(json.loads((workdir / "config.json").read_text())))
  snapshots = []
  for checkpoint in checkpoints:
    model = model_lib.build_classifier(config.model, 3, config.data.image_size, config.data.seed)
    tf.train.Checkpoint(model=model).restore(checkpoint).expect_partial()
    snapshots.append(_weights(model_lib.backbone_of(model)))
  changed = _changed(*snapshots)
  assert changed == set(snapshots[0]), f"layers that did not train: {sorted(set(snapshots[0]) - changed)}"


def test_config_and_metrics_of_a_run_from_scratch_agree_on_its_one_phase(scratch_run):
  workdir, metrics = scratch_run
  saved = json.loads((workdir / "config.json").read_text())
  on_disk = json.loads((workdir / "report" / "metrics.json").read_text())
  history = json.loads((workdir / "report" / "history.json").read_text())
  assert saved["run"]["phases"] == {"scratch": 2}
  assert {phase: values["epochs"] for phase, values in on_disk["phases"].items()} == {"scratch": 2}
  assert [record["phase"] for record in history] == ["scratch", "scratch"]
  assert on_disk["val_accuracy"] == metrics["val_accuracy"] == history[-1]["val_accuracy"]
  assert (workdir / "export" / "classifier" / "1" / "saved_model.pb").is_file()


def _one_finetune_epoch(weights: str, **values) -> tuple[keras.Model, dict, dict]:
  """Backbone weights before and after two fine-tune steps (Adam, training=True) on noise images."""
  config = runtime.resolve(_tiny(weights=weights, **values))
  model = model_lib.build_classifier(config.model, 3, config.data.image_size, config.data.seed)
  model_lib.set_phase(model, model_lib.FINETUNE, config.model.unfreeze_from, config.model.batchnorm)
  base = model_lib.backbone_of(model)
  before = _weights(base)
  optimizer = keras.optimizers.Adam(1e-2)
  rng = np.random.default_rng(0)
  for _ in range(2):
    images = rng.uniform(0, 255, (8, 32, 32, 3)).astype(np.float32)
    with tf.GradientTape() as tape:
      loss = keras.losses.sparse_categorical_crossentropy(rng.integers(0, 3, 8), model(images, training=True))
    optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
  return base, before, _weights(base)


@pytest.mark.parametrize("batchnorm", ["train", "frozen"])
def test_unfreeze_all_trains_every_layer_and_batchnorm_only_in_train_mode(batchnorm, random_mobilenet_025_weights):
  base, before, after = _one_finetune_epoch(random_mobilenet_025_weights, unfreeze_from="all", batchnorm=batchnorm)
  batchnorms = _batchnorm_names(base)
  changed = _changed(before, after)
  assert set(before) - batchnorms <= changed, "a layer below the top did not train with --unfreeze_from=all"
  for name in batchnorms:
    # BatchNormalization's weights: gamma, beta, moving mean, moving variance.
    moving_stats_moved = not all(np.array_equal(a, b) for a, b in zip(before[name][2:], after[name][2:]))
    assert moving_stats_moved == (batchnorm == "train"), name
    if batchnorm == "frozen":
      assert name not in changed


def test_batchnorm_train_with_small_replica_batches_warns(monkeypatch):
  warnings = []
  monkeypatch.setattr(model_lib.logging, "warning", lambda message, *args: warnings.append(message % args))
  model_lib.announce_plan(runtime.resolve(_tiny(weights="none")), per_replica_batch_size=8)
  assert not warnings
  model_lib.announce_plan(runtime.resolve(_tiny(weights="none")), per_replica_batch_size=4)
  model_lib.announce_plan(runtime.resolve(_tiny(weights="pretrained.h5", batchnorm="frozen")), per_replica_batch_size=4)
  assert len(warnings) == 1 and "--batchnorm=train" in warnings[0] and "noisy" in warnings[0]


def test_cache_features_asked_for_with_weights_none_is_refused_but_the_default_is_quiet():
  config = _tiny(weights="none", cache_features=True)
  config_checks.validate(config)
  with pytest.raises(UserInputError, match="--cache_features.*--weights=none"):
    config_checks.validate(config, given={"cache_features", "weights"})


@pytest.fixture(scope="module")
def cut_run(tmp_path_factory, random_mobilenet_025_weights):
  """A backbone cut at an early layer: frozen phase on cached features (the default), then fine-tuning."""
  root = tmp_path_factory.mktemp("cut")
  write_color_dataset(root / "data", 6)
  config = _tiny(weights=random_mobilenet_025_weights, data_dir=str(root / "data"), feature_layer="conv_pw_5_relu",
                 frozen_epochs=1, finetune_epochs=1, finetune_lr=1e-3)
  metrics = train.train_and_evaluate(config, str(root / "run"), exporter=end_of_run.SavedModelExport())
  return root / "run", metrics


def test_a_cut_backbone_trains_caches_features_and_exports(cut_run):
  workdir, metrics = cut_run
  assert metrics["phases"]["frozen"]["epochs"] == 1 and metrics["phases"]["finetune"]["epochs"] == 1
  trained = restore.restore(str(workdir))
  base = model_lib.backbone_of(trained.model)
  assert base.layers[-1].name == "conv_pw_5_relu"
  assert trained.model.get_layer("pool").output.shape[-1] == base.layers[-1].output.shape[-1]
  # The early layers of the full network, here its last ones, fine-tuned: the cut's default unfreeze point is all.
  assert trained.config.model.unfreeze_from == "all"
  assert (workdir / "export" / "classifier" / "1" / "saved_model.pb").is_file()


@pytest.mark.parametrize("values, flag", [({"feature_layer": "conv_pw_99"}, "--feature_layer=conv_pw_99"),
                                          ({"unfreeze_from": "conv_pw_99"}, "--unfreeze_from=conv_pw_99"),
                                          ({"feature_layer": "conv_pw_5_relu", "unfreeze_from": "conv_pw_13"},
                                           "--unfreeze_from=conv_pw_13")])
def test_a_layer_name_the_backbone_lacks_names_the_flag_and_the_listing_command(values, flag):
  config = runtime.resolve(_tiny(weights="none", **values))
  with pytest.raises(UserInputError, match=f"{flag} is not a layer.*--list_layers"):
    model = model_lib.build_classifier(config.model, 3, 32, 0)
    model_lib.set_phase(model, model_lib.FINETUNE, config.model.unfreeze_from)


def _listed_marks(listing: str) -> dict[str, list[str]]:
  """Layer name -> its per-phase yes/no marks, for the layers with weights."""
  lines = listing.splitlines()
  start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["idx", "name"]) + 1
  rows = [line.split() for line in lines[start:]]
  return {row[1]: [mark for mark in row[4:] if mark in ("yes", "no")] for row in rows}


@pytest.mark.parametrize("batchnorm", ["frozen", "train"])
def test_list_layers_marks_what_trains_in_each_phase(batchnorm, random_mobilenet_025_weights):
  config = runtime.resolve(_tiny(weights=random_mobilenet_025_weights, unfreeze_from="conv_dw_13", batchnorm=batchnorm))
  listing = model_lib.describe_layers(config)
  marks = _listed_marks(listing)
  base = model_lib.build_backbone(config.model, 32, seed=0)
  names = [layer.name for layer in base.layers]
  start = names.index("conv_dw_13")
  for index, layer in enumerate(base.layers):
    if not layer.weights:
      continue
    trains = index >= start and (batchnorm == "train" or layer.name not in _batchnorm_names(base))
    assert marks[layer.name] == ["no", "yes" if trains else "no"], layer.name
  marked = [line for line in listing.splitlines() if "fine-tuning starts here" in line]
  assert len(marked) == 1 and " conv_dw_13 " in marked[0]


def test_list_layers_of_a_run_from_scratch_on_a_cut_backbone():
  config = runtime.resolve(_tiny(weights="none", feature_layer="conv_pw_3_relu"))
  marks = _listed_marks(model_lib.describe_layers(config))
  assert list(marks)[-1] == "conv_pw_3_relu"
  weighted = [values for values in marks.values() if values]
  assert weighted and all(values == ["yes"] for values in weighted)


def test_the_demo_trains_from_scratch_when_imagenet_weights_cannot_be_had(monkeypatch, capsys):
  from trainer import demo

  def offline(*args, **kwargs):
    raise UserInputError("ImageNet weights for mobilenet could not be downloaded")
  monkeypatch.setattr(backbones, "build", offline)
  assert demo.available_weights("imagenet") == "none"
  assert "from scratch" in capsys.readouterr().out
  assert demo.available_weights("/some/weights.h5") == "/some/weights.h5"
  runs = {demo.run_name(weights) for weights in ("none", "imagenet", "/some/weights.h5")}
  assert len(runs) == 3
