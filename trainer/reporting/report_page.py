"""WORKDIR/report/index.html: one static page per run, read offline in any browser.

The page is drawn only from files the run already wrote (config.json, report/metrics.json, history.json,
confusion_matrix.json, the report PNGs, tuning/best_hparams.json, report/top_losses.json and its thumbnails), so
`write_page` can draw it again for a finished run at any time. Every link is relative and every text escaped
(class names may hold `<&>` or any script).

The top losses it shows are computed at the end of training by trainer.reporting.top_losses (one forward pass over
the validation share, a bounded top-k).
"""

import datetime
import html
import json
import os
import shlex
import urllib.parse
from typing import Sequence

import numpy as np

from trainer.reporting import label_audit, report_files
from trainer.reporting import top_losses as top_losses_lib
from trainer.runtime import workdir as workdir_lib

PAGE_FILE = "index.html"
# Rows of the suspect-label table on the page (the CSV holds them all).
_SUSPECT_ROWS = 12


# The settings the page lists, by flag name (the rest are in config.json, linked beside them).
_SETTINGS = ("backbone", "alpha", "weights", "image_size", "batch_size", "frozen_epochs", "finetune_epochs",
             "frozen_lr", "finetune_lr", "finetune_schedule", "unfreeze_from", "head_units", "dropout", "augment",
             "class_weight", "seed", "strategy", "mixed_precision")

# Backbones whose --alpha (width multiplier) means something.
_ALPHA_BACKBONES = ("mobilenet", "mobilenet_v2")

_PHASE_NAMES = {"frozen": "frozen", "finetune": "fine-tune", "scratch": "from scratch"}


def page_file(workdir: str) -> str:
  return os.path.join(workdir, "report", PAGE_FILE)


def write_page(workdir: str) -> str:
  """(Re)writes WORKDIR/report/index.html from the run's files; returns its path. Missing files leave out their
  section (a run that failed before its export has no export link yet)."""
  report_dir = os.path.join(workdir, "report")
  config = _json_or_empty(os.path.join(workdir, "config.json"))
  metrics = _json_or_empty(os.path.join(report_dir, "metrics.json"))
  history = _json_or_empty(os.path.join(report_dir, "history.json")) or []
  confusion = _json_or_empty(os.path.join(report_dir, report_files.CONFUSION_FILE))
  top_losses = _json_or_empty(os.path.join(report_dir, top_losses_lib.TOP_LOSSES_FILE))
  tuning = _json_or_empty(os.path.join(workdir, "tuning", "best_hparams.json"))
  name = os.path.basename(os.path.normpath(os.path.abspath(workdir)))
  sections = [_outcome(metrics, history, config),
              _figures(report_dir, history),
              _per_class(confusion),
              _top_losses(top_losses),
              _suspects(report_dir),
              _tuning(tuning, config),
              _settings(config),
              _files(workdir, report_dir, metrics)]
  page = _PAGE.format(title=_text(f"{name}: training report"), heading=_text(name), body="\n".join(sections),
                      written=_text(datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")))
  path = os.path.join(report_dir, PAGE_FILE)
  workdir_lib.write_text(path, page)  # Atomic: a reader never sees half a page.
  return path


def _outcome(metrics: dict, history: list, config: dict) -> str:
  """The run in a sentence: val accuracy, classes, epochs per phase, time, skipped files."""
  if not metrics:
    return "<p class=outcome>The run has not finished: report/metrics.json is not written yet.</p>"
  classes = metrics.get("classes", [])
  accuracy = metrics.get("val_accuracy")
  lead = (f"Validation accuracy <strong>{100 * accuracy:.1f}%</strong>" if accuracy is not None
          else "No validation accuracy")
  rest = f" (loss {metrics['val_loss']:.3f})" if metrics.get("val_loss") is not None else ""
  rest += f" on {len(classes)} classes"
  val_examples = config.get("run", {}).get("val_examples")
  if val_examples is not None:
    rest += f" and {val_examples} validation images"
  rest += f", after {metrics.get('epochs', len(history))} epochs"
  phases = [f"{values['epochs']} {_PHASE_NAMES.get(phase, phase)}"
            for phase, values in metrics.get("phases", {}).items() if values.get("epochs")]
  if phases:
    rest += f" ({', '.join(phases)})"
  rest += f" in {_duration(sum(record.get('seconds', 0.0) for record in history))}."
  choice = metrics.get("phase_choice") or {}
  if choice.get("kept") == "frozen":
    rest += (f" Fine-tuning ended at {100 * choice['finetune_val_accuracy']:.1f}%, below the frozen phase's "
             f"{100 * choice['frozen_val_accuracy']:.1f}%: the model is the frozen phase's (--keep_better_phase).")
  skipped = len(metrics.get("skipped_files") or [])
  if skipped:
    rest += f" {skipped} file{'s' if skipped != 1 else ''} could not be used (listed in report/metrics.json)."
  model = config.get("model", {})
  facts = " · ".join(str(part) for part in (model.get("backbone"), ", ".join(classes)) if part)
  return f"<p class=outcome>{lead}{_text(rest)}</p>\n<p class=facts>{_text(facts)}</p>"


def _figures(report_dir: str, history: list) -> str:
  # The curves mark the start of fine-tuning only in a run that had both phases (report_files.curves_figure).
  phases = {record.get("phase") for record in history}
  marked = "; the dashed line is where fine-tuning starts" if {"frozen", "finetune"} <= phases else ""
  figures = [(file, caption) for file, caption in (
      ("curves.png", f"Accuracy and loss per epoch, training against validation{marked}."),
      ("confusion_matrix.png", "The last validation: rows are the true class, each cell its share of the row."))
             if os.path.isfile(os.path.join(report_dir, file))]
  if not figures:
    return ""
  items = "\n".join(f'<figure><img src="{_href(file)}" alt="{_text(file)}"><figcaption>{_text(caption)}'
                    "</figcaption></figure>" for file, caption in figures)
  return f"<section><h2>Curves and confusion matrix</h2>\n<div class=figures>\n{items}\n</div></section>"


def _per_class(confusion: dict) -> str:
  if not confusion:
    return ""
  classes, counts = confusion["classes"], np.asarray(confusion["counts"])
  values = report_files.per_class_metrics(counts)
  rows = "\n".join(
      f"<tr><td class=num>{index}</td><td>{_text(name)}</td><td class=num>{values['precision'][index]:.3f}</td>"
      f"<td class=num>{values['recall'][index]:.3f}</td><td class=num>{values['f1'][index]:.3f}</td>"
      f"<td class=num>{values['support'][index]}</td></tr>" for index, name in enumerate(classes))
  return ("<section><h2>Per class</h2>\n<p>On the last validation (every worker's share). "
          f'Also as text: <a href="{_href("classification_report.txt")}">classification_report.txt</a>.</p>\n'
          "<table class=per-class><thead><tr><th>id</th><th>class</th><th>precision</th><th>recall</th><th>F1</th>"
          f"<th>support</th></tr></thead>\n<tbody>\n{rows}\n</tbody></table></section>")


def _top_losses(top_losses: dict) -> str:
  if not top_losses:
    return ""
  classes, top = top_losses["classes"], top_losses["top"]
  seen, wrong = top_losses["examples"], top_losses["wrong"]
  scope = f"{seen} validation images"
  if top_losses.get("workers", 1) > 1:
    scope = (f"this worker's share of the validation images: {seen} of {top_losses['all_examples']} (in a "
             f"multi-worker run of {top_losses['workers']} workers the chief, which writes this page, sees only "
             "its own share)")
  summary = f"The final model misclassifies {wrong} of {scope}."
  if top:
    summary += (f" The {len(top)} with the largest loss, misclassified ones first (as fastai's plot_top_losses): "
                "true class, then the predicted class and its probability.")
  tiles = "\n".join(_tile(entry, classes) for entry in top)
  grid = f"<div class=grid>\n{tiles}\n</div>" if top else ""
  return f"<section><h2>Top losses</h2>\n<p>{_text(summary)}</p>\n{grid}</section>"


def _suspects(report_dir: str) -> str:
  """The label audit (trainer.reporting.label_audit): the worst suspect labels, their grid, and the near-duplicates'
  count."""
  audit = _json_or_empty(os.path.join(report_dir, label_audit.STATE_FILE))
  if not audit:
    return ""
  rows = label_audit.suspect_rows(report_dir, limit=_SUSPECT_ROWS)
  summary = (f"{audit.get('suspects', 0)} training image(s) have a label that the out-of-fold predictions doubt "
             f"(confident learning); nothing was relabelled. {audit.get('near_duplicates', 0)} near-duplicate "
             "pair(s) of images.")
  grid = (f'<p><img class=wide src="{_href(label_audit.SUSPECTS_PNG)}" alt="the most suspect labels"></p>'
          if os.path.isfile(os.path.join(report_dir, label_audit.SUSPECTS_PNG)) else "")
  table = "".join(f"<tr><td>{_text(row.path)}</td><td>{_text(row.given_label)}</td>"
                  f"<td>{_text(row.suggested_label)}</td><td>{row.score:.3f}</td></tr>" for row in rows)
  table = (f"<table><tr><th>file</th><th>given</th><th>suggested</th><th>p(given)</th></tr>{table}</table>"
           if rows else "")
  links = (f'<p>All of them: <a href="{_href(label_audit.SUSPECTS_CSV)}">{label_audit.SUSPECTS_CSV}</a>, '
           f'<a href="{_href(label_audit.DUPLICATES_CSV)}">{label_audit.DUPLICATES_CSV}</a>.</p>')
  return f"<section><h2>Suspect labels</h2>\n<p>{_text(summary)}</p>\n{grid}\n{table}\n{links}</section>"


def _tile(entry: dict, classes: Sequence[str]) -> str:
  true, predicted = classes[entry["label"]], classes[entry["predicted"]]
  verdict = "wrong" if entry["wrong"] else "right"
  source = _text(entry["source"])
  return (f'<figure class="tile {verdict}"><img src="{_href(entry["thumbnail"])}" alt="{source}">'
          f"<figcaption><span class=true>true: {_text(true)}</span><span class=predicted>predicted: "
          f'{_text(predicted)} {entry["probability"]:.2f}</span><span class=loss>loss {entry["loss"]:.2f}, p(true) '
          f'{entry["true_probability"]:.2f}</span><span class=source title="{source}">{source}</span></figcaption>'
          "</figure>")


def _tuning(tuning: dict, config: dict) -> str:
  if not tuning:
    why = ("the search has not written tuning/best_hparams.json" if config.get("tune", {}).get("tune")
           else "--tune was off")
    return (f"<section><h2>Tuning</h2>\n<p>No search decided ({_text(why)}): the run trained with its flags' "
            "values.</p></section>")
  candidates = tuning.get("candidates") or []
  defaults = next((c["hparams"] for c in candidates if c.get("default")), {})
  chosen = tuning.get("hparams", {})
  kept = tuning.get("decision") == "defaults"
  search = (f"{tuning.get('tuner', '')} search, {tuning.get('trials', len(candidates) - 1)} trials, each scored by "
            f"{tuning.get('folds', '?')}-fold cross-validation inside the training split")
  outcome = "kept the defaults" if kept else f"replaced the defaults by trial {tuning.get('chosen_trial')}'s values"
  rows = "\n".join(f"<tr><td>--{_text(name)}</td><td class=num>{_text(_value(defaults.get(name)))}</td>"
                   f"<td class=num>{_text(_value(value))}</td></tr>" for name, value in chosen.items())
  return (f"<section><h2>Tuning</h2>\n<p>{_text(f'A {search}: {outcome}.')}</p>\n<p>{_text(tuning.get('reason', ''))}"
          f"</p>\n<table><thead><tr><th>setting</th><th>defaults</th><th>trained with</th></tr></thead>\n<tbody>\n"
          f'{rows}\n</tbody></table>\n<p>Every candidate: <a href="{_href("../tuning/best_hparams.json")}">'
          "tuning/best_hparams.json</a>.</p></section>")


def _settings(config: dict) -> str:
  if not config:
    return ""
  values = {name: value for section, fields in config.items() if section != "run" and isinstance(fields, dict)
            for name, value in fields.items()}
  if values.get("backbone") not in _ALPHA_BACKBONES:
    values.pop("alpha", None)
  rows = [(f"--{name}", _value(values[name])) for name in _SETTINGS if name in values]
  facts = config.get("run", {})
  if "train_examples" in facts:
    rows.append(("train / validation images", f"{facts['train_examples']} / {facts['val_examples']}"))
  if "num_replicas" in facts:
    rows.append(("replicas, workers", f"{facts['num_replicas']}, {facts.get('workers', 1)}"))
  if "dtype_policy" in facts:
    rows.append(("precision", facts["dtype_policy"]))
  if "frozen_lr" in facts:  # Scaled by --lr_base_batch_size.
    rows.append(("learning rates applied", f"frozen {_value(facts['frozen_lr'])}, fine-tune "
                                           f"{_value(facts['finetune_lr'])}"))
  body = "\n".join(f"<tr><td>{_text(name)}</td><td>{_text(value)}</td></tr>" for name, value in rows)
  return (f'<section><h2>Settings</h2>\n<p>The ones that matter most; every setting is in <a href="'
          f'{_href("../config.json")}">config.json</a>.</p>\n<table class=settings><tbody>\n{body}\n</tbody></table>'
          "</section>")


def _files(workdir: str, report_dir: str, metrics: dict) -> str:
  items = []
  export = metrics.get("export_path")
  if export and os.path.isdir(export):
    relative = os.path.relpath(export, report_dir)
    items.append(f'The SavedModel: <a href="{_href(relative + "/")}">{_text(relative)}</a> (TF Serving layout; '
                 "python -m export.predict classifies files with it)")
  else:
    items.append(_text("No export yet: python -m export.main --workdir=" + shlex.quote(os.path.abspath(workdir)) +
                       " writes it from the last checkpoint"))
  command = f"tensorboard --logdir {shlex.quote(os.path.join(os.path.abspath(workdir), 'tensorboard'))}"
  items.append(f"TensorBoard (scalars, HParams, top losses under Images): <code>{_text(command)}</code>")
  links = [(file, file) for file in ("metrics.json", "history.json", "classification_report.txt",
                                     top_losses_lib.TOP_LOSSES_PNG)
           if os.path.isfile(os.path.join(report_dir, file))]
  if links:
    items.append("Report files: " + ", ".join(f'<a href="{_href(href)}">{_text(label)}</a>' for href, label in links))
  return "<section><h2>Files</h2>\n<ul>\n" + "\n".join(f"<li>{item}</li>" for item in items) + "\n</ul></section>"


def _json_or_empty(path: str):
  """The file's JSON, or {} when the run has not written it (or a reader caught it half-written)."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _text(value) -> str:
  return html.escape(str(value), quote=True)


def _href(relative_path: str) -> str:
  """A relative URL of a path (percent-encoded: a class or run name may hold spaces, '#' or '?')."""
  return _text(urllib.parse.quote(relative_path.replace(os.sep, "/")))


def _value(value) -> str:
  if isinstance(value, float):
    return f"{value:g}"
  if value in ("", None):
    return "(default)"
  return str(value)


def _duration(seconds: float) -> str:
  if seconds < 60:
    return f"{seconds:.1f} s"
  minutes, seconds = divmod(round(seconds), 60)
  if minutes < 60:
    return f"{minutes} min {seconds:02d} s"
  hours, minutes = divmod(minutes, 60)
  return f"{hours} h {minutes:02d} min"


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", "Noto Sans", "Noto Sans CJK SC", "WenQuanYi Zen Hei",
       sans-serif; margin: 0 auto; max-width: 1240px; padding: 16px 20px 40px; color: #1d1d1f; line-height: 1.45; }}
h1 {{ font-size: 1.6em; margin: 0.2em 0; }}
h2 {{ font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 1.6em; }}
.outcome {{ font-size: 1.15em; }}
.facts, .written, figcaption {{ color: #555; font-size: 0.9em; }}
.figures {{ display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }}
.figures figure {{ margin: 0; flex: 1 1 420px; max-width: 640px; }}
.figures img {{ max-width: 100%; height: auto; border: 1px solid #eee; }}
table {{ border-collapse: collapse; margin: 8px 0; }}
th, td {{ border-bottom: 1px solid #e5e5e5; padding: 3px 12px 3px 6px; text-align: left; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(180px, 1fr)); gap: 12px; }}
.tile {{ margin: 0; padding: 6px; border: 1px solid #ddd; border-radius: 4px; }}
.tile.wrong {{ border-color: #e0a0a8; background: #fff6f7; }}
.tile img {{ display: block; width: 100%; height: 160px; object-fit: contain; background: #f4f4f4; }}
.tile figcaption span {{ display: block; overflow-wrap: anywhere; }}
.tile .true {{ color: #1d1d1f; font-weight: 600; }}
.tile.wrong .predicted {{ color: #b00020; }}
.tile .source {{ font-size: 0.8em; color: #777; }}
img.wide {{ max-width: 100%; height: auto; border: 1px solid #eee; }}
code {{ background: #f4f4f4; padding: 2px 5px; border-radius: 3px; overflow-wrap: anywhere; }}
</style>
</head>
<body>
<h1>{heading}</h1>
{body}
<p class=written>Written {written} by trainer.reporting.report_page from the run's files.</p>
</body>
</html>
"""
