"""tf.data service on loopback: a dispatcher and workers started here, each element once per epoch through
`distribute`; a missing dispatcher is one error naming it within the wait, not a hang; an epoch a lost service
worker left short is redone after a restart, never saved."""

import os
import socket
import subprocess
import sys
import time

import pytest
import tensorflow as tf
from conftest import REPO, tiny_run, write_color_dataset, write_image

from trainer import exit_codes
from trainer.errors import UserInputError
from trainer.input import images, tfrecords
from trainer.input import service as data_service
from trainer.runtime import distribute
from trainer.runtime.workdir import RunDir


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_distributed_epoch_yields_every_element_once_per_epoch_across_two_workers():
  dispatcher = data_service.start_dispatcher()
  workers = [data_service.start_worker(dispatcher.target, worker_address="localhost") for _ in range(2)]
  ids = data_service.distribute(tf.data.Dataset.range(60), dispatcher.target, job_name="test", elements=60)
  for _ in range(2):  # Each epoch is a new pass of the job.
    assert sorted(int(i) for i in ids) == list(range(60))
  for server in workers + [dispatcher]:
    server.stop()


def test_decoding_on_the_service_gives_the_pixels_of_decoding_here(tmp_path):
  paths = [str(write_image(tmp_path / f"{i}.jpg", (40 * i, 90, 200), size=(30 + 9 * i, 24))) for i in range(5)]
  records = tfrecords.scan(_shard(tmp_path / "shard", paths))
  decoded = {
      "files": tf.data.Dataset.from_tensor_slices(paths).map(lambda path: images.load(tf.io.read_file(path), 16)),
      "tfrecords": tfrecords.dataset(records).map(lambda image, label: images.load(image, 16))}
  dispatcher = data_service.start_dispatcher()
  worker = data_service.start_worker(dispatcher.target, worker_address="localhost")
  for name, local in decoded.items():
    served = data_service.distribute(local, dispatcher.target, job_name=name, elements=len(paths))
    assert sorted(image.tobytes() for image in served.as_numpy_iterator()) == sorted(
        image.tobytes() for image in local.as_numpy_iterator()), name
  worker.stop()
  dispatcher.stop()


def _shard(path, image_paths) -> str:
  with tf.io.TFRecordWriter(str(path)) as writer:
    for index, image_path in enumerate(image_paths):
      with open(image_path, "rb") as f:
        writer.write(tfrecords.example(f.read(), index % 2, "").SerializeToString())
  return str(path)


def test_a_missing_dispatcher_is_one_error_naming_it_within_the_wait():
  address = f"grpc://localhost:{_free_port()}"
  start = time.monotonic()
  with pytest.raises(UserInputError, match=f"--data_service={address}: no tf.data service dispatcher answers"):
    data_service.distribute(tf.data.Dataset.range(3), address, job_name="none", elements=3, timeout=1.0)
  assert time.monotonic() - start < 10


@pytest.mark.parametrize("address", ["localhost", "http://host:5050", "grpc://host:port"])
def test_an_address_without_grpc_host_and_port_is_refused(address):
  with pytest.raises(UserInputError, match="grpc://HOST:PORT"):
    data_service.host_and_port(address)


def test_the_commands_serve_until_stopped_and_a_worker_without_dispatcher_ends_in_one_line():
  port = _free_port()
  command = [sys.executable, "-m", "trainer.data_service"]
  orphan = subprocess.run(command + ["--worker", f"--dispatcher_address=localhost:{port}",
                                     "--dispatcher_timeout=1"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert orphan.returncode == 2
  assert orphan.stderr.strip().splitlines()[-1].startswith(f"error: --dispatcher_address=localhost:{port}: no tf.data")
  dispatcher = subprocess.Popen(command + ["--dispatcher", f"--port={port}"], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
  worker = subprocess.Popen(command + ["--worker", f"--dispatcher_address=localhost:{port}",
                                       "--worker_address=localhost"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
  try:
    assert "serving" in dispatcher.stdout.readline()
    assert "serving" in worker.stdout.readline()
    ids = data_service.distribute(tf.data.Dataset.range(10), f"grpc://localhost:{port}", job_name="cli",
                                   elements=10)
    assert sorted(int(i) for i in ids) == list(range(10))
  finally:
    for process in (worker, dispatcher):
      process.terminate()
      process.wait(timeout=30)


def _os_exit_raises(monkeypatch) -> None:
  """distribute._end leaves with os._exit (after a lost peer no exit handler may run): a SystemExit pytest sees."""
  def exit_(code):
    raise SystemExit(code)
  monkeypatch.setattr(os, "_exit", exit_)


def test_a_service_worker_lost_mid_epoch_ends_the_run_in_one_line_and_138_not_a_short_epoch(monkeypatch, capsys):
  """A lost worker's elements are gone from the epoch (distributed_epoch hands each out at most once): counted,
  the epoch's end is an error the run turns into a restart, never an epoch trained as if it had fewer examples."""
  dispatcher = data_service.start_dispatcher()
  ports = [_free_port(), _free_port()]
  workers = [data_service.start_worker(dispatcher.target, port, "localhost") for port in ports]
  ids = []
  _os_exit_raises(monkeypatch)
  with pytest.raises(SystemExit) as exit_, distribute.exit_on_peer_loss():
    for element in data_service.distribute(tf.data.Dataset.range(40), dispatcher.target, "lost", elements=40):
      ids.append(int(element))
      if len(ids) == 1:
        # Restarted at its address (a crashed container in its pod), as the epoch then ends; a worker that never
        # comes back leaves the trainers waiting for it (README, "tf.data service").
        workers[1]._stop()
        workers[1] = data_service.start_worker(dispatcher.target, ports[1], "localhost")
  for server in workers + [dispatcher]:
    server.stop()
  assert len(ids) == len(set(ids)) < 40  # What the lost worker held is gone from this epoch (3 or 4 measured).
  assert exit_.value.code == exit_codes.PEER_LOST
  assert capsys.readouterr().err.strip() == (
      f"error: a tf.data service epoch ended after {len(ids)} of its 40 examples: a service worker was lost "
      "mid-epoch with the examples it held. Restart to redo the epoch from the last checkpoint (--data_service).")


def test_an_epoch_with_every_service_worker_alive_is_whole():
  dispatcher = data_service.start_dispatcher()
  workers = [data_service.start_worker(dispatcher.target, worker_address="localhost") for _ in range(2)]
  with distribute.exit_on_peer_loss():
    ids = [int(i) for i in data_service.distribute(tf.data.Dataset.range(40), dispatcher.target, "alive",
                                                   elements=40)]
  for server in workers + [dispatcher]:
    server.stop()
  assert sorted(ids) == list(range(40))


def test_a_run_whose_service_epoch_comes_up_short_saves_neither_the_epoch_nor_its_checkpoint(
    random_mobilenet_025_weights, tmp_path, monkeypatch):
  """The whole loop, its input from a stand-in service that loses the share's last example (the element count is
  what the check sees, whatever the step count)."""
  from trainer.loop import train
  config = tiny_run(random_mobilenet_025_weights, data_dir=str(write_color_dataset(tmp_path / "colors", 4)),
                    frozen_epochs=0, finetune_epochs=1, augment="none", data_service="grpc://localhost:1")
  monkeypatch.setattr(data_service, "distribute", lambda dataset, address, job_name, elements, **_: (
      data_service.whole(dataset.take(elements - 1), elements)))
  _os_exit_raises(monkeypatch)
  with pytest.raises(SystemExit) as exit_:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert exit_.value.code == exit_codes.PEER_LOST
  run_dir = RunDir(str(tmp_path / "run"))
  assert not run_dir.has_checkpoints() and run_dir.load_history() == []  # The restart redoes the epoch.


def test_a_dispatcher_restarted_without_its_journal_ends_the_run_in_one_line_and_138(monkeypatch, capsys):
  """It ended in a NotFoundError traceback and exit 1, which schedulers do not retry; a restarted job works."""
  port = _free_port()
  dispatcher = data_service.start_dispatcher(port)
  worker = data_service.start_worker(dispatcher.target, worker_address="localhost")
  _os_exit_raises(monkeypatch)
  with pytest.raises(SystemExit) as exit_, distribute.exit_on_peer_loss():
    for index, _ in enumerate(data_service.distribute(tf.data.Dataset.range(100), dispatcher.target, "journal",
                                                      elements=100)):
      if index == 10:
        dispatcher._stop()
        dispatcher = data_service.start_dispatcher(port)
  for server in (worker, dispatcher):
    server.stop()
  assert exit_.value.code == exit_codes.PEER_LOST
  error = capsys.readouterr().err.strip()
  assert error.startswith("error: the tf.data service dispatcher no longer knows this trainer's job")
  assert "--work_dir" in error
