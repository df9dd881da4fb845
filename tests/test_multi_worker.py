"""MultiWorkerMirroredStrategy with two processes on 127.0.0.1 and the defaults' randomness (augmentation, dropout,
non-deterministic input): each worker trains on its own half, every example exactly once per epoch, one tuning
search serves both workers, and only the chief's files remain. Losing a worker: a peer that never comes ends the
wait in time (and SIGTERM ends it at once), killed workers restarted by their exit code finish the run as if
uninterrupted, and launch/multi_worker.sh restarts or stops the job by the exit-code table."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import trainer_process
from bench import multi_worker
from conftest import REPO, write_color_dataset
from trainer.runtime import cluster as cluster_lib
from trainer import exit_codes


def _run_cluster(flags: list[str], workers: int = 2) -> list[str]:
  addresses = [f"127.0.0.1:{port}" for port in trainer_process.free_ports(workers)]
  processes = [trainer_process.start(flags, TF_CONFIG=json.dumps(cluster_lib.tf_config(addresses, index)))
               for index in range(workers)]
  outputs = []
  try:
    for process in processes:
      outputs.append(process.communicate(timeout=trainer_process.TIMEOUT_SECONDS)[0])
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
  for process, output in zip(processes, outputs):
    assert process.returncode == 0, output[-4000:]
  return outputs


def test_two_workers_share_the_examples_once_per_epoch_and_one_tuning_search(tmp_path, random_mobilenet_025_weights):
  data_dir = write_color_dataset(tmp_path / "colors", 7)  # 21 images: an odd training share pads one worker.
  workdir, ids = tmp_path / "cluster", tmp_path / "ids"
  flags = trainer_process.tiny_flags(data_dir, random_mobilenet_025_weights, workdir=workdir, strategy="multi_worker",
                                     frozen_epochs=2, example_log=ids, tune=True, tuner="random", max_trials=2,
                                     tune_epochs=2, tune_folds=2)
  outputs = _run_cluster(flags)

  facts = trainer_process.run_facts(workdir)
  total = facts["train_examples"]
  assert (facts["num_replicas"], facts["workers"]) == (2, 2)
  records = [json.loads(line) for path in sorted(ids.glob("worker_*.jsonl")) for line in path.read_text().splitlines()]
  for epoch in (1, 2, 3):
    shares = [r["ids"] for r in records if r.get("epoch") == epoch]
    assert len(shares) == 2 and not set(shares[0]) & set(shares[1])  # Disjoint shares...
    assert sorted(shares[0] + shares[1]) == list(range(total))  # ...that cover every example exactly once.
  # One search: its values are in the chief's config, and the other worker trained with the same ones (a worker
  # with other values is refused by check_config).
  best = json.loads((workdir / "tuning" / "best_hparams.json").read_text())["hparams"]
  config = json.loads((workdir / "config.json").read_text())
  assert config["model"]["head_units"] == best["head_units"]
  assert "model exported to" in outputs[0] and "the chief worker exports" in outputs[1]
  assert sorted(p.name for p in workdir.iterdir() if not p.name.startswith(".")) == [
      "cache", "checkpoints", "config.json", "data_manifest.tsv", "export", "report", "tensorboard",
      "tuning"]  # No worker's temp folder.
  assert len(list((workdir / "export" / "classifier").glob("*/saved_model.pb"))) == 1


def test_a_peer_that_never_comes_ends_within_the_timeout_and_sigterm_ends_the_wait(tmp_path,
                                                                                   random_mobilenet_025_weights):
  data_dir = write_color_dataset(tmp_path / "colors", 2)
  # Two clusters of two workers, each started without its other worker: the first with a 2 s timeout, the second
  # (worker 1 of its cluster) with 600 s, to be stopped by SIGTERM while it waits.
  addresses = [f"127.0.0.1:{port}" for port in trainer_process.free_ports(4)]
  timed_out, stopped = (
      trainer_process.start(trainer_process.tiny_flags(data_dir, random_mobilenet_025_weights,
                                                       workdir=tmp_path / name, strategy="multi_worker",
                                                       peer_timeout=timeout),
                            TF_CONFIG=json.dumps(cluster_lib.tf_config(cluster, index)))
      for name, timeout, cluster, index in (("a", 2, addresses[:2], 0), ("b", 600, addresses[2:], 1)))
  try:
    output = timed_out.communicate(timeout=trainer_process.TIMEOUT_SECONDS)[0]
    assert timed_out.returncode == exit_codes.PEER_LOST, output[-4000:]
    assert len([line for line in output.splitlines() if line.startswith("error:")]) == 1
    assert f"worker 1 ({addresses[1]}) did not come within --peer_timeout=2" in output
    assert "Traceback" not in output
    # Once the second is waiting (its port answers), SIGTERM ends it.
    assert _answers(addresses[3], trainer_process.TIMEOUT_SECONDS), "the second worker never started waiting"
    stopped.send_signal(signal.SIGTERM)
    start = time.monotonic()
    output = stopped.communicate(timeout=30)[0]
    assert time.monotonic() - start < 10
    assert stopped.returncode == exit_codes.PREEMPTED
    assert f"Stopped by SIGTERM while waiting for worker 0 ({addresses[2]})" in output
  finally:
    for process in (timed_out, stopped):
      if process.poll() is None:
        process.kill()


def _answers(address: str, seconds: float) -> bool:
  """Whether a process listens at `address` within `seconds`."""
  host, _, port = address.rpartition(":")
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline:
    try:
      socket.create_connection((host, int(port)), timeout=1).close()
      return True
    except OSError:
      time.sleep(0.2)
  return False


_FAKE_PYTHON = """#!/usr/bin/env bash
# launch/multi_worker.sh's interpreter, faked: trainer.cluster prints the worker's index as its TF_CONFIG;
# trainer.main logs its start and plays its worker's next line of codes_<index>: a code to exit with, or "stop" to
# wait for SIGTERM (then exit 143). Anything else runs the real interpreter (the exit-code table).
here="$(dirname "$0")"
if [ "$1" = -m ] && [ "$2" = trainer.cluster ]; then echo "${4#--index=}"; exit 0; fi
if [ "$1" = -m ] && [ "$2" = trainer.main ]; then
  index="$TF_CONFIG"
  line="$(head -n 1 "$here/codes_$index")"; sed -i 1d "$here/codes_$index"
  echo "$index" >> "$here/starts"
  if [ "$line" = stop ]; then sleep 60 & trap "kill $!; exit 143" TERM; wait; exit 1; fi
  sleep 0.5; exit "$line"
fi
exec "$REAL_PYTHON" "$@"
"""


@pytest.mark.parametrize("codes, restarts, expected_code, expected_starts", [
    # A lost worker (SIGKILL) and its peer's PEER_LOST: the job starts again and finishes.
    ((["138", "0"], ["137", "0"]), 3, 0, 4),
    # A user error on one worker: the other is stopped, no restart, the job ends with 2.
    ((["stop"], ["2"]), 3, exit_codes.USER_ERROR, 2),
    # Restarts run out: the job ends with the retryable code.
    ((["138", "138"], ["138", "138"]), 1, exit_codes.PEER_LOST, 4),
])
def test_the_launcher_restarts_the_job_on_the_codes_meant_for_it_and_stops_on_user_errors(
    tmp_path, codes, restarts, expected_code, expected_starts):
  fake = tmp_path / "python"
  fake.write_text(_FAKE_PYTHON)
  fake.chmod(0o755)
  for index, lines in enumerate(codes):
    (tmp_path / f"codes_{index}").write_text("".join(f"{line}\n" for line in lines))
  result = subprocess.run(["bash", str(REPO / "launch" / "multi_worker.sh"), "127.0.0.1:1,127.0.0.1:2",
                           "--workdir=unused"], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": str(fake), "REAL_PYTHON": sys.executable,
                               "RESTARTS": str(restarts), "GRACE_SECONDS": "2"})
  assert result.returncode == expected_code, result.stderr
  assert len((tmp_path / "starts").read_text().split()) == expected_starts


@pytest.mark.slow
def test_killed_workers_restarted_by_exit_code_finish_the_run_as_if_uninterrupted(tmp_path):
  """The scheduler of README's policy (bench.multi_worker.supervise: restart on a retryable code) while workers are
  SIGKILLed at random points: the job finishes with the uninterrupted run's history, each example once per epoch
  and one export."""
  figures = multi_worker.main(["bench.multi_worker", "--workers=2", "--images=18", "--image_size=32",
                               "--batch_size=4", "--epochs=3", "--kill_every=6", "--kills=5",
                               f"--json={tmp_path / 'figures.json'}"])
  assert figures["kills"] == 5 and figures["restarts"] >= 5
  assert figures["final_history_matches"]
  assert figures["seen_per_epoch"] == [[figures["dataset_size"]] * 2] * 3
  assert figures["exports"] == 1
