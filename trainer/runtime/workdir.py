"""The layout of a run's workdir (see WORKSPACE.md) and the files a run keeps there."""

import contextlib
import errno
import fcntl
import json
import os
import uuid

from absl import logging

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
    self.manifest_file = os.path.join(root, "data_manifest.tsv")

  def load_config(self) -> Config:
    if not os.path.isfile(self.config_file):
      raise UserInputError(f"--workdir={self.root} holds no config.json: it is not the workdir of a run.")
    return Config.from_dict(read_json(self.config_file))

  def has_checkpoints(self) -> bool:
    """Whether a checkpoint was written here (one set aside as corrupt does not count)."""
    return os.path.isdir(self.checkpoints) and any(name.endswith(".index") for name in os.listdir(self.checkpoints))

  def check_config(self, config: Config) -> None:
    """Refuses a workdir whose checkpoints belong to a different configuration."""
    if os.path.isfile(self.config_file) and self.has_checkpoints():
      previous = self.load_config()
      if previous.identity_hash() != config.identity_hash():
        changed = _differences(previous.to_dict(), config.to_dict())
        raise UserInputError(
            f"--workdir={self.root} holds checkpoints of a different run ({'; '.join(changed)}). Use a new "
            "--workdir, or rerun with the same settings to continue that run.")

  # Run identity: what a workdir's checkpoints depend on besides the settings (check_config). -------------------

  def check_run_facts(self, classes: tuple[str, ...], policy: str) -> None:
    """Refuses to continue checkpoints trained on another class list or in another precision: the label indices
    (or the optimizer's loss-scale slots) would no longer mean what they meant."""
    if not self.has_checkpoints():
      return
    previous = self.load_run_facts()
    old_classes = previous.get("classes")
    if old_classes is not None and list(old_classes) != list(classes):
      raise UserInputError(f"--workdir={self.root} holds checkpoints trained on the classes {old_classes}, and "
                           f"the data now has {list(classes)}. Restore the class folders, or use a new --workdir "
                           "to train on the new classes.")
    old_policy = previous.get("dtype_policy")
    if old_policy and old_policy != policy:
      flag = {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}.get(old_policy, "float32")
      raise UserInputError(f"--workdir={self.root} was trained in precision {old_policy}, and this machine "
                           f"resolves --mixed_precision to {policy}: pass --mixed_precision={flag} to continue it, "
                           "or use a new --workdir.")

  def check_data(self, own_dir: "RunDir", manifest: dict[str, str], data_identity: str,
                 accept: bool) -> list[dict]:
    """Refuses to continue checkpoints trained on other files (added, removed, or the same names with other
    pixels, classes or splits) unless --accept_changed_data (`accept`), which records the change. Saves this
    process's manifest in `own_dir` (its write folder). Returns the run's record of accepted changes
    (config.json's run.data_changes)."""
    facts = self.load_run_facts()
    accepted = list(facts.get("data_changes") or [])
    old_manifest = own_dir.load_manifest()
    if self.has_checkpoints():
      if old_manifest is not None and manifest:
        changes = data_changes(old_manifest, manifest)
        changed = any(changes.values())
        what = ", ".join(f"{count} {kind}" for kind, count in changes.items() if count)
      else:  # A source without files (TFRecord, TFDS), or a run from before manifests: the digest alone.
        changed = bool(facts.get("data_identity")) and facts["data_identity"] != data_identity
        changes, what = {}, "its digest differs"
      if changed and not accept:
        raise UserInputError(f"--workdir={self.root} holds checkpoints trained on other data files: {what} since "
                             "then. Use a new --workdir to train on the files as they are, restore the files, or "
                             "pass --accept_changed_data to continue on the new files (recorded in config.json).")
      if changed:
        logging.warning("The data changed since the last checkpoint (%s): continuing on the new files, as "
                        "--accept_changed_data asks (recorded in config.json).", what)
        accepted.append({"changes": changes or what, "previous_data_identity": facts.get("data_identity")})
    if manifest and old_manifest != manifest:
      own_dir.save_manifest(manifest)
    return accepted

  def check_phase_change(self, config: Config, started_epochs: int) -> None:
    """--frozen_epochs may grow or shrink only while no epoch it would move to another phase has started."""
    if not started_epochs or not os.path.isfile(self.config_file):
      return
    old = self.load_config().train.frozen_epochs
    new = config.train.frozen_epochs
    if old != new and started_epochs > min(old, new):
      raise UserInputError(f"--frozen_epochs={new}: this run has started epoch {started_epochs} with "
                           f"--frozen_epochs={old}, so the phase of an epoch already trained would change. Keep "
                           f"--frozen_epochs={old} (change --finetune_epochs freely), or use a new --workdir.")

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

  def save_manifest(self, manifest: dict[str, str]) -> None:
    """The files this process trains on (name -> split, class, content hash), one line each, sorted."""
    write_text(self.manifest_file, "".join(f"{name}\t{entry}\n" for name, entry in sorted(manifest.items())))

  def load_manifest(self) -> dict[str, str] | None:
    """The manifest a run saved here, None when there is none (an older run, or a source without files)."""
    if not os.path.isfile(self.manifest_file):
      return None
    with open(self.manifest_file, encoding="utf-8") as f:
      return dict(line.rstrip("\n").split("\t", 1) for line in f if "\t" in line)


def data_changes(old: dict[str, str], new: dict[str, str]) -> dict[str, int]:
  """How two manifests differ: files added, removed, changed (other content or class), and moved between the
  splits (a --validation_split carve deals files anew when others are added or removed)."""
  both = old.keys() & new.keys()
  changed = {name for name in both if old[name].split("\t", 1)[1] != new[name].split("\t", 1)[1]}
  return {"added": len(new.keys() - old.keys()), "removed": len(old.keys() - new.keys()), "changed": len(changed),
          "moved between train and val": sum(1 for name in both - changed if old[name] != new[name])}


def _differences(old: dict, new: dict) -> list[str]:
  return [f"--{name}: {old[section].get(name)} -> {value}"
          for section, values in new.items() if isinstance(values, dict)
          for name, value in values.items() if old.get(section, {}).get(name) != value]


LOCK_FILE = ".lock"


@contextlib.contextmanager
def lock(root: str):
  """Holds the workdir for one run: a second run on it is refused in one line naming the PID that holds it.

  Creates the folder first; a --workdir that is a file, lies under a file or cannot be written ends in one line.
  The lock is an flock, so it is released on any exit, SIGKILL included: a dead run's lock file is no lock.
  """
  _create(root)
  path = os.path.join(root, _lock_name())
  try:
    holder = open(path, "a+", encoding="utf-8")  # "a+": opening must not erase the holder's PID.
  except OSError as e:
    raise UserInputError(f"--workdir={root} cannot be written ({e.strerror}): pass a folder you can write to.") \
        from None
  with holder:
    try:
      fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder.seek(0)
      pid = holder.read().strip() or "unknown"
      raise UserInputError(f"--workdir={root} is in use by another run (PID {pid}): wait for it to end, or pass "
                           "another --workdir.") from None
    try:
      holder.truncate(0)
      holder.write(f"{os.getpid()}\n")
      holder.flush()
    except OSError as e:
      if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        raise
      raise UserInputError(f"The disk holding --workdir={root} is full: not even its lock file could be written. "
                           "Free space there (a run needs room for its checkpoints) and run the same command "
                           "again.") from None
    yield


def _create(root: str) -> None:
  if os.path.exists(root) and not os.path.isdir(root):
    raise UserInputError(f"--workdir={root} is a file: pass a folder (it is created if missing).")
  ancestor = os.path.dirname(os.path.abspath(root))
  while not os.path.exists(ancestor):
    ancestor = os.path.dirname(ancestor)
  if not os.path.isdir(ancestor):
    raise UserInputError(f"--workdir={root} lies under the file {ancestor}: pass a folder path.")
  try:
    os.makedirs(root, exist_ok=True)
  except OSError as e:
    raise UserInputError(f"--workdir={root} cannot be created ({e.strerror}): pass a folder you can write to.") \
        from None


def _lock_name() -> str:
  """LOCK_FILE for the process that writes the run's files; another worker of a TF_CONFIG cluster shares the
  workdir but writes to a folder of its own (see distribute.write_dir), so it holds a lock of its own task."""
  try:
    tf_config = json.loads(os.environ.get("TF_CONFIG") or "{}")
  except ValueError:
    return LOCK_FILE  # The strategy refuses a bad TF_CONFIG later, with TensorFlow's message.
  task = tf_config.get("task", {})
  kind, index = task.get("type"), int(task.get("index", 0))
  chief = kind in (None, "chief") or (kind == "worker" and index == 0 and "chief" not in tf_config.get("cluster", {}))
  return LOCK_FILE if chief else f"{LOCK_FILE}-{kind}-{index}"


def process_runs(pid: int) -> bool:
  """Whether process `pid` of this host still runs: the files a killed one left (a partial cache) may be removed."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # Another user's process.
  return True


def read_json(path: str):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def write_json(path: str, value) -> None:
  """Atomic: a run killed while writing leaves the previous file intact (see `write_text`)."""
  write_text(path, json.dumps(value, indent=2, ensure_ascii=False))


def write_text(path: str, text: str) -> None:
  """Atomic: a run killed while writing leaves the previous file intact (see `write_bytes`)."""
  write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str, content: bytes) -> None:
  """Atomic: a run killed while writing leaves the previous file intact. Each writer has its own temporary file
  (a fixed name would let two writers interleave into one); uuid rather than tempfile keeps the umask's mode."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  partial = f"{path}.{uuid.uuid4().hex}.partial"
  try:
    with open(partial, "xb") as f:
      f.write(content)
    os.replace(partial, path)
  except OSError as e:
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
      raise
    raise UserInputError(f"The disk holding {os.path.dirname(path)} is full: {os.path.basename(path)} could not be "
                         "written (the previous one is intact). Free space there and run the same command again.") \
        from None
  finally:
    if os.path.exists(partial):
      os.remove(partial)
