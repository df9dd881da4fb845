"""Files to examples: where they come from (folders, CSV, TFDS, TFRecord), the checks before anything trains, the
one decode function training and serving share, and each worker's decoded, cached, padded share."""
