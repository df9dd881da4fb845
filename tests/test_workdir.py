"""One run at a time on a workdir (a second is refused in one line naming the PID; a killed run leaves no lock),
a --workdir that cannot be one is refused in one line, and JSON writers never share a temporary file."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest
from conftest import REPO

from trainer.command import cli
from trainer.config import Config
from trainer.errors import UserInputError
from trainer.runtime import workdir

_HOLD_LOCK = ("import sys, time; from trainer.runtime import workdir\n"
              "with workdir.lock(sys.argv[1]):\n"
              "  print('locked', flush=True)\n"
              "  time.sleep(600)\n")


@pytest.fixture
def held_workdir(tmp_path):
  """A workdir whose lock another process holds; yields (workdir, that process)."""
  root = tmp_path / "run"
  holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(root)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
  assert holder.stdout.readline().strip() == "locked"
  yield root, holder
  holder.kill()
  holder.wait()


def test_a_second_run_on_a_held_workdir_is_refused_in_one_line_naming_the_pid(held_workdir, capsys):
  root, holder = held_workdir

  with pytest.raises(SystemExit) as exited:
    cli.run(Config(), str(root), list_layers=False)

  assert exited.value.code == 2
  message = capsys.readouterr().err.strip()
  assert "\n" not in message and f"--workdir={root}" in message and f"PID {holder.pid}" in message


def test_the_lock_of_a_killed_run_is_no_lock(held_workdir):
  root, holder = held_workdir
  holder.send_signal(signal.SIGKILL)
  holder.wait()

  with workdir.lock(str(root)):
    assert (root / workdir.LOCK_FILE).read_text().strip() == str(os.getpid())


def test_the_lock_is_released_when_the_run_fails(tmp_path):
  with pytest.raises(RuntimeError), workdir.lock(str(tmp_path)):
    raise RuntimeError("the run failed")

  with workdir.lock(str(tmp_path)):
    pass


def test_a_full_disk_at_the_lock_is_one_line(tmp_path, monkeypatch):
  """The lock's PID write was the first of seven places where a full disk ended in a traceback."""
  import errno
  import io

  class FullDisk(io.TextIOWrapper):
    def write(self, text):
      raise OSError(errno.ENOSPC, "No space left on device")

  def open_on_a_full_disk(path, mode, encoding):
    return FullDisk(io.FileIO(path, "a+"), encoding=encoding)
  monkeypatch.setattr(workdir, "open", open_on_a_full_disk, raising=False)
  with pytest.raises(UserInputError, match=f"disk holding --workdir={tmp_path} is full"):
    with workdir.lock(str(tmp_path)):
      pass


def test_workers_of_one_cluster_share_the_workdir_but_not_a_lock(tmp_path, monkeypatch):
  cluster = {"worker": ["localhost:1", "localhost:2"]}
  with workdir.lock(str(tmp_path)):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 1}}))
    with workdir.lock(str(tmp_path)):
      pass
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 0}}))
    with pytest.raises(UserInputError, match="in use by another run"):
      with workdir.lock(str(tmp_path)):
        pass


def _tmpfs(folder, options: str):
  """Mounts a tmpfs on `folder` (root only: a user's chmod cannot make root's writes fail); yields, unmounts."""
  if os.geteuid() != 0 or shutil.which("mount") is None:
    pytest.skip("mounting a tmpfs needs root")
  if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True).returncode:
    pytest.skip("cannot mount a tmpfs here")
  yield folder
  subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture
def unwritable_folder(tmp_path):
  """A folder this process cannot write: read-only for a user, a read-only tmpfs for root (root writes anyway)."""
  folder = tmp_path / "read_only"
  folder.mkdir()
  if os.geteuid() != 0:
    folder.chmod(0o500)
    yield folder
    folder.chmod(0o700)
    return
  yield from _tmpfs(folder, "ro,size=64k")


@pytest.fixture
def full_disk(tmp_path):
  folder = tmp_path / "disk"
  folder.mkdir()
  yield from _tmpfs(folder, "size=64k")


@pytest.mark.parametrize("case", ["a file", "under a file", "unwritable", "unwritable, existing"])
def test_a_workdir_that_cannot_be_one_is_refused_in_one_line(case, tmp_path, request):
  (tmp_path / "notes.txt").write_text("not a folder")
  root = {"a file": lambda: tmp_path / "notes.txt", "under a file": lambda: tmp_path / "notes.txt" / "run",
          "unwritable": lambda: request.getfixturevalue("unwritable_folder") / "run",
          "unwritable, existing": lambda: request.getfixturevalue("unwritable_folder")}[case]()

  with pytest.raises(UserInputError) as raised:
    with workdir.lock(str(root)):
      pass

  message = str(raised.value)
  assert "\n" not in message and message.startswith(f"--workdir={root} ")


def test_concurrent_json_writers_never_collide(tmp_path):
  path = str(tmp_path / "report" / "history.json")
  values = [[{"epoch": i, "writer": writer, "padding": "x" * 20_000} for i in range(5)] for writer in range(4)]
  errors = []

  def write_many(value):
    try:
      for _ in range(50):
        workdir.write_json(path, value)
    except OSError as e:  # One fixed temporary name: a writer's file is renamed away by another.
      errors.append(e)

  threads = [threading.Thread(target=write_many, args=(value,)) for value in values]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()

  assert not errors
  assert workdir.read_json(path) in values
  assert os.listdir(os.path.dirname(path)) == ["history.json"]


def test_a_json_write_on_a_full_disk_ends_in_one_line_and_keeps_the_previous_file(full_disk):
  path = str(full_disk / "report" / "history.json")
  workdir.write_json(path, [{"epoch": 1}])
  filler = os.open(full_disk / "filler", os.O_WRONLY | os.O_CREAT)
  with pytest.raises(OSError, match="No space left"):
    while True:
      os.write(filler, b"\0" * 4096)
  os.close(filler)

  with pytest.raises(UserInputError) as raised:
    workdir.write_json(path, [{"epoch": 1}, {"epoch": 2, "padding": "x" * 100_000}])

  message = str(raised.value)
  assert "\n" not in message and str(full_disk / "report") in message and "full" in message
  assert workdir.read_json(path) == [{"epoch": 1}]
  assert os.listdir(full_disk / "report") == ["history.json"]
