"""The training loop and what it drives: the compiled steps, the frozen phase on cached features, checkpoints, the
end of a run, the hyperparameter search, and evaluation of a trained run."""
