"""Where labelled images come from: which source the flags chose, and the file sources, class folders and a CSV of
`path,label` rows (TFDS: trainer.input.tfds_source; TFRecord: trainer.input.tfrecords).

File sources give paths, so the files can be checked, hashed and compared before training. Every source is split
into train and validation the same way: its own validation split when it has one, else a stratified seeded carve of
`--validation_split` (`stratified_split`).
"""

import csv
import dataclasses
import os
import random
import re
from typing import Collection, Hashable, Iterable, Iterator, Sequence

from absl import logging

from trainer.config import SOURCE_FLAGS, DataConfig
from trainer.errors import UserInputError
from trainer.input import images


@dataclasses.dataclass(frozen=True)
class Split:
  paths: tuple[str, ...]
  labels: tuple[int, ...]

  def __len__(self) -> int:
    return len(self.paths)

  def without(self, paths: Collection[str]) -> "Split":
    keep = [(path, label) for path, label in zip(self.paths, self.labels) if path not in paths]
    return Split(tuple(path for path, _ in keep), tuple(label for _, label in keep))


@dataclasses.dataclass(frozen=True)
class LabelledFiles:
  """Every image file of a source, split into train and validation, with class names indexed by label, and the
  files of the class folders that are not used (not named like an image, broken links, sub-folders) with why."""
  classes: tuple[str, ...]
  train: Split
  val: Split
  skipped: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class EvaluationFiles:
  """The images of a source given for evaluation, as one split (a test set may hold a single class)."""
  classes: tuple[str, ...]
  files: Split
  skipped: dict[str, str]
  description: str  # what is evaluated, for the report: the flag and, for split folders, which one


def chosen(config: DataConfig) -> str:
  """The one source flag given (one of SOURCE_FLAGS)."""
  given = [name for name in SOURCE_FLAGS if getattr(config, name)]
  if not given:
    raise UserInputError("No data given: pass --data_dir=FOLDER (class sub-folders, or train/ and val/), "
                         "--csv=FILE (path,label rows), --tfds=NAME or --tfrecord=GLOB.")
  if len(given) > 1:
    raise UserInputError(f"Pass only one data source; got {', '.join('--' + name for name in given)}.")
  return given[0]


def find_files(config: DataConfig) -> LabelledFiles:
  """The labelled image files of --data_dir or --csv, or UserInputError saying what is wrong and how to fix it."""
  if chosen(config) == "csv":
    classes, files = _csv_files(config.csv, min_classes=2)
    skipped, where = {}, f"--csv={config.csv}"
    warn_suspicious_classes(files, where)
  else:
    root = _existing_folder(config.data_dir)
    splits = _split_folders(root)
    if "train" in splits and "val" in splits:
      classes, train, skipped = class_folders(splits["train"])
      warn_suspicious_classes(train, splits["train"])
      val_classes, val, val_skipped = class_folders(splits["val"])
      if val_classes != classes:
        raise UserInputError(
            f"The class folders of {splits['train']} and {splits['val']} differ: only in train: "
            f"{sorted(set(classes) - set(val_classes)) or 'none'}, only in validation: "
            f"{sorted(set(val_classes) - set(classes)) or 'none'}. Give both the same class sub-folders.")
      if "test" in splits:
        logging.info("%s is held out: not used for training or validation (python -m trainer.evaluate "
                     "--data_dir=%s evaluates a run on it).", splits["test"], splits["test"])
      return LabelledFiles(tuple(classes), as_split(train, classes), as_split(val, classes),
                           {**skipped, **val_skipped})
    if splits:
      raise UserInputError(f"--data_dir={root} holds {_listed(splits)} but not both train/ and val/: expected "
                           "train/ and val/ (or validation/) with one sub-folder per class, or the class folders "
                           f"directly. {_fix_for_split_folders(root, splits)}")
    classes, files, skipped = class_folders(root)
    _refuse_split_names_as_classes(root, classes)
    where = f"--data_dir={root}"
    warn_suspicious_classes(files, where)
  train, val = stratified_split(files, config.validation_split, config.seed, where=where)
  return LabelledFiles(tuple(classes), as_split(train, classes), as_split(val, classes), skipped)


def find_test_files(config: DataConfig) -> EvaluationFiles:
  """Every labelled image of --data_dir or --csv given for evaluation: of a folder that holds train/ and a test/
  or val/ folder, only that one (train/ holds training images)."""
  if chosen(config) == "csv":
    classes, files = _csv_files(config.csv, min_classes=1)
    skipped, description = {}, f"--csv={config.csv}"
  else:
    root = _existing_folder(config.data_dir)
    splits = _split_folders(root)
    held_out = next((name for name in ("test", "val") if name in splits), None)
    if splits and not held_out:
      raise UserInputError(f"--data_dir={root} holds only {_listed(splits)}: the training images. Pass a folder "
                           "of test images (class sub-folders), or one that holds test/ or val/.")
    folder = splits[held_out] if held_out else root
    classes, files, skipped = class_folders(folder, min_classes=1)
    description = f"--data_dir={root}"
    if held_out:
      others = _listed({role: path for role, path in splits.items() if role != held_out})
      description += f" (its {os.path.basename(folder)}/ folder only" + (f"; {others} not evaluated" if others else "")
      description += ")"
  return EvaluationFiles(tuple(classes), as_split(files, classes), skipped, description)


def _existing_folder(root: str) -> str:
  if os.path.isfile(root):
    raise UserInputError(f"--data_dir={root} is a file: pass the folder that holds the class folders (a CSV of "
                         "path,label rows goes to --csv).")
  if not os.path.isdir(root):
    raise UserInputError(f"--data_dir={root}: no such folder.")
  return root


def _listdir(folder: str) -> list[str]:
  try:
    return os.listdir(folder)
  except OSError as e:
    raise UserInputError(f"{folder} cannot be read ({e.strerror}): give this user read access or remove it.") \
        from None


# Folder names of a layout split into train, validation and test (rather than class folders).
_SPLIT_NAMES = {"train": ("train", "training"), "val": ("val", "validation", "valid"),
                "test": ("test", "testing", "eval")}


def _split_folders(root: str) -> dict[str, str]:
  """The train, val and test folders directly below `root`, by role ('train', 'val', 'test'): folders of those
  names that hold no images directly (a class may be called 'test')."""
  found = {}
  for role, names in _SPLIT_NAMES.items():
    path = next((os.path.join(root, name) for name in names if _is_split_folder(os.path.join(root, name))), None)
    if path:
      found[role] = path
  return found


def _is_split_folder(path: str) -> bool:
  return os.path.isdir(path) and not any(is_image_file(name) for name in _listdir(path))


def _listed(splits: dict[str, str]) -> str:
  return " and ".join(os.path.basename(path) + "/" for path in splits.values())


def _refuse_split_names_as_classes(root: str, classes: Sequence[str]) -> None:
  """train/ and val/ that hold the images directly would train a classifier of 'train' against 'val'."""
  split_names = {name for names in _SPLIT_NAMES.values() for name in names}
  if set(classes) <= split_names:
    raise UserInputError(f"--data_dir={root}: its sub-folders {', '.join(c + '/' for c in classes)} hold images "
                         "directly, so they would be the classes. Expected train/ and val/ with one sub-folder per "
                         "class inside each (train/cat/*.jpg, val/cat/*.jpg, ...): sort each split's images into "
                         "class folders.")


def _fix_for_split_folders(root: str, splits: dict[str, str]) -> str:
  if "train" not in splits:
    return "Add a train/ folder of class folders beside them, or pass --data_dir=FOLDER of class folders."
  train = splits["train"]
  if "test" in splits:
    return (f"Rename {os.path.basename(splits['test'])}/ to val/ to validate on it, or pass --data_dir={train} "
            f"(split by --validation_split) and evaluate on {splits['test']} afterwards (python -m "
            "trainer.evaluate).")
  return f"Add a val/ folder, or pass --data_dir={train} (split by --validation_split)."


def is_image_file(name: str) -> bool:
  # Hidden files include macOS' .DS_Store and the ._* resource forks copied beside every photo.
  return not name.startswith(".") and name.lower().endswith(images.IMAGE_EXTENSIONS)


def class_folders(folder: str, min_classes: int = 2) -> tuple[list[str], dict[str, list[str]], dict[str, str]]:
  """Class names (sorted), the image paths of each class folder directly below `folder`, and the other entries
  of those class folders with why they are not used. Hidden files and folders are ignored."""
  classes = sorted(d for d in _listdir(folder)
                   if not d.startswith(".") and os.path.isdir(os.path.join(folder, d)))
  files, skipped = {}, {}
  for name in classes:
    files[name], skipped_here = _class_folder_files(os.path.join(folder, name))
    skipped.update(skipped_here)
  _refuse_images_one_level_deeper(folder, files, skipped)
  require_classes(classes, min_classes, folder, "Put each class's images in a sub-folder named after the class "
                   + ("(or train/ and val/ folders that hold them)." if min_classes > 1 else
                      "(python -m export.predict classifies images without labels)."))
  for name in classes:
    if not files[name]:
      class_dir = os.path.join(folder, name)
      others = [path for path in skipped if os.path.dirname(path) == class_dir]
      found = f"; it holds {len(others)} other entries, e.g. {os.path.basename(others[0])}" if others else ""
      raise UserInputError(f"Class folder {class_dir} holds no images ({', '.join(images.IMAGE_EXTENSIONS)}"
                           f"{found}). Add images or remove the folder.")
  return classes, files, skipped


def _class_folder_files(class_dir: str) -> tuple[list[str], dict[str, str]]:
  """The image files directly in a class folder, and its other (not hidden) entries with why they are skipped."""
  found, skipped = [], {}
  for name in sorted(_listdir(class_dir)):
    path = os.path.join(class_dir, name)
    if name.startswith("."):
      continue
    if os.path.islink(path) and not os.path.exists(path):
      skipped[path] = f"broken symbolic link (to {os.readlink(path)}, which does not exist)"
    elif os.path.isdir(path):
      skipped[path] = "a folder inside a class folder: only images directly in the class folder are read"
    elif not os.path.isfile(path):
      skipped[path] = "not a regular file"
    elif not is_image_file(name):
      extension = os.path.splitext(name)[1]
      kind = f"{extension} files are not read" if extension else "no file extension"
      skipped[path] = f"not named as an image ({kind}; read: {', '.join(images.IMAGE_EXTENSIONS)})"
    else:
      found.append(path)
  return found, skipped


def _refuse_images_one_level_deeper(folder: str, files: dict[str, list[str]], skipped: dict[str, str]) -> None:
  """When no class folder holds images but their sub-folders do, `folder` is one level above the class folders."""
  if not files or any(files.values()):
    return
  for sub_folder in (path for path in sorted(skipped) if os.path.isdir(path)):
    example = next((name for name in sorted(_listdir(sub_folder)) if is_image_file(name)), None)
    if example:
      parent = os.path.dirname(sub_folder)
      raise UserInputError(f"{folder}: expected one sub-folder per class holding the images, but the images are "
                           f"one level deeper (e.g. {os.path.join(sub_folder, example)}). Pass the folder whose "
                           f"sub-folders are the classes, e.g. --data_dir={parent}.")


def require_classes(classes: Sequence[str], minimum: int, where: str, fix: str) -> None:
  if len(classes) < minimum:
    need = "a classifier needs at least two" if minimum > 1 else "evaluation needs at least one"
    raise UserInputError(f"{where} has {len(classes)} class(es) {list(classes)}; {need}. {fix}")


# Header names of the two columns of a CSV source (compared in lower case).
_CSV_PATH_NAMES = {"path", "file", "filename", "file_name", "filepath", "file_path", "image", "image_path", "img"}
_CSV_LABEL_NAMES = {"label", "labels", "class", "class_name", "category", "target"}


def _csv_columns(row: list[str], csv_path: str, base: str) -> tuple[int, int] | None:
  """(path column, label column) named by a header row, or None when the row is not a header: a row that names
  an existing file is data, even when its label is, say, 'target'."""
  if any(cell.strip() and os.path.isfile(os.path.join(base, cell.strip())) for cell in row):
    return None
  names = [cell.strip().lower() for cell in row]
  paths = [i for i, name in enumerate(names) if name in _CSV_PATH_NAMES]
  labels = [i for i, name in enumerate(names) if name in _CSV_LABEL_NAMES]
  if not paths and not labels:
    return None
  if len(names) == 2 and len(paths) + len(labels) == 1:
    known = (paths or labels)[0]
    paths, labels = ([known], [1 - known]) if paths else ([1 - known], [known])
  if len(paths) != 1 or len(labels) != 1:
    raise UserInputError(f"{csv_path} line 1: the header {','.join(row)!r} does not say which column is the image "
                         "path and which the label. Name them path and label.")
  return paths[0], labels[0]


def _csv_rows(f: Iterable[str], csv_path: str) -> Iterator[tuple[int, list[str]]]:
  """(line number, cells) of every row, or UserInputError for a file that is not UTF-8 CSV text."""
  rows = csv.reader(f)
  try:
    yield from enumerate(rows, start=1)
  except UnicodeDecodeError as e:
    # Text is decoded in chunks, so the line is not known: the byte says enough (0xe9 is a Latin-1 é).
    raise UserInputError(f"{csv_path} is not UTF-8 text (it holds the byte 0x{e.object[e.start]:02x}). Save the CSV "
                         "as UTF-8 (spreadsheets: 'CSV UTF-8').") from None
  except csv.Error as e:
    raise UserInputError(f"{csv_path} line {rows.line_num}: not CSV text ({e}).") from None


def _csv_files(csv_path: str, min_classes: int) -> tuple[list[str], dict[str, list[str]]]:
  """Class names (sorted) and image paths per class of a CSV of `path,label` rows (paths relative to the CSV; a
  header row may name the columns in either order). Every file named is used whatever its name: the file checks
  skip those that do not decode."""
  if not os.path.isfile(csv_path):
    raise UserInputError(f"--csv={csv_path}: no such file.")
  base = os.path.dirname(os.path.abspath(csv_path))
  label_of, missing, swapped, first_row = {}, {}, 0, []
  path_column, label_column = 0, 1
  # utf-8-sig: spreadsheet tools put a byte-order mark before the first cell.
  with open(csv_path, newline="", encoding="utf-8-sig") as f:
    for line, row in _csv_rows(f, csv_path):
      if not any(cell.strip() for cell in row):
        continue
      if line == 1:
        first_row, columns = row, _csv_columns(row, csv_path, base)
        if columns:
          path_column, label_column = columns
          continue
      cells = [row[i].strip() if i < len(row) else "" for i in (path_column, label_column)]
      if not all(cells):
        raise UserInputError(f"{csv_path} line {line}: expected 'path,label', got {','.join(row)!r}. Every row "
                             "needs an image path and its label.")
      path, label = os.path.join(base, cells[0]), cells[1]
      if os.path.basename(path).startswith("."):
        continue
      if not os.path.isfile(path):
        missing[line] = path
        swapped += os.path.isfile(os.path.join(base, label))
      elif label_of.setdefault(path, label) != label:
        raise UserInputError(f"{csv_path} line {line}: {path} is labelled both '{label_of[path]}' and '{label}'. "
                             "Give each image one label.")
  if list(missing) == [1] and label_of:
    raise UserInputError(f"{csv_path} line 1: {','.join(first_row)!r} looks like a header but does not say which "
                         "column is the image path and which the label. Name them path and label.")
  if missing:
    hint = (" The label column names existing files: if the rows are label,path, add the header row label,path."
            if swapped else "")
    listed = [f"line {line}: {path}" for line, path in list(missing.items())[:5]]
    raise UserInputError(f"{csv_path} names {len(missing)} file(s) that do not exist ({'; '.join(listed)}"
                         f"{'; ...' if len(missing) > 5 else ''}). Paths are relative to the CSV's folder; fix or "
                         f"remove those rows.{hint}")
  classes = sorted(set(label_of.values()))
  require_classes(classes, min_classes, f"--csv={csv_path}", "Label the rows with at least two different labels."
                   if min_classes > 1 else "Add rows of images and their labels.")
  files = {name: sorted(path for path, label in label_of.items() if label == name) for name in classes}
  return classes, files


# A class this small beside classes of at least _TYPICAL images is more likely a label typo than a class.
_TINY_CLASS, _TYPICAL = 2, 10


def warn_suspicious_classes(files: dict[str, list[str]], where: str) -> None:
  """One warning line when class names look like copies of each other (case, punctuation or a plural 's': 'bee'
  beside 'bees', a typo in a CSV) or a class is tiny beside the others: the run would train an extra class."""
  counts = {name: len(paths) for name, paths in files.items()}
  by_key: dict[str, list[str]] = {}
  for name in counts:
    key = re.sub(r"[^0-9a-z]", "", name.casefold())
    by_key.setdefault(key.removesuffix("s"), []).append(name)
  problems = [f"classes {' and '.join(repr(n) for n in names)} differ only by case, punctuation or a plural"
              for names in by_key.values() if len(names) > 1]
  typical = sorted(counts.values())[len(counts) // 2]
  if typical >= _TYPICAL:
    problems += [f"class {name!r} has {count} image(s) against {typical} for a typical class"
                 for name, count in counts.items() if count <= _TINY_CLASS]
  if problems:
    logging.warning("%s: %s. If these are label typos, fix the labels: each name is trained as a class of its "
                    "own.", where, "; ".join(problems))


def stratified_split(items: dict[str, list[Hashable]], fraction: float, seed: int,
                     where: str) -> tuple[dict[str, list], dict[str, list]]:
  """Holds out `fraction` of each class (at least one item) for validation, the same for the same seed."""
  if not 0.0 < fraction < 1.0:
    raise UserInputError(f"{where} has no validation split, so --validation_split must be between 0 and 1 "
                         f"(got {fraction}).")
  rng = random.Random(seed)
  train, val = {}, {}
  for name, members in items.items():
    if len(members) < 2:
      raise UserInputError(f"{where}: class '{name}' has {len(members)} image(s); at least 2 are needed to hold "
                           "one out for validation. Add images or remove the class.")
    shuffled = list(members)
    rng.shuffle(shuffled)
    n_val = min(len(members) - 1, max(1, round(len(members) * fraction)))
    val[name], train[name] = sorted(shuffled[:n_val]), sorted(shuffled[n_val:])
  return train, val


def as_split(files: dict[str, list[str]], classes: Sequence[str]) -> Split:
  pairs = [(path, list(classes).index(name)) for name in classes for path in files.get(name, [])]
  return Split(tuple(p for p, _ in pairs), tuple(label for _, label in pairs))


