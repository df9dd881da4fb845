"""Export of trained classifiers as SavedModels that TF Serving serves from raw image bytes."""
