"""Export of trained classifiers as SavedModels that TF Serving serves from raw image bytes."""

import os

# TensorFlow's C++ INFO/WARNING lines drown the command's own; set before TensorFlow is first imported (export.main
# imports it before anything of trainer's, whose package sets the same). Errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# How export.predict prints its predictions (export.classify.format_predictions): here, where the command's flags
# can read them without loading TensorFlow.
PREDICTION_FORMATS = ("table", "json", "csv")
