"""Test-time scaling on the quickstart's task in the regime chosen from the regime map (docs/results/tts.md): the
1500-step mod-10 policy, T = 0.8, K = 3..8, the gold-label PRM; every selector scored on answers and on the gold
path. Accuracy vs N (pool strategies to 256; beam, DVTS and lookahead at M = 2 and 4; revision at serial:parallel
ratios) by difficulty bin with standard errors, FLOPs, compute-optimal vs best-of-N at equal FLOPs, PRM vs the
bigger model (training and inference FLOPs), coverage, and the PRM label-source table.

COMMAND: .venv/bin/python -m scripts.reproduce.tts --workdir=runs/tts_default   (trains the policy and the judge first)
         (`--scale=full`: 100 problems, beam / DVTS to N = 32, lookahead and revision to 16)
         or .venv/bin/python -m scripts.launch --config=configs/scaling/default.py --workdir=runs/tts \
           --config.policy.workdir=<train_lm workdir> --config.judge.workdir=<train_lm workdir>
         An imported HF policy: --config.model.hf_path=<folder> --config.revision.enabled=False (experiments/tts.py).
RUNTIME: ~10 min on a quiet 2-core CPU from a fresh workdir (measured: 10:12 wall, 18 CPU-min, everything trained
  here); a rerun reuses the trained policies and fitted verifiers. `:full` is roughly twice the search and revision
  cost.
EXPECT (docs/results/tts.md; ~0.055 standard error per accuracy over 64 problems; the policy's greedy accuracy
  depends on the machine it trains on): answer pass@N -> 1.00 by N = 128 while gold-path pass@N rises 0.21 -> 0.66;
  every selector's answer accuracy 0.30-0.48 and flat in N, its chosen trace on the gold path 0.17-0.25 at every N
  (the gold PRM's selection accuracy on the pool ~0.26; on 4 held-out samples per problem ~0.8); beam / DVTS /
  lookahead not above weighted BoN at equal N; serial revision below parallel chains; compute-optimal within noise
  of weighted BoN and level with majority vote at equal FLOPs (no budget with 4x less compute); bigger model greedy
  1.00 at about the FLOPs of weighted best-of-4, trained on ~2.4x the FLOPs of policy + PRM.
"""

from configs.scaling import common


def get_config(arg: str | None = None):
    if arg not in (None, "", "full"):
        raise ValueError(f"configs/scaling/default.py: variant {arg!r}; expected nothing or 'full'")
    config = common.scaling_experiment()
    # Two beam widths (M = 2 and 4) for beam search, DVTS and lookahead; 64 problems, searches to N = 16 and
    # lookahead / revision to 8, so that a fresh run fits 30 min on a quiet 2-core CPU. `:full` is the larger run.
    config.eval.update(extra_ms=(2,), problems=64, search_max_n=16, lookahead_max_n=8, revision_max_n=8)
    if arg == "full":
        config.eval.update(problems=100, search_max_n=32, lookahead_max_n=16, revision_max_n=16)
    config.lock()
    return config
