"""MultiWorkerMirroredStrategy with two processes on 127.0.0.1: both finish, only the chief's files remain, and
the training matches one process on the same global batch."""

import json

import pytest

import trainer_process
from trainer import distribute


def test_two_workers_train_like_one_process_and_only_the_chief_exports(color_folder, mobilenet_025_weights,
                                                                       tmp_path):
  single = tmp_path / "single"
  trainer_process.run(trainer_process.tiny_flags(color_folder, mobilenet_025_weights, workdir=single))

  workdir = tmp_path / "cluster"
  flags = trainer_process.tiny_flags(color_folder, mobilenet_025_weights, workdir=workdir, strategy="multi_worker")
  workers = [f"127.0.0.1:{port}" for port in trainer_process.free_ports(2)]
  processes = [trainer_process.start(flags, TF_CONFIG=json.dumps(distribute.tf_config(workers, index)))
               for index in range(2)]
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
    assert "sharding policy" not in output.lower(), output  # No auto-shard fallback warning.

  assert sorted(p.name for p in workdir.iterdir()) == ["checkpoints", "config.json", "export", "report",
                                                       "tensorboard"]  # No worker's temporary folder left.
  assert len(list((workdir / "export" / "classifier").glob("*/saved_model.pb"))) == 1
  facts = trainer_process.run_facts(workdir)
  assert (facts["num_replicas"], facts["per_replica_batch_size"], facts["global_batch_size"]) == (2, 2, 4)
  # Same steps on the same global batches: equal up to float32 summation order (tolerance 1e-4).
  one, two = trainer_process.history(single), trainer_process.history(workdir)
  assert [r["epoch"] for r in two] == [1, 2]
  for a, b in zip(one, two):
    for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
      assert b[key] == pytest.approx(a[key], abs=1e-4), (key, a, b)
