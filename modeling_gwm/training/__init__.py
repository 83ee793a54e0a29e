"""Training: the DAG curriculum, its run plan, checkpoints, callbacks and the trainer; the training CLI."""
