"""The preference study's base config: mod-10 chains, K = 1..5, the tiny LM SFT'd to a partly right policy, and
pairs of the gold trace vs that policy's own wrong completion (source=policy; source=corrupt: a corrupted step).

COMMAND: .venv/bin/python -m scripts.reproduce.preference --workdir=runs/preference_study
  (the study script runs this config's SFT once per seed and then every arm; one arm alone:
  .venv/bin/python -m scripts.launch --config=configs/preference/study.py:kind=ipo --workdir=runs/pref_ipo)
RUNTIME: one arm ~15 s of CPU after the SFT stage (~1-3 min, stopped at held-out token accuracy 0.95) and the pair
  sampling (~5 s a seed); 0.3-1 min of wall time on a loaded 2-core CPU. The whole study: ~22 CPU-min + the SFT.
EXPECT: see docs/results/preference.md.
"""

from configs import common
from configs.preference.common import preference_experiment


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, kind="sigmoid", seed=1, lr=1e-4, source="policy")
    config = preference_experiment(size="tiny", kind=args.kind, seed=args.seed)
    config.task.update(modulus=10, num_steps=(1, 5), pack=True)
    # Partly right on purpose: stop the SFT at held-out token accuracy 0.95 (checked every 25 steps).
    config.sft.update(steps=2000, batch_size=32, seq_len=64, lr=3e-3, eval_every=25, stop_when="token_accuracy>=0.95")
    config.sft.update(log_every=100, checkpoint_every=500)
    # Pairs that differ where this policy errs: the gold trace vs a wrong completion of the SFT policy (4 samples per
    # problem at temperature 0.7, near its greedy mistakes); n and eval_n count problems (those it always solves
    # give no pair). source=corrupt: gold trace vs the gold trace with one random step corrupted.
    config.pairs.update(n=1024, eval_n=256, source=args.source, samples=4, temperature=0.7)
    config.train.update(steps=150, batch_size=16, seq_len=64, lr=args.lr, log_every=10, checkpoint_every=150)
    config.eval.update(problems_per_k=64)
    config.lock()
    return config
