"""Mixed precision on CPU: float16 and bfloat16 compute where intended, float32 variables, softmax and loss, loss
scaling for float16 only, and an export whose inputs and outputs do not depend on the training precision: a mixed
model is served as its float32 copy, so float16 and bfloat16 runs export every time."""

import dataclasses
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import CLASS_COLORS, write_image

from export import end_of_run, saved_model
from export import main as export_main
from trainer.config import Config, RuntimeConfig
from trainer.loop import steps, train
from trainer.modeling import model as model_lib
from trainer.runtime import distribute, runtime


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
def float32_serving_dtypes(trained_export_dir):
  """The signatures of the shared float32 run's export (conftest.trained_workdir)."""
  return _serving_dtypes(str(trained_export_dir))


@pytest.mark.parametrize("precision,compute_dtype,loss_scaled", [
    ("float16", "float16", True),
    ("bfloat16", "bfloat16", False),
])
def test_mixed_precision_trains_and_exports_the_same_signature(precision, compute_dtype, loss_scaled, tiny_config,
                                                               color_folder, tmp_path, float32_serving_dtypes):
  config = runtime.resolve(tiny_config.replace(data_dir=str(color_folder), mixed_precision=precision,
                                             frozen_epochs=1, finetune_epochs=1))
  distribute.set_precision(distribute.resolve_precision(RuntimeConfig(mixed_precision=precision),
                                                        tf.distribute.get_strategy()))
  trainer = steps.Trainer(config, 3, tf.distribute.get_strategy())
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

  metrics = train.train_and_evaluate(config, str(tmp_path / "run"), exporter=end_of_run.SavedModelExport())
  assert np.isfinite(metrics["val_loss"]) and metrics["epochs"] == 2
  assert _serving_dtypes(metrics["export_path"]) == float32_serving_dtypes
  assert float32_serving_dtypes[0] == {"image_bytes": tf.string}
  assert float32_serving_dtypes[1]["probabilities"] == tf.float32
  assert _metadata(metrics["export_path"])["precision"]["trained"] == f"mixed_{precision}"
  # The checkpoint of a mixed-precision run exports again (what the end of training tells a user to run).
  again = export_main.export_run(str(tmp_path / "run"))
  assert again.endswith("/2") and max(_metadata(again)["parity"]["max_abs_diff"].values()) <= 1e-3


def _metadata(export_path: str) -> dict:
  with open(os.path.join(export_path, saved_model.METADATA_FILE), encoding="utf-8") as f:
    return json.load(f)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_a_mixed_precision_classifier_exports_as_its_float32_computation(policy, mobilenet_025_weights, tmp_path):
  # The reported case: MobileNet alpha 0.25 at 96 px, float16, failed the export check by 0.007.
  config = Config().replace(backbone="mobilenet", alpha=0.25, weights=mobilenet_025_weights, image_size=96,
                            head_units=8)
  keras.config.set_dtype_policy(policy)
  model = model_lib.build_classifier(config.model, len(CLASS_COLORS), 96, seed=0)
  logits = model.get_layer("logits")  # A trained head's confident logits: probabilities sensitive to rounding.
  kernel, bias = logits.get_weights()
  logits.set_weights([kernel * 30, bias])
  paths = [str(write_image(tmp_path / "val" / f"{name}_{i}.jpg", color, size=(96 + 8 * i, 90)))
           for name, color in CLASS_COLORS.items() for i in range(3)]

  path = saved_model.export_saved_model(model, list(CLASS_COLORS), config, str(tmp_path / "export"), paths)

  metadata = _metadata(path)
  assert max(metadata["parity"]["max_abs_diff"].values()) <= saved_model.PARITY_TOLERANCE
  assert (metadata["precision"]["trained"], metadata["precision"]["served"]) == (policy, "float32")
  # Checked against the mixed-precision model itself, this export would have failed.
  assert metadata["precision"]["max_abs_diff"] > saved_model.PARITY_TOLERANCE
  # What is served is the trained weights computed in float32.
  keras.config.set_dtype_policy("float32")
  reference = model_lib.build_classifier(dataclasses.replace(config.model, weights="none"), len(CLASS_COLORS), 96,
                                         seed=1)
  reference.set_weights(model.get_weights())
  pixels = np.random.default_rng(0).integers(0, 256, (4, 96, 96, 3), dtype=np.uint8)
  served = tf.saved_model.load(path).signatures["serving_image_tensor"](images=tf.constant(pixels))
  expected = reference(pixels.astype(np.float32), training=False).numpy()
  assert np.max(np.abs(served["probabilities"].numpy() - expected)) <= 1e-4
