"""Two-stage VLM on rendered mod-10 expressions (K = 1..3): text-pretrained LM, stage 1 reads, stage 2 computes.

One character per 8-px patch (task.cell = the ViT's patch size, glyphs centred); the LM is pretrained on the same
rows with each cell's character as a token where the image tokens go (task.text_layout="grid"), reading them back
("read:") and computing them step by step ("value:" -> the arithmetic task's trace "3+4=7\\n7*2=4\\nA 4\\n").

Variants after the colon (the study's ablations): projector=linear|mlp, mask=prefix|causal, encoder=trained|frozen
(frozen: the randomly initialised encoder is never trained), stage1=1|0 (0 skips stage 1), lora=R (R > 0: stage 2
trains the LM through LoRA adapters of rank R), augment=0|1 (1: glyphs at a random offset inside their cells and
Gaussian pixel noise of std 0.3), seed=N, steps=N (steps per stage; the pretrain stage gets the same).
COMMAND: python -m scripts.launch --config=configs/vlm/study.py:projector=linear,mask=prefix --workdir=runs/vlm/base
RUNTIME: ~0.1 s per step (batch 32) on a 2-core CPU, plus ~1 min of evaluation per stage.
EXPECT: the pretrained LM computes from text; stage 1 makes the image read like that text, so the LM computes from
the image too (docs/results/vlm.md has the study's steps and numbers).
"""

from configs import common as base
from configs.vlm import common


def get_config(arg: str | None = None):
    args = base.parse_arg(
        arg, projector="linear", mask="prefix", encoder="trained", stage1=1, lora=0, augment=0, seed=0, steps=600
    )
    config = common.vlm_experiment(seed=args.seed)
    config.model.projector = args.projector
    config.model.prefix_lm = args.mask == "prefix"
    vision = ("vision",) if args.encoder == "trained" else ()
    config.stage1.train = ("projector",) + vision
    config.stage2.train = ("projector", "lm") + vision
    config.stage2.lora_rank = args.lora
    if args.augment:
        config.task.update(jitter=True, noise=0.3)
    for name in ("pretrain", "stage1", "stage2"):
        config[name].steps = args.steps
    if not args.stage1:
        config.stage1.steps = 0
    config.lock()
    return config
