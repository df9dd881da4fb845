"""tf.data service on loopback: a dispatcher and workers started here, each element once per epoch through
`distribute`; a missing dispatcher is one error naming it within the wait, not a hang."""

import socket
import subprocess
import sys
import time

import pytest
import tensorflow as tf

from conftest import REPO, write_image
from trainer import data_service, images, tfrecords
from trainer.errors import UserInputError


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_distributed_epoch_yields_every_element_once_per_epoch_across_two_workers():
  dispatcher = data_service.start_dispatcher()
  workers = [data_service.start_worker(dispatcher.target, worker_address="localhost") for _ in range(2)]
  ids = data_service.distribute(tf.data.Dataset.range(60), dispatcher.target, job_name="test")
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
    served = data_service.distribute(local, dispatcher.target, job_name=name)
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
    data_service.distribute(tf.data.Dataset.range(3), address, job_name="none", timeout=1.0)
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
    ids = data_service.distribute(tf.data.Dataset.range(10), f"grpc://localhost:{port}", job_name="cli")
    assert sorted(int(i) for i in ids) == list(range(10))
  finally:
    for process in (worker, dispatcher):
      process.terminate()
      process.wait(timeout=30)
