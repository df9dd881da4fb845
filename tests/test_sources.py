"""Where labelled files come from, as a user lays them out: what is read, what is skipped (and why), and layouts
that would train the wrong classes, refused in one line that says what was expected."""

import logging
import os

import pytest
from conftest import CLASS_COLORS, write_image

from trainer.config import Config
from trainer.errors import UserInputError
from trainer.input import sources, tfds_source


def _data(**values):
  return Config().replace(**values).data


def _class_folders(root, names=tuple(CLASS_COLORS), per_class=3):
  for name in names:
    for i in range(per_class):
      write_image(root / name / f"{name}_{i}.png", CLASS_COLORS.get(name, (90, 90, 90)), fmt="PNG", size=(8, 8))
  return root


def test_files_that_are_no_readable_image_are_skipped_with_the_reason(color_folder):
  red = color_folder / "red"
  (red / "scan.tif").write_bytes(b"II*\0 a TIFF header")
  (red / "IMG_0001").write_bytes((red / "red_0.jpg").read_bytes())
  os.symlink(red / "gone.jpg", red / "link.jpg")
  write_image(red / "more" / "red_9.jpg", CLASS_COLORS["red"])
  (red / ".DS_Store").write_bytes(b"\0")

  files = sources.find_files(_data(data_dir=str(color_folder)))

  reasons = {os.path.basename(path): why for path, why in files.skipped.items()}
  assert sorted(reasons) == ["IMG_0001", "link.jpg", "more", "scan.tif"]
  assert ".tif" in reasons["scan.tif"] and "no file extension" in reasons["IMG_0001"]
  assert "broken symbolic link" in reasons["link.jpg"] and "folder" in reasons["more"]
  used = files.train.paths + files.val.paths
  assert len(used) == 18 and not set(used) & set(files.skipped)


def test_the_data_pipeline_counts_skipped_files_in_its_warning(color_folder, tmp_path, caplog):
  from trainer.input import data
  (color_folder / "red" / "scan.tif").write_bytes(b"II*\0")
  (color_folder / "blue" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")

  inputs = data.load(_data(data_dir=str(color_folder)), 16, str(tmp_path / "cache"))

  assert sorted(os.path.basename(path) for path in inputs.skipped) == ["scan.tif", "truncated.jpg"]
  assert any("Skipping 2 " in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("layout, message", [
    (("train", "test"), r"holds train/ and test/ but not both train/ and val/: expected train/ and val/ .*"
                        r"Rename test/ to val/"),
    (("train",), r"holds train/ but not both train/ and val/: expected .* pass --data_dir=\S+/train"),
])
def test_split_folders_other_than_train_and_val_are_refused_saying_what_was_expected(tmp_path, layout, message):
  for split in layout:
    _class_folders(tmp_path / "d" / split)

  with pytest.raises(UserInputError, match=message):
    sources.find_files(_data(data_dir=str(tmp_path / "d")))


def test_images_one_level_deeper_are_refused_naming_the_folder_to_pass(tmp_path):
  _class_folders(tmp_path / "d" / "photos")

  with pytest.raises(UserInputError, match=r"one level deeper .* --data_dir=\S+/d/photos\."):
    sources.find_files(_data(data_dir=str(tmp_path / "d")))


def test_train_and_val_folders_of_images_are_not_taken_for_two_classes(tmp_path):
  for split in ("train", "val"):
    for i in range(3):
      write_image(tmp_path / "d" / split / f"{i}.jpg", (9, 9, 9))

  with pytest.raises(UserInputError, match=r"train/, val/ hold images directly.*one sub-folder per class"):
    sources.find_files(_data(data_dir=str(tmp_path / "d")))


def test_a_class_named_test_is_a_class(tmp_path):
  _class_folders(tmp_path / "d", names=("test", "prod"))

  files = sources.find_files(_data(data_dir=str(tmp_path / "d")))

  assert files.classes == ("prod", "test")


def _write_csv(tmp_path, lines):
  for name, color in CLASS_COLORS.items():
    for i in range(2):
      write_image(tmp_path / f"{name}_{i}.png", color, fmt="PNG", size=(8, 8))
  (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
  return _data(csv=str(tmp_path / "labels.csv"), validation_split=0.5)


def test_a_csv_header_names_its_columns_in_either_order(tmp_path):
  rows = [f"{name},{name}_{i}.png" for name in CLASS_COLORS for i in range(2)]

  files = sources.find_files(_write_csv(tmp_path, ["Label,Path"] + rows))

  assert files.classes == ("blue", "green", "red")
  for path, label in zip(files.train.paths + files.val.paths, files.train.labels + files.val.labels):
    assert os.path.basename(path).startswith(files.classes[label])


def test_a_first_row_that_names_a_file_is_data_whatever_its_label(tmp_path):
  rows = [f"{name}_{i}.png,{'target' if name == 'red' else 'other'}" for name in CLASS_COLORS for i in range(2)]

  files = sources.find_files(_write_csv(tmp_path, rows))

  assert files.classes == ("other", "target") and len(files.train) + len(files.val) == 6


def test_a_csv_header_with_more_columns_picks_path_and_label_by_name(tmp_path):
  rows = [f"{i},{name},{name}_{i}.png,train" for name in CLASS_COLORS for i in range(2)]

  files = sources.find_files(_write_csv(tmp_path, ["id,class,filename,split"] + rows))

  assert len(files.train) + len(files.val) == 6


@pytest.mark.parametrize("lines, message", [
    (["name,kind", "red_0.png,red"], r"line 1: 'name,kind' looks like a header but does not say which column"),
    (["id,path,file", "1,red_0.png,red"], r"line 1: the header 'id,path,file' does not say which column"),
    (["red,red_0.png", "blue,blue_0.png"], r"do not exist .* if the rows are label,path, add the header row"),
])
def test_csv_columns_that_cannot_be_told_apart_are_named(tmp_path, lines, message):
  with pytest.raises(UserInputError, match=message):
    sources.find_files(_write_csv(tmp_path, lines))


def test_an_unknown_tfds_name_is_one_line_with_close_names_and_how_to_list_them(tmp_path):
  with pytest.raises(UserInputError) as error:
    tfds_source.tfds_splits(_data(tfds="mnsit", tfds_data_dir=str(tmp_path)))

  message = str(error.value)
  assert "\n" not in message and len(message) < 400
  assert "did you mean mnist" in message and "tfds.list_builders()" in message


def test_a_test_folder_may_hold_one_class(tmp_path):
  _class_folders(tmp_path / "test", names=("red",))

  test = sources.find_test_files(_data(data_dir=str(tmp_path / "test")))

  assert test.classes == ("red",) and len(test.files) == 3


@pytest.mark.parametrize("splits, evaluated, named", [
    (("train", "val"), "val", "its val/ folder only; train/ not evaluated"),
    (("train", "val", "test"), "test", "its test/ folder only; train/ and val/ not evaluated"),
])
def test_a_test_source_with_split_folders_is_only_its_held_out_folder(tmp_path, splits, evaluated, named):
  for split in splits:
    _class_folders(tmp_path / "d" / split, per_class=1 + len(split))

  test = sources.find_test_files(_data(data_dir=str(tmp_path / "d")))

  assert {os.path.basename(os.path.dirname(os.path.dirname(path))) for path in test.files.paths} == {evaluated}
  assert named in test.description


@pytest.mark.parametrize("make, message", [
    (lambda root: _class_folders(root / "train"), r"holds only train/: the training images"),
    (lambda root: write_image(root / "a.jpg", (1, 2, 3)), r"0 class\(es\).*export.predict"),
])
def test_test_folders_that_hold_no_test_set_are_refused(tmp_path, make, message):
  make(tmp_path / "d")

  with pytest.raises(UserInputError, match=message):
    sources.find_test_files(_data(data_dir=str(tmp_path / "d")))


def test_a_csv_that_is_not_utf8_and_a_data_dir_that_is_a_file_are_named(tmp_path):
  (tmp_path / "labels.csv").write_bytes("caf\u00e9.jpg,cat\n".encode("latin-1"))

  with pytest.raises(UserInputError, match=r"labels.csv is not UTF-8 text \(it holds the byte 0xe9\)"):
    sources.find_files(_data(csv=str(tmp_path / "labels.csv")))
  with pytest.raises(UserInputError, match=r"labels.csv is a file: pass the folder .* --csv"):
    sources.find_files(_data(data_dir=str(tmp_path / "labels.csv")))


def test_train_valid_and_test_folders_train_on_train_validate_on_valid_and_hold_out_test(tmp_path, monkeypatch):
  for split in ("train", "valid", "test"):
    _class_folders(tmp_path / "d" / split, names=("red", "blue"))
  # The message itself, whatever level earlier tests left absl's logger at (caplog misses it after some of them).
  said = []
  monkeypatch.setattr(sources.logging, "info", lambda message, *args: said.append(message % args))

  files = sources.find_files(_data(data_dir=str(tmp_path / "d")))

  assert all("/train/" in path for path in files.train.paths) and all("/valid/" in path for path in files.val.paths)
  assert any("test is held out" in message for message in said)


def test_a_label_typo_in_a_csv_is_warned_about_in_one_line(tmp_path, caplog):
  """`bee` among `bees` silently made a 3-class model."""
  rows = []
  for label, color, count in (("bees", (230, 200, 40), 12), ("ants", (90, 40, 20), 12), ("bee", (230, 200, 40), 2)):
    for i in range(count):
      write_image(tmp_path / "photos" / f"{label}_{i}.jpg", color)
      rows.append(f"photos/{label}_{i}.jpg,{label}")
  (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
  with caplog.at_level(logging.WARNING):
    files = sources.find_files(_data(csv=str(tmp_path / "labels.csv")))
  assert files.classes == ("ants", "bee", "bees")  # Warned, never changed silently.
  warnings = [r.getMessage() for r in caplog.records if "label typo" in r.getMessage()]
  assert len(warnings) == 1
  assert "'bee' and 'bees' differ only by case" in warnings[0] and "class 'bee' has 2 image(s)" in warnings[0]


def test_ordinary_class_names_raise_no_typo_warning(tmp_path, caplog):
  for name in ("cat", "car", "class_1", "class_2", "0", "1"):
    for i in range(3):
      write_image(tmp_path / "d" / name / f"{i}.jpg", (i * 40, 90, 20))
  with caplog.at_level(logging.WARNING):
    sources.find_files(_data(data_dir=str(tmp_path / "d")))
  assert not [r for r in caplog.records if "label typo" in r.getMessage()]


def test_an_unreadable_split_folder_is_one_line(tmp_path, monkeypatch):
  """An unreadable val/ ended in a PermissionError traceback (an unreadable class folder was handled). Tests run
  as root, who reads any folder: the refusal is played by os.listdir."""
  for split in ("train", "val"):
    for name in ("cat", "dog"):
      write_image(tmp_path / "d" / split / name / "a.jpg", (1, 2, 3))
  real_listdir = os.listdir

  def listdir(path):
    if os.path.basename(path) == "val":
      raise PermissionError(13, "Permission denied")
    return real_listdir(path)
  monkeypatch.setattr(os, "listdir", listdir)
  with pytest.raises(UserInputError, match=r"val cannot be read \(Permission denied\)"):
    sources.find_files(_data(data_dir=str(tmp_path / "d")))
