"""Mixed precision on CPU: float16 and bfloat16 compute where intended, float32 variables, softmax and loss, loss
scaling for float16 only, and an export whose inputs and outputs do not depend on the training precision."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import CLASS_COLORS, write_image
from trainer import distribute, train
from trainer.config import Config, RuntimeConfig


@pytest.fixture(autouse=True)
def float32_afterwards():
  yield
  keras.config.set_dtype_policy("float32")


def _serving_dtypes(export_path: str) -> tuple[dict, dict]:
  signature = tf.saved_model.load(export_path).signatures["serving_default"]
  inputs = {name: spec.dtype for name, spec in signature.structured_input_signature[1].items()}
  outputs = {name: spec.dtype for name, spec in signature.structured_outputs.items()}
  return inputs, outputs


@pytest.fixture(scope="module")
def float32_serving_dtypes(tmp_path_factory, mobilenet_025_weights):
  folder = tmp_path_factory.mktemp("float32")
  for name, color in CLASS_COLORS.items():
    for i in range(6):
      write_image(folder / "colors" / name / f"{name}_{i}.jpg", color)
  config = Config().replace(backbone="mobilenet", alpha=0.25, weights=mobilenet_025_weights, image_size=32,
                            batch_size=8, frozen_epochs=1, finetune_epochs=0, head_units=8, augment="none",
                            verbosity=-1, data_dir=str(folder / "colors"))
  metrics = train.train_and_evaluate(config, str(folder / "run"))
  return _serving_dtypes(metrics["export_path"])


@pytest.mark.parametrize("precision,compute_dtype,loss_scaled", [
    ("float16", "float16", True),
    ("bfloat16", "bfloat16", False),
])
def test_mixed_precision_trains_and_exports_the_same_signature(precision, compute_dtype, loss_scaled, tiny_config,
                                                               color_folder, tmp_path, float32_serving_dtypes):
  config = train.resolve(tiny_config.replace(data_dir=str(color_folder), mixed_precision=precision,
                                             frozen_epochs=1, finetune_epochs=1))
  distribute.set_precision(distribute.resolve_precision(RuntimeConfig(mixed_precision=precision),
                                                        tf.distribute.get_strategy()))
  trainer = train.Trainer(config, 3, tf.distribute.get_strategy())
  model = trainer.model
  for name in ("head_dense", "logits"):
    layer = model.get_layer(name)
    assert (layer.compute_dtype, layer.variable_dtype) == (compute_dtype, "float32")
  assert model.get_layer("backbone").layers[1].compute_dtype == compute_dtype
  assert model.get_layer("probabilities").compute_dtype == "float32"
  images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
  assert model(images).dtype == tf.float32
  assert all(isinstance(o, keras.optimizers.LossScaleOptimizer) == loss_scaled
             for o in trainer.optimizers.values())

  metrics = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert np.isfinite(metrics["val_loss"]) and metrics["epochs"] == 2
  assert _serving_dtypes(metrics["export_path"]) == float32_serving_dtypes
  assert float32_serving_dtypes[0] == {"image_bytes": tf.string}
  assert float32_serving_dtypes[1]["probabilities"] == tf.float32
