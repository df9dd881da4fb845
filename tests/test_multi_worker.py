"""MultiWorkerMirroredStrategy with two processes on 127.0.0.1 and the defaults' randomness (augmentation, dropout,
non-deterministic input): each worker trains on its own half, every example exactly once per epoch, one tuning
search serves both workers, and only the chief's files remain."""

import json

import trainer_process
from conftest import write_color_dataset
from trainer import distribute


def _run_cluster(flags: list[str], workers: int = 2) -> list[str]:
  addresses = [f"127.0.0.1:{port}" for port in trainer_process.free_ports(workers)]
  processes = [trainer_process.start(flags, TF_CONFIG=json.dumps(distribute.tf_config(addresses, index)))
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
      "cache", "checkpoints", "config.json", "export", "report", "tensorboard", "tuning"]  # No worker's temp folder.
  assert len(list((workdir / "export" / "classifier").glob("*/saved_model.pb"))) == 1
