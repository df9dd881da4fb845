"""What a process runs on, built once by the command: the tf.distribute strategy, precision, batch plan, this
worker's share and role, the cluster of TF_CONFIG and its faults, and the run's workdir with its identity checks."""
