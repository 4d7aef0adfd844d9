"""Training: the generic loop (`loop.train` of a `loop.Task`) and its hooks, optimiser, schedule and frozen groups,
checkpoints, metrics, train state, and the losses (`loss.next_token_loss`, `loss.sequence_logprobs`)."""
