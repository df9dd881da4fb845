"""Runtime: which tf.distribute strategy runs the training, and in which precision.

Kept apart from data and model: they are built inside the strategy's scope but know nothing of it.
"""

import keras
import tensorflow as tf
from absl import logging

from trainer.config import RuntimeConfig
from trainer.errors import UserInputError

STRATEGIES = ("default", "one_device", "mirrored", "multi_worker", "tpu")
PRECISIONS = ("auto", "float16", "bfloat16", "float32")


def create_strategy(config: RuntimeConfig) -> tf.distribute.Strategy:
  name = config.strategy
  if name == "default":
    return tf.distribute.get_strategy()
  if name == "one_device":
    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
  if name == "mirrored":
    return tf.distribute.MirroredStrategy()
  if name == "multi_worker":
    return tf.distribute.MultiWorkerMirroredStrategy()
  if name == "tpu":
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=config.tpu or None)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)
  raise UserInputError(f"--strategy={name} is not known. Choose one of: {', '.join(STRATEGIES)}.")


def resolve_precision(config: RuntimeConfig, strategy: tf.distribute.Strategy) -> str:
  """The Keras dtype policy name: auto picks what the device gains from (float32 on CPU, measured here)."""
  choice = config.mixed_precision
  if choice not in PRECISIONS:
    raise UserInputError(f"--mixed_precision={choice} is not known. Choose one of: {', '.join(PRECISIONS)}.")
  if choice == "auto":
    if isinstance(strategy, tf.distribute.TPUStrategy):
      choice = "bfloat16"
    elif any(_compute_capability(gpu) >= (7, 0) for gpu in tf.config.list_physical_devices("GPU")):
      choice = "float16"
    else:
      choice = "float32"
  return {"float16": "mixed_float16", "bfloat16": "mixed_bfloat16", "float32": "float32"}[choice]


def _compute_capability(gpu) -> tuple[int, int]:
  details = tf.config.experimental.get_device_details(gpu)
  return tuple(details.get("compute_capability", (0, 0)))


def set_precision(policy: str) -> None:
  keras.mixed_precision.set_dtype_policy(policy)
  if policy != "float32":
    logging.info("Mixed precision policy: %s", policy)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.cluster_spec().as_dict():
    return True
  return resolver.task_type in (None, "chief") or (resolver.task_type == "worker" and resolver.task_id == 0
                                                   and "chief" not in resolver.cluster_spec().as_dict())
