"""The regime map of the test-time scaling study: where PRM-guided beam search beats best-of-N at equal FLOPs.

Axes: policy strength (the tiny policy of `common.policy_lm` trained 400 or 1500 steps), sampling temperature, PRM
quality (the oracle PRM, a noisy oracle, PRMs fitted on gold and on Monte-Carlo labels), difficulty (K groups); on
mod-10 chains both answer accuracy and gold-path accuracy (the chosen trace is right step by step: what a task without
chance hits would score) are compared. `framework.search.regimes.map_cell` does one (policy, temperature) cell.

COMMAND: .venv/bin/python -m scripts.reproduce.tts --study=regimes --workdir=runs/tts_map
  (reduced: --regimes_config=configs/scaling/regimes.py:small; the mod-20 cell: `:modulus` with its own workdir,
  e.g. runs/tts_map_m20). A rerun skips finished cells and reuses policies and PRMs.
RUNTIME: `:small` (48 problems with K = 2..8, pool 64, beam N in {4, 8}, 2 seeds): 39 min wall / ~7 CPU-min on the
  shared 2-core CPU at load average 15-30, policies trained beforehand (~3 CPU-min more from a fresh workdir). The
  full map (64 problems, pool 128, beam N up to 16, larger PRM fits) is roughly three times that; not measured.
EXPECT (docs/results/tts.md, `:small`): gold-path pass@64 ~0.7 for the 1500-step policy (~0.3 on K = 6..8) while
  answer pass@64 is 1.0; 0 for the 400-step policy. With the oracle, beam search ahead of weighted BoN at equal N and
  behind it at equal FLOPs (beam at N costs ~4.6 N samples). The gold-label PRM: step AUROC ~0.94, selection accuracy
  ~0.5, and beam ahead of weighted BoN on the gold path at equal FLOPs by ~0.07-0.09 (+-0.03-0.04) at T = 0.8.
  `:modulus` (mod 20, tiny policy, 1500 steps): no gold-path sample at all (gold-path pass@64 = 0), answer pass@1
  at the chance rate (~0.05): every right answer is a chance hit; ~1 CPU-min after the policy (~4 CPU-min).
"""

import ml_collections

from configs.scaling import common


def get_config(arg: str | None = None):
    if arg not in (None, "", "small", "modulus"):
        raise ValueError(f"configs/scaling/regimes.py: variant {arg!r}; expected nothing, 'small' or 'modulus'")
    config = ml_collections.ConfigDict()
    config.seed = 0
    # name -> a train_lm config (trained into <workdir>/policy_<name>, or loaded from `workdirs[name]`).
    config.policies = ml_collections.ConfigDict(
        {"s1500": common.policy_lm(steps=1500), "s400": common.policy_lm(steps=400)}
    )
    config.workdirs = ml_collections.ConfigDict({"s1500": "", "s400": ""})
    config.temperatures = (0.8, 1.2)
    # Scorers: "oracle", "noisy:<sigma>" (the oracle with logit noise sigma), or a label source of
    # framework.verifiers.sources ("gold", "mc:<n>", ...) fitted on the policy's traces at `prm.temperature`.
    config.scorers = ("oracle", "noisy:3", "gold", "mc:4")
    config.prm = ml_collections.ConfigDict(
        dict(temperature=0.8, train_problems=192, samples_per_problem=4, num_steps=(1, 8), steps=300, batch_size=64,
             lr=1e-3, freeze_lm=False)
    )  # fmt: skip
    config.eval = ml_collections.ConfigDict(
        dict(problems=64, num_steps=(2, 8), pool=128, budgets=(1, 2, 4, 8, 16, 32, 64, 128), beam_ns=(4, 8, 16), m=4,
             seeds=(0, 1), aggregation="last", batch_size=256)
    )  # fmt: skip
    if arg in ("small", "modulus"):
        config.eval.update(problems=48, pool=64, budgets=(1, 2, 4, 8, 16, 32, 64), beam_ns=(4, 8))
        config.prm.update(train_problems=128, steps=200)
    if arg == "modulus":  # the larger-modulus cell: mod-20 chains (chance hits ~1/20), the oracles only
        config.policies = ml_collections.ConfigDict({"m20": common.policy_lm(steps=1500, modulus=20)})
        config.workdirs = ml_collections.ConfigDict({"m20": ""})
        config.temperatures = (0.8,)
        config.scorers = ("oracle", "noisy:3")
    return config
