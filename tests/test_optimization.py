import keras
import numpy as np
import pytest

from trainer.config import Config
from trainer.loop import tuning
from trainer.modeling import model as model_lib
from trainer.modeling import optimization


def _cross_entropy(targets: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
  return -np.sum(targets * np.log(probabilities), axis=-1)


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_the_training_loss_is_cross_entropy_against_smoothed_labels(smoothing):
  labels = np.array([0, 2, 1])
  probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.25, 0.5, 0.25]], np.float32)
  classes = probabilities.shape[-1]
  # Label smoothing as Szegedy et al. (2016) define it: (1 - s) on the label, s spread evenly over every class.
  targets = (1 - smoothing) * np.eye(classes)[labels] + smoothing / classes
  loss = np.asarray(optimization.training_loss(smoothing)(labels, probabilities))
  np.testing.assert_allclose(loss, _cross_entropy(targets, probabilities), rtol=1e-5)


def test_smoothing_keeps_a_confident_right_answer_from_costing_nothing():
  confident = np.array([[1 - 1e-6, 1e-6]], np.float32)
  plain, smoothed = (float(np.asarray(optimization.training_loss(s)(np.array([0]), confident))[0]) for s in (0, 0.1))
  assert plain < 1e-3 < smoothed


def test_the_fine_tune_phase_may_smooth_labels_differently_from_the_frozen_phase():
  both = Config().replace(label_smoothing=0.1, finetune_label_smoothing=0.1).train
  fine_tune_only = Config().replace(label_smoothing=0.0, finetune_label_smoothing=0.1).train
  frozen_only = Config().replace(label_smoothing=0.1, finetune_label_smoothing=0.0).train
  as_frozen = Config().replace(label_smoothing=0.2, finetune_label_smoothing=-1).train
  phases = (model_lib.FROZEN, model_lib.FINETUNE)
  smoothing = {name: [optimization.phase_label_smoothing(phase, train) for phase in phases]
               for name, train in (("both", both), ("fine_tune_only", fine_tune_only), ("frozen_only", frozen_only),
                                   ("as_frozen", as_frozen))}
  assert smoothing == {"both": [0.1, 0.1], "fine_tune_only": [0.0, 0.1], "frozen_only": [0.1, 0.0],
                       "as_frozen": [0.2, 0.2]}


def test_the_tuners_heads_train_on_the_runs_loss():
  head = tuning.HeadHyperModel(4, 3, seed=0, label_smoothing=0.2).build(
      {"head_units": 0, "dropout": 0.0, "frozen_lr": 1e-3})
  labels, probabilities = np.array([1]), np.array([[0.2, 0.6, 0.2]], np.float32)
  expected = np.asarray(optimization.training_loss(0.2)(labels, probabilities))
  np.testing.assert_allclose(np.asarray(head.loss(labels, probabilities)), expected, rtol=1e-6)


def test_each_phase_has_its_own_optimizer_and_the_fine_tune_rate_decays_over_its_steps():
  config = Config().replace(frozen_epochs=2, finetune_epochs=3, frozen_lr=1e-3, finetune_lr=4e-4,
                            finetune_schedule="cosine")
  rates, optimizers = optimization.phase_optimizers(config, lr_scale=0.5, steps_per_epoch=4)
  assert list(optimizers) == [model_lib.FROZEN, model_lib.FINETUNE]
  assert optimizers[model_lib.FROZEN] is not optimizers[model_lib.FINETUNE]
  assert rates[model_lib.FROZEN] == pytest.approx(0.5e-3)
  schedule = rates[model_lib.FINETUNE]
  # 3 epochs of 4 steps: half-way at step 6, zero at step 12, from the scaled start.
  np.testing.assert_allclose([float(schedule(0)), float(schedule(6)), float(schedule(12))], [2e-4, 1e-4, 0.0],
                             atol=1e-9)
  assert isinstance(optimizers[model_lib.FINETUNE], keras.optimizers.Adam)
