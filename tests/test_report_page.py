"""The run's report page: the top losses kept in bounded memory, the page drawn from a run's files (escaped, every
image on disk, well-formed), in a real browser when Chromium is installed, and written by a real run's finish."""

import html.parser
import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import urllib.parse

import numpy as np
import pytest
import tensorflow as tf
from conftest import _missing
from PIL import Image

from export import end_of_run
from trainer.input import cache, data
from trainer.loop import train
from trainer.reporting import report_files, report_page, summaries, top_losses
from trainer.runtime.workdir import RunDir

# Names a page must escape and a browser must draw: CJK, markup characters, a quote, a space and a '#'.
CLASSES = ["蜜蜂", "<b>ant</b> & co", 'say "hi" #1']
CHROMIUM = "/usr/bin/chromium"


def _softmax_of_channel_means(images, training=False):
  """A stand-in classifier: the mean of each colour channel, over 20, is the logit of the class of that index."""
  return tf.nn.softmax(tf.reduce_mean(images, axis=[1, 2]) / 20.0)


def _examples(logits: np.ndarray, labels: list[int], paths: list[str] | None = None,
              all_examples: int | None = None) -> data.Examples:
  """A validation split of 6x4 images whose channels hold `logits` * 20 (so the stand-in model returns
  softmax(logits)), with ids 10, 11, ... and a weight-0 padding copy at the end, as data.Examples gives them."""
  count = len(labels)
  images = np.broadcast_to((logits * 20.0)[:, np.newaxis, np.newaxis, :], (count, 6, 4, 3)).astype(np.uint8)
  ids = tuple(range(10, 10 + count))

  def epoch(seed):
    padded = (np.concatenate([images, images[:1]]), np.array(labels + labels[:1], np.int32),
              np.array([1.0] * count + [0.0], np.float32), np.array(ids + (-1,), np.int64))
    return tf.data.Dataset.from_tensor_slices(padded)
  return data.Examples(tuple(labels), tuple(labels) * ((all_examples or count) // count), ids, count + 1,
                       cache.CacheChoice("memory", "test"), epoch, tuple(paths) if paths else None)


def _softmax(logits: np.ndarray) -> np.ndarray:
  exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return exp / exp.sum(axis=-1, keepdims=True)


# The top-k of a stream ----------------------------------------------------------------------------------------------


def test_top_k_keeps_the_largest_keys_largest_first_and_makes_only_the_items_it_keeps():
  keys = np.random.default_rng(3).permutation(1000)
  top, made = top_losses.TopK(5), []
  for position, key in enumerate(keys):
    top.offer(int(key), lambda position=position: made.append(position) or position)
  assert [int(keys[position]) for position in top.ranked()] == [999, 998, 997, 996, 995]
  # A random order replaces the kept items about k * ln(n / k) times: far fewer items than the stream are made.
  assert len(made) < 100


def test_top_k_of_equal_keys_keeps_and_ranks_the_earlier_items_first():
  top = top_losses.TopK(3)
  for position, key in enumerate([1, 5, 5, 2, 5, 5, 0]):
    top.offer(key, lambda position=position: position)
  assert top.ranked() == [1, 2, 4]


def test_top_k_holds_fewer_items_than_its_bound_when_the_stream_is_short_and_none_for_zero():
  short = top_losses.TopK(10)
  for key in (3, 1, 2):
    short.offer(key, lambda key=key: key)
  assert short.ranked() == [3, 2, 1]
  none = top_losses.TopK(0)
  none.offer(1, lambda: pytest.fail("an item was made for a top-0"))
  assert none.ranked() == []


# The top losses of a model on a split -------------------------------------------------------------------------------


def test_top_losses_rank_misclassified_images_first_then_by_loss_over_batches():
  rng = np.random.default_rng(0)
  logits = rng.uniform(0, 6, (11, 3))
  labels = [int(label) for label in rng.integers(0, 3, 11)]
  # Two misclassified images of equal (and the highest) loss: the earlier ranks first.
  logits[4] = logits[7] = [0.0, 6.0, 6.0]
  labels[4] = labels[7] = 0
  examples = _examples(logits, labels)
  # What the stand-in model returns for the uint8 images (their channels hold logits * 20, rounded down).
  probabilities = _softmax(np.floor(logits * 20.0) / 20.0)
  predicted = probabilities.argmax(axis=-1)
  losses = -np.log(probabilities[np.arange(11), labels])
  wrong = predicted != np.array(labels)
  expected = sorted(range(11), key=lambda i: (not wrong[i], -losses[i], i))[:5]

  ranked, seen, wrong_count = top_losses.find_top_losses(_softmax_of_channel_means, examples.images_with_ids,
                                                           batch_size=3, count=5)
  assert (seen, wrong_count) == (11, int(wrong.sum()))
  assert [example.id for example in ranked] == [10 + i for i in expected]
  for example in ranked:
    index = example.id - 10
    assert (example.label, example.predicted, example.wrong) == (labels[index], predicted[index], wrong[index])
    assert example.loss == pytest.approx(losses[index], rel=1e-5)
    assert example.probability == pytest.approx(probabilities[index].max(), rel=1e-5)
    assert example.thumbnail.shape == (6, 4, 3) and example.thumbnail.dtype == np.uint8


def test_thumbnails_of_large_images_are_shrunk_to_the_thumbnail_size():
  examples = _examples(np.array([[5.0, 1.0, 1.0]]), [1])
  large = examples.images_with_ids.map(lambda image, label, id_: (tf.image.resize(image, [640, 480]), label, id_))
  [example], _, _ = top_losses.find_top_losses(_softmax_of_channel_means, large, batch_size=1)
  assert max(example.thumbnail.shape[:2]) == top_losses.THUMBNAIL_PIXELS


def test_report_top_losses_writes_thumbnails_the_list_and_the_grid_naming_files_or_records(tmp_path):
  logits = np.array([[0.0, 5.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 5.0], [4.0, 5.0, 0.0]])
  labels = [0, 0, 1, 1]  # The first and third are wrong, the fourth right but unsure.
  paths = [f"/data/{name}.jpg" for name in "abcd"]
  top_losses.report_top_losses(_softmax_of_channel_means, _examples(logits, labels, paths), CLASSES, 2,
                                str(tmp_path))
  listed = json.loads((tmp_path / top_losses.TOP_LOSSES_FILE).read_text(encoding="utf-8"))
  assert (listed["examples"], listed["wrong"]) == (4, 2)
  assert [entry["source"] for entry in listed["top"]] == ["/data/a.jpg", "/data/c.jpg", "/data/d.jpg",
                                                          "/data/b.jpg"]
  assert [entry["wrong"] for entry in listed["top"]] == [True, True, False, False]
  for entry in listed["top"]:
    with Image.open(tmp_path / entry["thumbnail"]) as thumbnail:
      assert thumbnail.size == (4, 6)
  with Image.open(tmp_path / top_losses.TOP_LOSSES_PNG) as grid:
    assert grid.size[0] > 4 * 100  # Four tiles side by side.

  # A TFRecord or TFDS source has no paths; a rerun replaces every thumbnail.
  top_losses.report_top_losses(_softmax_of_channel_means, _examples(logits[:1], labels[:1]), CLASSES, 2,
                                str(tmp_path))
  listed = json.loads((tmp_path / top_losses.TOP_LOSSES_FILE).read_text(encoding="utf-8"))
  assert [entry["source"] for entry in listed["top"]] == ["record 10"]
  assert len(os.listdir(tmp_path / top_losses.THUMBNAIL_DIR)) == 1


def test_the_top_losses_grid_goes_to_the_images_of_tensorboard(tmp_path):
  from tensorboard.backend.event_processing import event_accumulator
  log = summaries.TensorBoardLog(str(tmp_path / "tensorboard"), CLASSES)
  top_losses.report_top_losses(_softmax_of_channel_means, _examples(np.array([[0.0, 5.0, 0.0]]), [0]), CLASSES,
                                2, str(tmp_path / "report"), log, step=7)
  log.close()
  # The run's own folder, with its other images (under images/, which TensorBoard opens after loss and accuracy).
  events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"),
                                              size_guidance={event_accumulator.TENSORS: 0})
  events.Reload()
  assert events.SummaryMetadata("images/top_losses").plugin_data.plugin_name == "images"
  assert [event.step for event in events.Tensors("images/top_losses")] == [7]


# The page -----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> pathlib.Path:
  """A run's files as a finished run leaves them, without training: config, history, metrics, the report's figures
  and a confusion matrix, top losses of a stand-in model, a tuning decision and an export folder."""
  root = tmp_path_factory.mktemp("report page") / "run #1"
  run_dir = RunDir(str(root))
  history = [{"epoch": 1, "phase": "frozen", "loss": 1.0, "accuracy": 0.5, "val_loss": 0.9, "val_accuracy": 0.6,
              "seconds": 50.0, "train_seconds": 40.0, "images_per_sec": 10.0, "learning_rate": 1e-3},
             {"epoch": 2, "phase": "finetune", "loss": 0.6, "accuracy": 0.8, "val_loss": 0.7, "val_accuracy": 0.75,
              "seconds": 80.0, "train_seconds": 70.0, "images_per_sec": 9.0, "learning_rate": 1e-4}]
  confusion = np.array([[5, 1, 0], [1, 3, 0], [0, 1, 1]])
  run_dir.save_history(history)
  export = root / "export" / "classifier" / "1"
  export.mkdir(parents=True)
  run_dir.save_metrics({**report_files.summarize(history, CLASSES, str(export), ["frozen", "finetune"]),
                        "skipped_files": [{"path": "/data/broken.jpg", "reason": "truncated"}]})
  (root / "config.json").write_text(json.dumps({
      "data": {"batch_size": 8, "seed": 42, "image_size": 32}, "model": {"backbone": "mobilenet", "alpha": 0.25,
                                                                         "head_units": 64, "dropout": 0.2},
      "train": {"frozen_epochs": 1, "finetune_epochs": 1, "frozen_lr": 1e-3},
      "run": {"classes": CLASSES, "train_examples": 40, "val_examples": 12, "num_replicas": 1}}), encoding="utf-8")
  (root / "tuning").mkdir()
  (root / "tuning" / "best_hparams.json").write_text(json.dumps({
      "hparams": {"head_units": 64, "frozen_lr": 0.003, "dropout": 0.2}, "decision": "tuned", "chosen_trial": 3,
      "reason": "best trial 3 fold mean 0.9000 vs the defaults' 0.8000: +0.1000, more than one standard error",
      "tuner": "random", "trials": 4, "folds": 5,
      "candidates": [{"trial": 0, "default": True, "hparams": {"head_units": 128, "frozen_lr": 0.001,
                                                               "dropout": 0.2}}]}), encoding="utf-8")
  report_files.write_reports(run_dir.report, history, confusion, CLASSES)
  logits = np.array([[0.0, 5.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 5.0], [3.0, 3.5, 0.0], [0.0, 0.0, 5.0]])
  top_losses.report_top_losses(_softmax_of_channel_means,
                                _examples(logits, [0, 0, 1, 1, 2], [f"/data/{name}.jpg" for name in "abcde"],
                                          all_examples=10),
                                CLASSES, 2, run_dir.report, workers=2)
  report_page.write_page(str(root))
  return root


class _Parsed(html.parser.HTMLParser):
  """The page's text, its <img> sources and links, and any tag left open or closed without opening."""
  VOID = {"meta", "img", "br", "hr", "link", "input"}

  def __init__(self, text: str):
    super().__init__(convert_charrefs=True)
    self.open, self.errors, self.images, self.links, self.chunks = [], [], [], [], []
    self.feed(text)
    self.close()
    self.errors += [f"unclosed <{tag}>" for tag in self.open]

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if tag == "img":
      self.images.append(attrs["src"])
    if tag == "a":
      self.links.append(attrs["href"])
    if tag not in self.VOID:
      self.open.append(tag)

  def handle_endtag(self, tag):
    if not self.open or self.open[-1] != tag:
      self.errors.append(f"</{tag}> closes {self.open[-1:] or 'nothing'}")
    else:
      self.open.pop()

  def handle_data(self, text):
    self.chunks.append(text)

  @property
  def text(self) -> str:
    return " ".join(" ".join(self.chunks).split())


@pytest.fixture(scope="module")
def page(workdir) -> _Parsed:
  return _Parsed((workdir / "report" / report_page.PAGE_FILE).read_text(encoding="utf-8"))


def test_the_page_is_well_formed_and_every_image_it_shows_is_on_disk(workdir, page):
  assert page.errors == []
  assert len(page.images) == 2 + 5  # curves, confusion matrix, a tile per top loss
  for source in page.images + page.links:
    assert not urllib.parse.urlparse(source).scheme, f"{source} is not a relative link"
    assert (workdir / "report" / urllib.parse.unquote(source)).exists(), source


def test_the_page_states_the_outcome_in_a_sentence(page):
  assert ("Validation accuracy 75.0% (loss 0.700) on 3 classes and 12 validation images, after 2 epochs "
          "(1 frozen, 1 fine-tune) in 2 min 10 s. 1 file could not be used") in page.text


def test_the_page_escapes_class_names_and_lists_them_per_class(workdir, page):
  raw = (workdir / "report" / report_page.PAGE_FILE).read_text(encoding="utf-8")
  assert "<b>ant</b>" not in raw and "&lt;b&gt;ant&lt;/b&gt; &amp; co" in raw
  # id, name, precision, recall, F1 and support of each class, from the confusion counts of the fixture.
  assert '0 蜜蜂 0.833 0.833 0.833 6' in page.text
  assert '1 <b>ant</b> & co 0.600 0.750 0.667 4' in page.text
  assert '2 say "hi" #1 1.000 0.500 0.667 2' in page.text


def test_the_page_shows_the_top_losses_with_their_labels_largest_first(page):
  text = page.text
  first = 'true: 蜜蜂 predicted: <b>ant</b> & co 0.99'
  assert first in text and text.index(first) < text.index("/data/a.jpg") < text.index("/data/c.jpg")
  assert "misclassifies 2 of this worker's share of the validation images: 5 of 10" in text
  assert all(f"/data/{name}.jpg" in text for name in "abcde")


def test_the_page_states_the_tuning_decision_the_settings_and_where_the_export_and_tensorboard_are(workdir, page):
  text = page.text
  assert "replaced the defaults by trial 3's values" in text and "+0.1000" in text
  assert "--frozen_lr 0.001 0.003" in text  # The defaults' value, then the one trained with.
  assert "--backbone mobilenet" in text and "--alpha 0.25" in text
  assert "../export/classifier/1/" in page.links
  tensorboard = os.path.join(str(workdir), "tensorboard")
  assert f"tensorboard --logdir '{tensorboard}'" in text  # Quoted: the run's folder name holds a space and a '#'.


def test_a_page_without_tuning_or_export_says_so(tmp_path, workdir):
  shutil.copytree(workdir / "report", tmp_path / "run" / "report")
  metrics = RunDir(str(tmp_path / "run"))
  metrics.save_metrics({**json.loads(pathlib.Path(metrics.metrics_file).read_text(encoding="utf-8")),
                        "export_path": None})
  path = report_page.write_page(str(tmp_path / "run"))
  text = _Parsed(pathlib.Path(path).read_text(encoding="utf-8")).text
  assert "No search decided (--tune was off)" in text and "No export yet: python -m export.main" in text


def test_the_outcome_says_when_the_model_is_the_frozen_phases(tmp_path, workdir, page):
  assert "Fine-tuning ended" not in page.text  # The fixture's fine-tune phase ended higher.
  shutil.copytree(workdir / "report", tmp_path / "run" / "report")
  run_dir = RunDir(str(tmp_path / "run"))
  metrics = json.loads(pathlib.Path(run_dir.metrics_file).read_text(encoding="utf-8"))
  run_dir.save_metrics({**metrics, "val_accuracy": 0.8, "phase_choice": {
      "frozen_val_accuracy": 0.8, "finetune_val_accuracy": 0.75, "kept": "frozen"}})
  text = _Parsed(pathlib.Path(report_page.write_page(str(tmp_path / "run"))).read_text(encoding="utf-8")).text
  assert "Validation accuracy 80.0%" in text
  assert "Fine-tuning ended at 75.0%, below the frozen phase's 80.0%: the model is the frozen phase's" in text


def test_the_curves_caption_names_the_fine_tune_line_only_where_the_run_had_one(tmp_path, workdir, page):
  assert "the dashed line is where fine-tuning starts" in page.text  # Frozen, then fine-tune.
  shutil.copytree(workdir / "report", tmp_path / "run" / "report")
  run_dir = RunDir(str(tmp_path / "run"))
  run_dir.save_history([{**record, "phase": "scratch"} for record in run_dir.load_history()])
  text = _Parsed(pathlib.Path(report_page.write_page(str(tmp_path / "run"))).read_text(encoding="utf-8")).text
  assert "training against validation." in text and "dashed line" not in text


def test_the_page_loads_in_a_browser_with_every_image_and_fits_1280_pixels(workdir):
  """Chromium (headless) opens a copy of the page with a script that writes, after load, every image's natural
  width, the page's width and any script error into the DOM it dumps."""
  if not os.path.exists(CHROMIUM):
    _missing(f"{CHROMIUM} not installed (apt-get install -y chromium): the page is not checked in a browser")
  page = (workdir / "report" / report_page.PAGE_FILE).read_text(encoding="utf-8")
  probe = ("<script>window.addEventListener('error', e => document.title = 'ERROR ' + e.message);"
           "window.addEventListener('load', () => { const out = document.createElement('pre'); out.id = 'probe';"
           "out.textContent = JSON.stringify({images: [...document.images].map(i => [i.getAttribute('src'), "
           "i.naturalWidth]), width: document.documentElement.scrollWidth}); document.body.append(out); });"
           "</script></body>")
  checked = workdir / "report" / "browser_check.html"
  checked.write_text(page.replace("</body>", probe), encoding="utf-8")
  try:
    with tempfile.TemporaryDirectory() as profile:
      dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                            "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}",
                            "--window-size=1280,900", "--virtual-time-budget=5000", "--dump-dom",
                            checked.as_uri()], capture_output=True, text=True, timeout=60, check=True).stdout
  finally:
    checked.unlink()
  assert "ERROR" not in dom.split("</title>")[0]
  probe_text = dom.split('<pre id="probe">')[1].split("</pre>")[0]
  result = json.loads(html.unescape(probe_text))
  assert len(result["images"]) == 7
  assert all(width > 0 for _, width in result["images"]), result["images"]
  assert result["width"] <= 1280


# A real run -----------------------------------------------------------------------------------------------------------


def test_a_run_writes_its_page_and_a_finished_run_rerun_writes_it_again_when_missing(trained_workdir):
  page = pathlib.Path(report_page.page_file(str(trained_workdir)))
  parsed = _Parsed(page.read_text(encoding="utf-8"))
  assert parsed.errors == [] and "../export/classifier/1/" in parsed.links
  listed = json.loads((page.parent / top_losses.TOP_LOSSES_FILE).read_text(encoding="utf-8"))
  assert listed["examples"] == listed["all_examples"] > 0 and len(listed["top"]) == min(listed["examples"],
                                                                                         top_losses.TOP_LOSSES)
  page.unlink()
  config = RunDir(str(trained_workdir)).load_config()
  train.train_and_evaluate(config, str(trained_workdir), exporter=end_of_run.SavedModelExport())
  assert page.is_file() and _Parsed(page.read_text(encoding="utf-8")).images == parsed.images
