"""TopK transcoder: reads blocks.1.resid_mid (the MLP's input stream) and reconstructs blocks.1.mlp_out.

COMMAND: python -m scripts.launch --config=configs/sae/transcoder.py --workdir=runs/sae_transcoder
         (reuse a trained LM: --config.lm.workdir=runs/quickstart)
RUNTIME: ~3 min on a 2-core CPU without lm.workdir (the LM trains first), ~1 min with it.
EXPECT: CE loss recovered is measured by replacing mlp_out with the transcoder's output computed from the clean
resid_mid; numbers are not in docs/results/sae.md yet (the frontier covers SAEs only).
"""

from configs import common
from configs.sae.common import sae_experiment


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, n_latents=512, k=16, layer=1)
    hook_in, hook_out = f"blocks.{args.layer}.resid_mid", f"blocks.{args.layer}.mlp_out"
    d = common.MODEL_SIZES["tiny"]["d_model"]
    config = sae_experiment("topk", n_latents=args.n_latents, k=args.k, hookpoint=hook_in)
    config.sae.out_hookpoint = hook_out
    config.sae.d_out = d
    config.harvest.hookpoints = (hook_in, hook_out)
    config.lock()
    return config
