"""The memory study: a small text LM trained to answer ledger questions from retrieved context, then every store.

COMMAND: .venv/bin/python -m scripts.launch --config=configs/memory/answerer.py --workdir=runs/memory
  (variants after a colon: `answerer.py:steps=600,layers=4,budget=128,lengths=10/100/1000,seeds=0`; `steps=0`
  runs the study with the rule reader only; scripts/reproduce/memory.py wraps this and prints the tables)
RUNTIME: the 4-layer tiny answerer (seq_len 192, packed batches of 32) takes 2-4 s/step on a busy 2-core CPU; the
  study adds minutes per (length, seed) cell, most of it filling the stores at 1000+ events.
EXPECT: the held-out answer loss falls to ~0.62 by step 250 and stays there up to step 600: the answerer has learnt
  the format and the "unknown" prior, not the lookup (docs/results/memory.md); the rule reader shows the stores'
  shapes at the budget's window (full context falls with history length, fact and temporal stores hold up on
  updates, only temporal on "as of" questions, windows fail multi-session).
"""

from configs import common

STORES = ("full_context", "recent_window", "vector", "vector_lm", "facts", "core_archival", "temporal", "linked_notes")


def get_config(arg: str | None = None):
    args = common.parse_arg(
        arg, size="tiny", layers=4, steps=1500, budget=128, lengths="10/30/100/300/1000/3000", seeds="0/1"
    )
    config = common.lm_experiment(size=args.size)
    config.experiment = "memory"
    seq_len = args.budget + 64
    config.model.update(vocab_size=100, max_seq_len=seq_len)
    if args.layers:
        config.model.n_layers = args.layers
    config.model.tokenizer = "text"
    del config.task
    del config.eval
    config.task = dict(budget=args.budget, min_events=6, max_events=64, context_weight=0.3)
    config.train.update(
        steps=args.steps,
        batch_size=32,
        seq_len=seq_len,
        pack=True,
        lr=3e-3,
        warmup_steps=100,
        eval_every=250,
        checkpoint_every=250,
        log_every=25,
    )
    config.study = dict(
        lengths=tuple(int(x) for x in args.lengths.split("/")),
        seeds=tuple(int(x) for x in args.seeds.split("/")),
        stores=STORES,
        k=8,
        questions_per_ability=10,
        lm_reader=True,
    )
    config.lock()
    return config
