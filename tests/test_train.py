import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from export import end_of_run
from trainer.config import Config
from trainer.loop import train
from trainer.modeling import model as model_lib
from trainer.modeling import optimization
from trainer.runtime import runtime


def _model_at_checkpoint(config: Config, num_classes: int, checkpoint: str | None) -> keras.Model:
  """A fresh classifier (initial weights: the weights file and the seeded head), optionally restored."""
  config = runtime.resolve(config)
  model = model_lib.build_classifier(config.model, num_classes, config.data.image_size, config.data.seed)
  if checkpoint:
    tf.train.Checkpoint(model=model).restore(checkpoint).expect_partial()
  return model


def _weights_by_layer(model: keras.Model) -> dict[str, list[np.ndarray]]:
  layers = {layer.name: layer for layer in model_lib.backbone_of(model).layers}
  layers.update({layer.name: layer for layer in model.layers if layer.name != "backbone"})
  return {name: [np.array(w) for w in layer.weights] for name, layer in layers.items() if layer.weights}


@pytest.fixture(scope="module")
def two_phase_run(tmp_path_factory, random_mobilenet_025_weights):
  from conftest import write_color_dataset
  root = tmp_path_factory.mktemp("phases")
  write_color_dataset(root / "data", 6, fmt="PNG")
  config = Config().replace(data_dir=str(root / "data"), backbone="mobilenet", alpha=0.25,
                            weights=random_mobilenet_025_weights, image_size=32, batch_size=8, frozen_epochs=1,
                            finetune_epochs=1, head_units=8, augment="light", frozen_lr=1e-2, finetune_lr=1e-3,
                            verbosity=-1, keep_better_phase=False)  # Each phase's checkpoint is its own weights.
  workdir = root / "run"
  metrics = train.train_and_evaluate(config, str(workdir), exporter=end_of_run.SavedModelExport())
  checkpoints = tf.train.get_checkpoint_state(str(workdir / "checkpoints")).all_model_checkpoint_paths
  snapshots = [_weights_by_layer(_model_at_checkpoint(config, 3, path)) for path in (None, *checkpoints)]
  return config, workdir, metrics, snapshots


def test_frozen_phase_trains_only_the_head(two_phase_run):
  _, _, _, (initial, after_frozen, _) = two_phase_run
  for name, weights in initial.items():
    same = all(np.array_equal(a, b) for a, b in zip(weights, after_frozen[name]))
    if name in ("head_dense", "logits"):
      assert not same, f"head layer {name} did not train"
    else:
      assert same, f"backbone layer {name} changed in the frozen phase"


def test_finetune_phase_trains_from_the_unfreeze_point_up_and_keeps_batchnorm_statistics(two_phase_run):
  config, _, _, (_, after_frozen, after_finetune) = two_phase_run
  base_names = [layer.name for layer in
                model_lib.backbone_of(_model_at_checkpoint(config, 3, None)).layers]
  start = base_names.index(runtime.resolve(config).model.unfreeze_from)
  changed = {name for name, weights in after_frozen.items()
             if not all(np.array_equal(a, b) for a, b in zip(weights, after_finetune[name]))}
  assert {"conv_dw_13", "conv_pw_13", "head_dense", "logits"} <= changed
  for name in changed - {"head_dense", "logits"}:
    assert base_names.index(name) >= start, f"{name} is below the unfreeze point but changed"
    assert not name.endswith("_bn"), f"BatchNorm layer {name} changed"


def test_run_writes_config_metrics_and_a_servable_export(two_phase_run):
  config, workdir, metrics, _ = two_phase_run
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"]["unfreeze_from"] == "conv_dw_13" and saved["data"]["image_size"] == 32
  assert saved["run"]["classes"] == ["blue", "green", "red"]
  on_disk = json.loads((workdir / "report" / "metrics.json").read_text())
  assert on_disk["classes"] == ["blue", "green", "red"]
  assert on_disk["phases"]["frozen"]["epochs"] == 1 and on_disk["phases"]["finetune"]["epochs"] == 1
  for phase in on_disk["phases"].values():
    assert 0.0 <= phase["val_accuracy"] <= 1.0 and phase["seconds"] > 0 and phase["images_per_sec"] > 0
  assert on_disk["val_accuracy"] == on_disk["phases"]["finetune"]["val_accuracy"] == metrics["val_accuracy"]
  assert (workdir / "export" / "classifier" / "1" / "saved_model.pb").is_file()
  history = json.loads((workdir / "report" / "history.json").read_text())
  assert [(r["epoch"], r["phase"]) for r in history] == [(1, "frozen"), (2, "finetune")]


def test_a_zero_epoch_phase_is_skipped(tmp_path, tiny_config, color_folder):
  config = tiny_config.replace(data_dir=str(color_folder), frozen_epochs=0, finetune_epochs=1)
  metrics = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert metrics["phases"]["frozen"]["epochs"] == 0 and metrics["phases"]["finetune"]["epochs"] == 1


def test_frozen_imagenet_features_transfer_to_real_photos(tmp_path, shared_dir, mobilenet_025_weights):
  """A real transfer-learning check: ImageNet MobileNet features separate ants from bees after a short frozen
  phase, where chance is 50%. A random-init backbone would stay near chance."""
  source = shared_dir / "datasets" / "hymenoptera"
  subset = tmp_path / "hymenoptera"
  for split, per_class in (("train", 40), ("val", 30)):
    for label in ("ants", "bees"):
      (subset / split / label).mkdir(parents=True)
      for path in sorted((source / split / label).iterdir())[:per_class]:
        os.symlink(path, subset / split / label / path.name)
  config = Config().replace(data_dir=str(subset), backbone="mobilenet", alpha=0.25, weights=mobilenet_025_weights,
                            image_size=128, batch_size=16, frozen_epochs=6, finetune_epochs=0, augment="none",
                            verbosity=-1)
  metrics = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert metrics["phases"]["frozen"]["val_accuracy"] >= 0.75


def test_a_cosine_fine_tune_schedule_decays_to_zero_over_the_phase(tmp_path, tiny_config, color_folder):
  config = tiny_config.replace(data_dir=str(color_folder), frozen_epochs=1, finetune_epochs=2, finetune_lr=1e-3,
                               finetune_schedule="cosine")
  train.train_and_evaluate(config, str(tmp_path / "run"))
  with open(tmp_path / "run" / "report" / "history.json", encoding="utf-8") as f:
    rates = [epoch["learning_rate"] for epoch in json.load(f)]
  # The rate each epoch starts at: the frozen phase's as given, then the top of the cosine, then half-way down.
  np.testing.assert_allclose(rates, [config.train.frozen_lr, 1e-3, 0.5e-3], atol=1e-9)
  # And it ends at 0 after the phase's steps.
  schedule = optimization.learning_rate(model_lib.FINETUNE, config.train, scale=2.0, phase_steps=10)
  np.testing.assert_allclose([float(schedule(0)), float(schedule(5)), float(schedule(10))], [2e-3, 1e-3, 0.0],
                             atol=1e-9)
