"""The classifier: backbones, the head and the run's phases, augmentation inside the step, and how the weights
move (learning rates, optimizers, loss)."""
