"""The runtime of one process of a run, built once by the command and passed down: the resolved config, the
tf.distribute strategy, the precision, the batch plan, this worker's share of the data, whether it is the chief and
where it writes. Before, the loop, the input loading and the command each resolved the config and planned the
batches again, and three places told the chief.
"""

import dataclasses

import tensorflow as tf

from trainer.config import Config
from trainer.input import data
from trainer.modeling import backbones
from trainer.modeling import model as model_lib
from trainer.runtime import distribute


@dataclasses.dataclass(frozen=True)
class Runtime:
  config: Config  # resolved (`resolve`)
  strategy: tf.distribute.Strategy
  policy: str  # Keras' dtype policy name
  plan: distribute.BatchPlan
  shard: data.Shard  # this worker's share of every split
  chief: bool
  write_dir: str  # where this process writes the run's files: the workdir on the chief

  @property
  def examples_per_step(self) -> int:
    """Elements one step takes from this worker's share: a per-replica batch for each of its replicas."""
    return self.plan.per_replica_batch_size * (self.plan.num_replicas // self.shard.count)

  @property
  def pad_multiple(self) -> int:
    """Every worker's share is padded to a multiple of this, so that every step of every worker is whole."""
    return self.examples_per_step if self.plan.num_replicas > 1 else 1

  def with_config(self, config: Config) -> "Runtime":
    """The same runtime with settings that do not change it (a search's head and learning rate)."""
    return dataclasses.replace(self, config=resolve(config))


def resolve(config: Config) -> Config:
  """Fills the settings whose default depends on the backbone or its weights. A backbone cut at --feature_layer
  has lost its last block, so by default its fine-tune phase trains every layer it keeps."""
  spec = backbones.get(config.model.backbone)
  unfreeze_from = model_lib.UNFREEZE_ALL if config.model.feature_layer else spec.default_unfreeze_from
  return config.replace(image_size=config.data.image_size or spec.default_image_size,
                        unfreeze_from=config.model.unfreeze_from or unfreeze_from,
                        batchnorm=model_lib.batchnorm_mode(config.model))


def build(config: Config, workdir: str, strategy: tf.distribute.Strategy | None = None) -> Runtime:
  """The runtime of this process. strategy: one the caller had to create first (a multi-worker strategy must exist
  before any other TensorFlow work); else created here from the config. Sets the precision policy."""
  config = resolve(config)
  strategy = strategy or distribute.create_strategy(config.runtime)
  policy = distribute.resolve_precision(config.runtime, strategy)
  distribute.set_precision(policy)
  plan = distribute.plan_batches(config.data.batch_size, strategy.num_replicas_in_sync,
                                 config.train.lr_base_batch_size)
  return Runtime(config, strategy, policy, plan, data.Shard(*distribute.input_shard(strategy)),
                 distribute.is_chief(strategy), distribute.write_dir(workdir, strategy))
