"""The frozen phase's features of this worker's share, and the label audit made on them (trainer.reporting.label_audit):
read from the run's cache when a run (or its --tune search) already extracted them, else extracted once."""

import os
from typing import TYPE_CHECKING

from absl import logging

from trainer.config import Config
from trainer.loop import features
from trainer.modeling import augment
from trainer.reporting import label_audit

if TYPE_CHECKING:
  from trainer.loop.train import Run


def of_run(run: "Run") -> features.SharedFeatures:
  """The frozen backbone's features of this worker's share, read from the run's cache when a run (or its --tune
  search) already extracted them."""
  config = run.config
  key = features.cache_key(config, run.inputs.identity, run.policy)
  cache = features.load_or_extract(run.trainer.model, run.inputs.train.images_with_ids, run.inputs.val.images_with_ids,
                                   config.data.batch_size, augment.build(config.train, config.data.seed),
                                   config.train.feature_views,
                                   features.folder(config.data.cache_dir,
                                                   os.path.join(run.runtime.write_dir, "cache")),
                                   key)
  for examples, ids in ((run.inputs.train, cache.train_ids), (run.inputs.val, cache.val_ids)):
    # Features read from a file: the examples that did not decode when they were extracted are named here too.
    examples.note_undecodable(sorted(set(examples.ids) - set(ids.tolist())))
  return features.SharedFeatures(cache, run.inputs.train, run.inputs.val, _audit(run, cache, key))


def _audit(run: "Run", cache: features.FeatureCache, key: str) -> frozenset[int]:
  """The label audit of this worker's share (trainer.reporting.label_audit; the chief writes report/suspect_labels.csv
  and near_duplicates.csv), once per features; returns the ids --drop_suspects leaves out (none without it)."""
  config = run.config
  names = {split: dict(zip(examples.ids, examples.paths)) if examples.paths is not None else {}
           for split, examples in (("train", run.inputs.train), ("val", run.inputs.val))}
  suspects = label_audit.audit_run(cache, run.inputs.train.images_with_ids, run.inputs.val.images_with_ids, names,
                                   run.inputs.classes, config.data.seed, key,
                                   os.path.join(run.runtime.write_dir, "report"),
                                   run.chief, run.run_dir.tensorboard, config.data.image_size)
  if not config.train.drop_suspects:
    return frozenset()
  logging.warning("--drop_suspects: %d of %d training images with a suspect label weigh nothing in this run "
                  "(listed in report/suspect_labels.csv).", len(suspects), len(cache.train_labels))
  return suspects


def say_if_not_audited(config: Config) -> None:
  """The label audit runs on the frozen phase's cached features: a run without them says why it has none."""
  if config.model.weights == "none":
    reason = "--weights=none trains from scratch: there are no frozen features"
  elif not config.train.cache_features:
    reason = "--cache_features=false computes no frozen features"
  elif not config.train.frozen_epochs:
    reason = "--frozen_epochs=0: there is no frozen phase"
  else:
    return
  logging.info("Label audit (suspect labels, near-duplicates) skipped: %s.", reason)
