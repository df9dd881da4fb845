"""One tiny trained run shared by the export, serving, predict and evaluate tests (trained once per session)."""

import pathlib

from conftest import CLASS_COLORS, write_image
from trainer import train
from trainer.config import Config

_RUNS: dict[str, pathlib.Path] = {}


def workdir(tmp_path_factory, weights: str) -> pathlib.Path:
  """A workdir after one frozen epoch of MobileNet alpha 0.25 at 32 px on red/green/blue images, exported once."""
  if "run" not in _RUNS:
    root = tmp_path_factory.mktemp("trained_run")
    for name, color in CLASS_COLORS.items():
      for i in range(6):
        write_image(root / "data" / name / f"{name}_{i}.jpg", color, size=(40 + 4 * i, 32))
    config = Config().replace(backbone="mobilenet", alpha=0.25, weights=weights, image_size=32, batch_size=8,
                              frozen_epochs=1, finetune_epochs=0, head_units=8, augment="none", verbosity=-1,
                              data_dir=str(root / "data"), validation_split=0.34)
    train.train_and_evaluate(config, str(root / "run"))
    _RUNS["run"] = root / "run"
  return _RUNS["run"]
