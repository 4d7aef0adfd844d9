"""The agents experiment's config schema and defaults (no framework imports)."""

from __future__ import annotations

import ml_collections

from configs import common


def agents_experiment() -> ml_collections.ConfigDict:
    """The schema (and defaults) of an agents config."""
    config = ml_collections.ConfigDict()
    config.experiment = "agents"
    config.seed = 0
    config.model = common.model_config("tiny", vocab_size=100, tokenizer="text", max_seq_len=96)
    config.roles = ml_collections.ConfigDict(
        dict(weights=(0.5, 0.2, 0.1, 0.1, 0.1), num_steps=(1, 6), modulus=10, piece_steps=2, peers=(1, 4))
    )
    config.train = common.train_config(
        steps=3000, batch_size=32, seq_len=64, lr=3e-3, eval_every=50, checkpoint_every=500, log_every=100
    )
    config.study = ml_collections.ConfigDict(
        dict(
            budgets=(0.85, 0.9, 0.95),
            problems=128,
            num_steps=(2, 6),
            temperature=0.7,
            topologies=("single", "vote:3", "debate:3x2", "centralised:2", "hybrid:2x1", "pipeline:2"),
            tool_topologies=("single", "debate:3x2"),
            debate_grid=("debate:2x1", "debate:2x2", "debate:3x1", "debate:4x1"),
            plant=True,
        )
    )
    config.mesh = common.mesh_config()
    return config
