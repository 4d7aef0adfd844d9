"""The memory study: a tiny text LM trained to answer ledger questions from retrieved context, then every store.

COMMAND: .venv/bin/python -m scripts.launch --config=configs/memory/answerer.py --workdir=runs/memory
  (variants after a colon: `answerer.py:steps=500,size=tiny,lengths=10/100/1000,seeds=0`; `steps=0` runs the
  study with the rule reader only; scripts/reproduce/memory.py wraps this and prints the tables)
RUNTIME: the tiny answerer (seq_len 320, batch 32) takes 1-4 s/step on a 2-core CPU depending on how busy it is;
  the study adds minutes per (length, seed) cell, most of it filling the stores at 1000+ events.
EXPECT: held-out token accuracy on the answer (number or "unknown", newline, EOS) ~0.8 after 250-500 steps; in the
  study, the rule reader shows the stores' shapes (full context falls with history length at a 256-token window,
  fact and temporal stores hold up on updates, only temporal on "as of" questions, windows fail multi-session)
  and the LM answerer is far below the rule reader (docs/results/memory.md).
"""

from configs import common

STORES = ("full_context", "recent_window", "vector", "vector_lm", "facts", "core_archival", "temporal", "linked_notes")


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, size="tiny", steps=800, lengths="10/30/100/300/1000/3000", seeds="0/1")
    config = common.lm_experiment(size=args.size)
    config.experiment = "memory"
    config.model.update(vocab_size=100, max_seq_len=320)
    config.model.tokenizer = "text"
    del config.task
    del config.eval
    config.task = dict(budget=256, min_events=6, max_events=64)
    lr = 1e-2 if args.size == "tiny" else 3e-3
    config.train.update(
        steps=args.steps,
        batch_size=32,
        seq_len=320,
        lr=lr,
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
