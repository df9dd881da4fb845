"""The layout of a run's workdir (see WORKSPACE.md) and the files a run keeps there."""

import json
import os

from trainer.config import Config
from trainer.errors import UserInputError


class RunDir:
  """workdir/{config.json, checkpoints/, tensorboard/, export/<model>/<version>/, report/}."""

  def __init__(self, root: str):
    self.root = root
    self.config_file = os.path.join(root, "config.json")
    self.checkpoints = os.path.join(root, "checkpoints")
    self.tensorboard = os.path.join(root, "tensorboard")
    self.export = os.path.join(root, "export")
    self.report = os.path.join(root, "report")
    self.history_file = os.path.join(self.report, "history.json")
    self.metrics_file = os.path.join(self.report, "metrics.json")

  def load_config(self) -> Config:
    if not os.path.isfile(self.config_file):
      raise UserInputError(f"--workdir={self.root} holds no config.json: it is not the workdir of a run.")
    return Config.from_dict(read_json(self.config_file))

  def check_config(self, config: Config) -> None:
    """Refuses a workdir whose checkpoints belong to a different configuration."""
    if os.path.isfile(self.config_file) and os.path.isdir(self.checkpoints) and os.listdir(self.checkpoints):
      previous = self.load_config()
      if previous.identity_hash() != config.identity_hash():
        changed = _differences(previous.to_dict(), config.to_dict())
        raise UserInputError(
            f"--workdir={self.root} holds checkpoints of a different run ({'; '.join(changed)}). Use a new "
            "--workdir, or rerun with the same settings to continue that run.")

  def save_config(self, config: Config, run_facts: dict) -> None:
    """Writes config.json (with the facts of this run under "run") after `check_config`."""
    self.check_config(config)
    os.makedirs(self.root, exist_ok=True)
    write_json(self.config_file, {**config.to_dict(), "run": {**run_facts, "identity": config.identity_hash()}})

  def load_run_facts(self) -> dict:
    """The facts save_config recorded beside the settings (classes, replicas, ...); {} before any run."""
    return read_json(self.config_file).get("run", {}) if os.path.isfile(self.config_file) else {}

  def load_history(self) -> list[dict]:
    return read_json(self.history_file) if os.path.isfile(self.history_file) else []

  def save_history(self, history: list[dict]) -> None:
    write_json(self.history_file, history)

  def save_metrics(self, metrics: dict) -> None:
    write_json(self.metrics_file, metrics)


def _differences(old: dict, new: dict) -> list[str]:
  return [f"--{name}: {old[section].get(name)} -> {value}"
          for section, values in new.items() if isinstance(values, dict)
          for name, value in values.items() if old.get(section, {}).get(name) != value]


def read_json(path: str):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def write_json(path: str, value) -> None:
  """Atomic: a run killed while writing leaves the previous file intact."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  partial = f"{path}.partial"
  with open(partial, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, ensure_ascii=False)
  os.replace(partial, path)
