"""transfer-trainer: a folder of labelled photos to a served image classifier, by transfer learning."""

import os

# TensorFlow's C++ INFO/WARNING lines (oneDNN, CPU features) drown the training log; errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
