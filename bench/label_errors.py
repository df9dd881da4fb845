"""python -m bench.label_errors: does the label audit (trainer.reporting.label_audit) find flipped labels and re-encoded
copies?

On a temporary copy of --dataset (train/ + val/ class folders) made of symlinks, never written into the dataset:
  noisy:  --flip of the training images moved to another class at random (seeded): the labels are wrong, the images
          are the clean set's. recall_at_2n: the share of the n flipped images among the first 2n suspects;
          false_pairs_clean: the near-duplicate pairs found on these (clean) images.
  copies: --copies validation images re-encoded as JPEG quality 75 at 90% of their size and put into train/ under
          their class. copies_found: how many are paired with their original.
Features are extracted as a run extracts them (the run's augmentation preset and views), once per dataset; seconds is
the audit's time on the noisy set (out-of-fold predictions, confident learning, thumbnails of the decoded images,
pairs), apart from the extraction the frozen phase does anyway (extract_seconds).
"""

import json
import os
import pathlib
import tempfile
import time

import numpy as np
from absl import flags
from PIL import Image, ImageOps

import bench
from trainer.config import Config
from trainer.input import data
from trainer.loop import features
from trainer.modeling import augment
from trainer.modeling import model as model_lib
from trainer.reporting import label_audit
from trainer.runtime import runtime

FLAGS = flags.FlagValues()
flags.DEFINE_string("dataset", "../shared/datasets/sign_language_digits", "Dataset: train/ and val/ class folders.",
                    flag_values=FLAGS)
flags.DEFINE_float("flip", 0.05, "Fraction of the training labels flipped to another class.", flag_values=FLAGS)
flags.DEFINE_integer("copies", 20, "Validation images re-encoded and put into train/.", flag_values=FLAGS)
bench.define_backbone_flags(FLAGS)
flags.DEFINE_integer("image_size", 160, "Input size (smaller than the backbone's 224 for speed).", flag_values=FLAGS)
flags.DEFINE_string("augment", "light", "Augmentation preset of the extraction (the run's default).",
                    flag_values=FLAGS)
flags.DEFINE_integer("feature_views", 2, "Augmented views per training image (the run's default).", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 32, "Batch size of the extraction.", flag_values=FLAGS)
flags.DEFINE_integer("seed", 42, "Seed of the flips, the copies and the extraction.", flag_values=FLAGS)
flags.DEFINE_string("json", "", "Write the figures to this file.", flag_values=FLAGS)

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def _files(split_dir: pathlib.Path) -> list[tuple[pathlib.Path, str]]:
  return [(path, class_dir.name) for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir())
          for path in sorted(class_dir.iterdir()) if path.suffix.lower() in _IMAGE_SUFFIXES]


def _link(source: pathlib.Path, target: pathlib.Path) -> None:
  target.parent.mkdir(parents=True, exist_ok=True)
  os.symlink(source.resolve(), target)


def make_noisy(dataset: pathlib.Path, root: pathlib.Path, flip: float, seed: int) -> set[str]:
  """root/{train,val}/ as symlinks, `flip` of the training images under another class; returns their link paths."""
  train_files = _files(dataset / "train")
  classes = sorted({name for _, name in train_files})
  rng = np.random.default_rng(seed)
  chosen = set(rng.choice(len(train_files), round(flip * len(train_files)), replace=False).tolist())
  flipped = set()
  for index, (path, name) in enumerate(train_files):
    if index in chosen:
      other = rng.choice([c for c in classes if c != name])
      target = root / "train" / other / f"flipped_from_{name}_{path.name}"
      flipped.add(str(target))
    else:
      target = root / "train" / name / path.name
    _link(path, target)
  for path, name in _files(dataset / "val"):
    _link(path, root / "val" / name / path.name)
  return flipped


def make_copies(dataset: pathlib.Path, root: pathlib.Path, copies: int, seed: int) -> dict[str, str]:
  """root/{train,val}/ as symlinks plus `copies` validation images re-encoded (JPEG quality 75, 90% of the size,
  upright) into train/; returns copy path -> original val link path."""
  for path, name in _files(dataset / "train"):
    _link(path, root / "train" / name / path.name)
  val_files = _files(dataset / "val")
  for path, name in val_files:
    _link(path, root / "val" / name / path.name)
  originals = {}
  for index in np.random.default_rng(seed).choice(len(val_files), copies, replace=False):
    path, name = val_files[index]
    with Image.open(path) as image:
      upright = ImageOps.exif_transpose(image).convert("RGB")
    smaller = upright.resize((max(1, round(upright.width * 0.9)), max(1, round(upright.height * 0.9))))
    target = root / "train" / name / f"copy_of_{path.stem}.jpg"
    smaller.save(target, format="JPEG", quality=75)
    originals[str(target)] = str(root / "val" / name / path.name)
  return originals


def load(config: Config, data_dir: pathlib.Path, cache_root: pathlib.Path) -> tuple[Config, data.InputData]:
  """The run's resolved config and decoded data of data_dir."""
  config = runtime.resolve(config.replace(data_dir=str(data_dir)))
  return config, data.load(config.data, config.data.image_size, str(cache_root))


def extract(config: Config, inputs: data.InputData):
  """(FeatureCache, seconds) of a run's frozen-phase extraction."""
  classifier = model_lib.build_classifier(config.model, len(inputs.classes), config.data.image_size, config.data.seed)
  start = time.perf_counter()
  cache = features.FeatureCache(classifier, inputs.train.images_with_ids, inputs.val.images_with_ids,
                                config.data.batch_size, augment.build(config.train, config.data.seed),
                                config.train.feature_views)
  return cache, time.perf_counter() - start


def _names(examples: data.Examples) -> dict[int, str]:
  return dict(zip(examples.ids, examples.paths))


def _thumbnails(inputs: data.InputData) -> tuple[tuple[np.ndarray, list[str]], tuple[np.ndarray, list[str]]]:
  """Each split's thumbnails (label_audit.thumbnails) and the paths of their rows."""
  found = []
  for examples in (inputs.train, inputs.val):
    descriptors, ids = label_audit.thumbnails(examples.images_with_ids)
    found.append((descriptors, [_names(examples)[int(i)] for i in ids]))
  return found[0], found[1]


def _pairs(inputs: data.InputData, threshold: float) -> list[tuple[str, str, float]]:
  """(path, path, similarity) of the near-duplicate pairs of both splits."""
  (train_thumbnails, train_paths), (val_thumbnails, val_paths) = _thumbnails(inputs)
  paths = {"train": train_paths, "val": val_paths}
  return [(paths[a][i], paths[b][j], s)
          for a, i, b, j, s in label_audit.near_duplicates(train_thumbnails, val_thumbnails, threshold)]


def run(dataset: str, flip: float, copies: int, config: Config, root: str) -> dict:
  """The figures of the module docstring; the temporary datasets are made under root."""
  dataset_path, root_path = pathlib.Path(dataset), pathlib.Path(root)
  flipped = make_noisy(dataset_path, root_path / "noisy", flip, config.data.seed)
  config, inputs = load(config, root_path / "noisy", root_path / "cache_noisy")
  cache, extract_seconds = extract(config, inputs)
  start = time.perf_counter()
  (train_thumbnails, _), (val_thumbnails, _) = _thumbnails(inputs)
  findings = label_audit.audit(cache.train_features, cache.train_labels, len(inputs.classes), config.data.seed,
                               train_thumbnails, val_thumbnails)
  seconds = time.perf_counter() - start
  train_names = _names(inputs.train)
  ranked = [train_names[int(cache.train_ids[row])] for row in findings.suspects]
  top = set(ranked[:2 * len(flipped)])
  # The closest pairs of distinct images, whether or not they reach the threshold: the threshold's margin.
  closest_clean = sorted((pair[2] for pair in _pairs(inputs, 0.9)), reverse=True)[:5]

  originals = make_copies(dataset_path, root_path / "copies", copies, config.data.seed)
  # Near-duplicates need the decoded images only, not the backbone's features.
  _, copy_inputs = load(config, root_path / "copies", root_path / "cache_copies")
  found_pairs = {frozenset(pair[:2]): pair[2] for pair in _pairs(copy_inputs, 0.9)}
  # 0.0 stands for a similarity below 0.9.
  similarity_to_original = {copy: found_pairs.get(frozenset((copy, original)), 0.0)
                            for copy, original in originals.items()}
  found = sum(s >= label_audit.NEAR_DUPLICATE_SIMILARITY for s in similarity_to_original.values())
  other_pairs = sum(s >= label_audit.NEAR_DUPLICATE_SIMILARITY for s in found_pairs.values()) - found
  return {"flipped": len(flipped), "recall_at_2n": len(top & flipped) / max(len(flipped), 1),
          "suspects_flagged": len(ranked), "recall_all_flagged": len(set(ranked) & flipped) / max(len(flipped), 1),
          "copies": copies, "copies_found": int(found), "other_pairs_copies_set": int(other_pairs),
          "false_pairs_clean": len(findings.pairs), "seconds": seconds, "extract_seconds": extract_seconds,
          "threshold": label_audit.NEAR_DUPLICATE_SIMILARITY,
          "copy_similarities": sorted(round(s, 4) for s in similarity_to_original.values()),
          "closest_clean_similarities": [round(s, 4) for s in closest_clean],
          "train_images": len(cache.train_labels), "val_images": len(cache.val_labels)}


def main(argv: list[str]) -> dict:
  """Measures, prints, writes --json; returns the figures."""
  bench.parse_flags(FLAGS, argv, __doc__)
  config = Config().replace(backbone=FLAGS.backbone, alpha=FLAGS.alpha, weights=FLAGS.weights,
                            image_size=FLAGS.image_size, augment=FLAGS.augment, feature_views=FLAGS.feature_views,
                            batch_size=FLAGS.batch_size, seed=FLAGS.seed, verbosity=-1)
  with tempfile.TemporaryDirectory(prefix="bench_label_errors_") as root:
    figures = run(FLAGS.dataset, FLAGS.flip, FLAGS.copies, config, root)
  figures["load_average"] = os.getloadavg()[0]
  print(json.dumps(figures, indent=2))
  bench.write_figures(figures, FLAGS.json)
  return figures


if __name__ == "__main__":
  bench.run(main)
