"""TopK SAE (Gao et al. 2024) with AuxK for dead latents.

On the quickstart-sized LM's blocks.1.resid_post (512 latents).

COMMAND: python -m scripts.launch --config=configs/sae/topk.py --workdir=runs/sae_topk
         (reuse a trained LM: --config.lm.workdir=runs/quickstart; shorter: --config.train.steps=500)
RUNTIME: ~3 min on a 2-core CPU without lm.workdir (the LM trains first, ~2 min), ~1 min with it.
EXPECT: see docs/results/sae.md for measured FVU, L0, dead fraction and CE loss recovered of this config.
Variant arguments: `configs/sae/topk.py:n_latents=1024` (also k, hookpoint where they apply).
Imported HF checkpoint (a local folder; text from a local file, tokenized by its tokenizer.json):
         python -m scripts.launch --config=configs/sae/topk.py --workdir=runs/sae_hf \
           --config.model.hf_path=tests/assets/hf/llama_nopad --config.harvest.text_file=README.md \
           --config.sae.d_in=32    (sae.d_in = the model's d_model; see README "Hugging Face checkpoints")
"""

from configs import common
from configs.sae.common import sae_experiment


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, n_latents=512, hookpoint="blocks.1.resid_post", k=16)
    config = sae_experiment("topk", n_latents=args.n_latents, hookpoint=args.hookpoint, k=args.k)
    config.harvest.hookpoints = (args.hookpoint,)
    config.lock()
    return config
