"""ReLU SAE with decoder-norm-weighted L1 (Anthropic, April 2024).

On the quickstart-sized LM's blocks.1.resid_post (512 latents).

COMMAND: python -m scripts.launch --config=configs/sae/relu.py --workdir=runs/sae_relu
         (reuse a trained LM: --config.lm.workdir=runs/quickstart; shorter: --config.train.steps=500)
RUNTIME: ~3 min on a 2-core CPU without lm.workdir (the LM trains first, ~2 min), ~1 min with it.
EXPECT: see docs/results/sae.md for measured FVU, L0, dead fraction and CE loss recovered of this config.
Variant arguments: `configs/sae/relu.py:n_latents=1024` (also k, hookpoint where they apply).
"""

from configs import common
from configs.sae.common import sae_experiment


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, n_latents=512, hookpoint="blocks.1.resid_post")
    config = sae_experiment("relu", n_latents=args.n_latents, hookpoint=args.hookpoint)
    config.harvest.hookpoints = (args.hookpoint,)
    config.lock()
    return config
