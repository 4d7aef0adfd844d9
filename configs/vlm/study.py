"""Two-stage VLM on rendered mod-10 expressions (K = 1..3): text-pretrained LM, stage 1 reads, stage 2 computes.

One character per 8-px patch (task.cell = the ViT's patch size, glyphs centred); the LM is pretrained on the same
rows with each cell's character as a token where the image tokens go (task.text_layout="grid").

Variants after the colon (the study's ablations): projector=mlp|linear, mask=prefix|causal, encoder=trained|frozen
(frozen: the randomly initialised encoder is never trained), stage1=1|0 (0 skips stage 1), seed=N, steps=N (steps per
stage; the pretrain stage gets the same).
COMMAND: python -m scripts.launch --config=configs/vlm/study.py:projector=mlp,mask=prefix --workdir=runs/vlm/base
RUNTIME: ~0.1 s per step (batch 32) on a loaded 2-core CPU, plus ~1 min of evaluation per stage.
EXPECT: after stage 2 the base variant reads most characters; answers stay at the guessing floor (docs/results/vlm.md).
"""

from configs import common as base
from configs.vlm import common


def get_config(arg: str | None = None):
    args = base.parse_arg(arg, projector="mlp", mask="prefix", encoder="trained", stage1=1, seed=0, steps=600)
    config = common.vlm_experiment(seed=args.seed)
    config.model.projector = args.projector
    config.model.prefix_lm = args.mask == "prefix"
    vision = ("vision",) if args.encoder == "trained" else ()
    config.stage1.train = ("projector",) + vision
    config.stage2.train = ("projector", "lm") + vision
    for name in ("pretrain", "stage1", "stage2"):
        config[name].steps = args.steps
    if not args.stage1:
        config.stage1.steps = 0
    config.lock()
    return config
