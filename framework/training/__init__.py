"""Training: the generic loop (`loop.train`), optimiser and schedule, checkpoints, metrics, train state."""
