"""The one typed configuration that flows from the command line to every part of a run.

Each section owns one responsibility (data, model, training, runtime, export). Field names are unique across
sections so that each field is also a command-line flag of the same name (see `trainer.command.flags`). The help text of
every flag is the `help` metadata of its field.
"""

import dataclasses
import hashlib
import json
from typing import Any


def _field(default: Any, help: str, choices: tuple = ()) -> Any:  # noqa: A002 - mirrors absl's keyword
  """A config field; `choices`, when given, are its only valid values (checked by trainer.config_checks when the
  command starts, and listed in --help)."""
  if choices:
    help = f"{help} One of: {', '.join(repr(c) if c == '' else c for c in choices)}."
  return dataclasses.field(default=default, metadata={"help": help, "choices": tuple(choices)})


# The choices of the fields below: plain names here (this module loads without TensorFlow, for --help); tests check
# them against the registries that implement them (trainer.modeling.backbones, trainer.modeling.augment, ...).
BACKBONES = ("vgg16", "resnet50", "inception_v3", "mobilenet_v2", "mobilenet", "efficientnet_b0")
AUGMENT_PRESETS = ("none", "light", "classic", "strong")
FLIPS = ("", "none", "horizontal", "vertical", "horizontal_and_vertical")
CLASS_WEIGHTS = ("", "balanced")
CACHE_MODES = ("auto", "memory", "disk", "none")
BATCHNORM_MODES = ("", "frozen", "train")
FINETUNE_SCHEDULES = ("constant", "cosine")
STRATEGIES = ("default", "one_device", "mirrored", "multi_worker", "tpu")
PRECISIONS = ("auto", "float16", "bfloat16", "float32")
TFLITE_QUANTIZATIONS = ("float32", "float16", "dynamic_range", "int8")
TUNERS = ("random", "bayesian", "hyperband")
# The fields that name the data source (exactly one is given), and with them the fields a command on a trained run
# may point elsewhere (where the run's data is now).
SOURCE_FLAGS = ("data_dir", "csv", "tfds", "tfrecord")
DATA_SOURCE_FIELDS = SOURCE_FLAGS + ("tfds_data_dir",)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  data_dir: str = _field("", "Folder of images: train/ + val/ (or validation/) with one sub-folder per class, "
                         "or class folders directly (split by --validation_split).")
  csv: str = _field("", "CSV file of path,label rows (paths relative to the CSV); split by --validation_split.")
  tfds: str = _field("", "TensorFlow Datasets name, e.g. tf_flowers (prepared under --tfds_data_dir).")
  tfds_data_dir: str = _field("", "Folder of prepared TFDS datasets ('' = TFDS's default, ~/tensorflow_datasets); "
                              "training never downloads: prepare with `tfds build NAME --data_dir=DIR`.")
  validation_split: float = _field(0.2, "Fraction of each class held out for validation when the source has no "
                                   "validation split (stratified, seeded).")
  image_size: int = _field(0, "Square input size in pixels; 0 means the backbone's default.")
  batch_size: int = _field(32, "Global batch size (summed over all replicas).")
  seed: int = _field(42, "Seed for the split, shuffling, augmentation and head initialisation.")
  strict_data: bool = _field(False, "Fail on undecodable image files instead of skipping them with a warning.")
  deterministic: bool = _field(False, "TensorFlow's deterministic ops (tf.config.experimental."
                               "enable_op_determinism): bit-identical runs for a fixed seed, slower on GPUs. The "
                               "input order is fixed without it.")
  tfrecord: str = _field("", "Glob of TFRecord shards of tf.train.Example (image/encoded, image/class/label, "
                         "optional image/class/text): the training data.")
  tfrecord_val: str = _field("", "Glob of TFRecord shards for validation ('' = a --validation_split carve of "
                             "--tfrecord).")
  cache: str = _field("auto", "Where decoded images are kept between epochs (auto: memory when they fit "
                      "--memory_budget, else disk when the disk has room, else none: decode every epoch).",
                      CACHE_MODES)
  memory_budget: str = _field("", "Memory the decoded-image cache may use, in bytes or with a unit (e.g. 4GB); "
                              "'' = a quarter of RAM.")
  cache_dir: str = _field("", "Folder of the disk cache of decoded images and of the cached backbone features "
                         "('' = WORKDIR/cache), keyed by what they depend on, so runs may share it; each worker of "
                         "a multi-worker run keeps its decoded images in its own sub-folder.")
  data_service: str = _field("", "grpc://HOST:PORT of a tf.data service dispatcher that decodes and resizes for "
                             "the trainers (python -m trainer.data_service); '' decodes in this process.")
  accept_changed_data: bool = _field(False, "Continue a run whose data files changed since its checkpoints were "
                                     "trained (added, removed or changed files), recording the change in "
                                     "config.json; without it such a resume is refused.")
  max_image_pixels: int = _field(89_478_485, "Image files with more pixels (width x height, read from the header) "
                                 "are skipped like undecodable ones (PIL's decompression-bomb limit).")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  backbone: str = _field("mobilenet_v2", "Backbone name (--list_layers prints its layers).", BACKBONES)
  weights: str = _field("imagenet", "imagenet | none | PATH to a local Keras .h5 weights file (no top). none trains "
                        "from scratch: every layer, one phase of --frozen_epochs + --finetune_epochs epochs at "
                        "--frozen_lr.")
  weights_fallback: bool = _field(False, "If ImageNet weights cannot be downloaded, say so and use random init "
                                  "instead of failing (used by the offline demo).")
  alpha: float = _field(1.0, "Width multiplier of mobilenet / mobilenet_v2.")
  head_units: int = _field(128, "Units of the hidden Dense layer of the head; 0 for a linear head.")
  dropout: float = _field(0.2, "Dropout rate before the classifier layer.")
  unfreeze_from: str = _field("", "Name of the backbone layer where fine-tuning starts (this layer and every "
                              "layer above it train); all unfreezes every layer; '' means the backbone's last "
                              "block.")
  batchnorm: str = _field("", "Whether BatchNorm statistics adapt while backbone layers train ('' = frozen with "
                          "pretrained weights, train from scratch).", BATCHNORM_MODES)
  feature_layer: str = _field("", "Cut the backbone at this layer (pooling and the head follow it); '' keeps the "
                              "whole backbone.")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  frozen_epochs: int = _field(10, "Epochs with the backbone frozen (only the head trains); 0 skips the phase.")
  finetune_epochs: int = _field(4, "Epochs with the top of the backbone unfrozen; 0 skips the phase.")
  frozen_lr: float = _field(1e-3, "Adam learning rate of the frozen phase.")
  finetune_lr: float = _field(1e-4, "Adam learning rate of the fine-tune phase (its start with the cosine schedule).")
  finetune_schedule: str = _field("cosine", "Learning rate over the fine-tune phase: constant, or cosine "
                                  "(from --finetune_lr down to 0 at the end of --finetune_epochs).",
                                  FINETUNE_SCHEDULES)
  lr_base_batch_size: int = _field(0, "Global batch size --frozen_lr and --finetune_lr were chosen for: with "
                                   "another --batch_size both scale linearly (Goyal et al. 2017); 0 uses them "
                                   "as given.")
  augment: str = _field("light", "Augmentation preset.", AUGMENT_PRESETS)
  flip: str = _field("", "Overrides the preset's random flip ('' = the preset's).", FLIPS)
  rotation: float = _field(-1.0, "Overrides the preset's maximum random rotation, in degrees (-1: the preset's).")
  shift: float = _field(-1.0, "Overrides the preset's maximum random width and height shift, as a fraction of the "
                        "size (-1: the preset's).")
  shear: float = _field(-1.0, "Overrides the preset's maximum random shear angle, in degrees, as "
                        "ImageDataGenerator's shear_range (-1: the preset's).")
  zoom: float = _field(-1.0, "Overrides the preset's maximum random zoom, as a fraction (-1: the preset's).")
  brightness: float = _field(-1.0, "Overrides the preset's maximum random brightness change, as a fraction of the "
                             "value range (-1: the preset's).")
  contrast: float = _field(-1.0, "Overrides the preset's maximum random contrast factor (-1: the preset's).")
  rand_augment: float = _field(-1.0, "Overrides the preset's RandAugment strength, 0..1; 0 turns it off (-1: the "
                               "preset's).")
  label_smoothing: float = _field(0.0, "Label smoothing of the frozen phase's loss (and the tuner's heads'), and of "
                                  "the fine-tune phase's with --finetune_label_smoothing=-1 (0: none; 0.1 moves a "
                                  "tenth of each label's weight to a uniform spread over the classes).")
  finetune_label_smoothing: float = _field(0.1, "Label smoothing of the fine-tune phase's loss (-1: --label_smoothing"
                                           "'s; 0.1: measured over 3 seeds with --unfreeze_from's default, "
                                           "BUILD_NOTES.md).")
  keep_better_phase: bool = _field(True, "When the fine-tune phase ends at a lower validation accuracy than the "
                                   "frozen phase, keep the frozen phase's weights as the run's model (said in one "
                                   "line and in report/metrics.json's phase_choice).")
  class_weight: str = _field("", "'' (every example weighs the same) or balanced (weights n / (classes * count) "
                             "from the training counts, recorded in config.json).", CLASS_WEIGHTS)
  cache_features: bool = _field(True, "Frozen phase on cached features: the frozen backbone's pooled features are "
                                "computed once and only the head trains on them (much faster epochs).")
  feature_views: int = _field(2, "With --cache_features and augmentation: augmented views computed per image; "
                              "frozen epoch e trains on view e mod K (2: measured as good as or better than 1, 4 "
                              "and 8 on hymenoptera and sign_language_digits, BUILD_NOTES.md).")
  drop_suspects: bool = _field(False, "Train without the training images whose label the label audit suspects "
                                "(report/suspect_labels.csv, found by confident learning on the frozen phase's "
                                "features): they weigh 0 in both phases. Labels are never changed.")


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
  strategy: str = _field("default", "tf.distribute strategy.", STRATEGIES)
  tpu: str = _field("", "TPU address for --strategy=tpu ('' = the local TPU or the one in TPU_NAME).")
  mixed_precision: str = _field("auto", "Compute precision (auto: float32 on CPU, where float16 is slower).",
                                PRECISIONS)
  example_log: str = _field("", "Debugging: a folder where every worker writes the ids of the training examples "
                           "of each epoch (worker_<i>.jsonl), to check that each is trained on once per epoch.")
  verbosity: int = _field(0, "absl's --verbosity: -1 warnings only; 0 a progress bar and one line per epoch; "
                          "1 debug logs.")
  peer_timeout: float = _field(600.0, "--strategy=multi_worker: seconds a worker waits for every worker of TF_CONFIG "
                               "to come before it ends with exit code 138 (a line every 30 s names who is missing).")


@dataclasses.dataclass(frozen=True)
class ExportConfig:
  model_name: str = _field("classifier", "Name of the model in the TF Serving layout export/<model_name>/<version>/.")
  top_k: int = _field(5, "How many best classes the serving signatures return (top_k_classes, top_k_scores; at most "
                      "the number of classes); also the k of evaluation's top-k accuracy.")
  tflite: bool = _field(False, "Also write model.tflite (TFLite metadata inside: labels, input, description) next "
                       "to the SavedModel, judged on the validation split; needs the tflite extra.")
  tflite_quantization: str = _field("float16", "Quantization of model.tflite (int8: full-integer, uint8 camera "
                                    "pixels in, calibrated on training images).", TFLITE_QUANTIZATIONS)
  tflite_max_accuracy_drop: float = _field(0.01, "The export refuses a model.tflite whose val accuracy is more than "
                                           "this below the SavedModel's (0.01: one point); 1 accepts any loss.")


@dataclasses.dataclass(frozen=True)
class TuneConfig:
  tune: bool = _field(False, "Search head_units, frozen_lr and dropout with KerasTuner before training, on cached "
                      "backbone features, then train with the best values.")
  tuner: str = _field("random", "KerasTuner search algorithm (bayesian needs scipy and scikit-learn; hyperband's "
                      "shortened trials are not compared with the defaults' full-length score).", TUNERS)
  max_trials: int = _field(20, "Trials of the random and bayesian searches (hyperband sizes itself from "
                           "--tune_epochs).")
  tune_epochs: int = _field(10, "Epochs of one trial, as many as the frozen phase's default (hyperband: the most "
                            "any trial gets).")
  tune_only: bool = _field(False, "Stop after the search (best values in WORKDIR/tuning/best_hparams.json).")
  tune_folds: int = _field(5, "Folds of the cross-validation that scores each trial inside the training split "
                           "(the validation split is never used by the search).")


@dataclasses.dataclass(frozen=True)
class Config:
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)
  export: ExportConfig = dataclasses.field(default_factory=ExportConfig)
  tune: TuneConfig = dataclasses.field(default_factory=TuneConfig)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict) -> "Config":
    return cls(**{name: section(**values.get(name, {})) for name, section in SECTIONS.items()})

  def replace(self, **flat_values) -> "Config":
    """Returns a copy with fields changed by their (section-unique) names."""
    changed = {}
    for section in dataclasses.fields(self):
      current = getattr(self, section.name)
      own = {k: v for k, v in flat_values.items() if k in {f.name for f in dataclasses.fields(current)}}
      changed[section.name] = dataclasses.replace(current, **own)
    unknown = set(flat_values) - {field.name for _, field in section_fields()}
    if unknown:
      raise KeyError(f"Unknown config fields: {sorted(unknown)}")
    return Config(**changed)

  def identity_hash(self) -> str:
    """Hash of the settings that make two runs the same run (not epochs, verbosity or where files go)."""
    values = self.to_dict()
    for section, name in _NOT_IDENTITY:
      values[section].pop(name, None)
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


# Changing these in an existing workdir continues the same run (more epochs, quieter logs).
_NOT_IDENTITY = (("train", "frozen_epochs"), ("train", "finetune_epochs"), ("runtime", "verbosity"),
                 ("runtime", "strategy"), ("runtime", "tpu"), ("runtime", "example_log"), ("data", "cache_dir"),
                 ("data", "accept_changed_data"),
                 ("data", "cache"), ("data", "memory_budget"), ("data", "data_service"), ("tune", "tune_folds"),
                 ("model", "weights_fallback"), ("export", "top_k"), ("export", "tflite"),
                 ("export", "tflite_quantization"), ("export", "tflite_max_accuracy_drop"),
                 ("tune", "tune"), ("tune", "tuner"), ("tune", "max_trials"), ("tune", "tune_epochs"),
                 ("tune", "tune_only"), ("runtime", "peer_timeout"))


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "runtime": RuntimeConfig,
            "export": ExportConfig, "tune": TuneConfig}


def section_fields():
  """Yields (section_name, dataclasses.Field) for every configurable field."""
  for name, section in SECTIONS.items():
    for field in dataclasses.fields(section):
      yield name, field
