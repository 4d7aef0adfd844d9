"""The memory study: a small text LM trained to answer ledger questions from retrieved context, then every store.

COMMAND: .venv/bin/python -m scripts.launch --config=configs/memory/answerer.py --workdir=runs/memory
  (variants after a colon: `answerer.py:steps=1600,budget=96,curriculum2=1000,context_weight=0.1,lengths=10/100,
  seeds=0`; `steps=0` runs the study with the rule reader only; scripts/reproduce/memory.py wraps this and prints
  the tables)
RUNTIME: ~0.15-0.2 s per step for the 4-layer tiny answerer with its 8-tap convolution (seq_len 208, packed batches of
  16) on a 2-core CPU; the default 6000 steps ~20 min, then the study (6 lengths x 2 seeds x 12 stores, 20
  questions per ability) ~6 min; `steps=12000` (the results page's reader) ~40-45 min in all.
EXPECT: (docs/results/memory.md) the answerer copies a lone value by step ~1500-2000 and, with the convolution
  (`short_conv=8`; 0 removes it), matches names among three lines by step ~3000 (`eval/lookup_p_n3_*` ~0.9;
  without it ~0.6 after 12,000 steps) and among near-namesakes (`near=0.5`; `eval/lookup_p_n3_near`) by
  ~9000-12,000 (~0.9), at seed 0; at other seeds the match can form late or only partly (seeds 1, 2: fact-store
  lookups ~0.55-0.75). At 12,000 steps it reads gold contexts (extraction ~1.0, updates ~0.95, abstention ~0.9,
  sums in columns ~0.7) and the fact store's lines (extraction ~0.95, updates ~0.9-1.0, sums ~0.9, abstention
  ~0.8-0.9: absent names read as near-namesakes); "as of" days ~0.9 from gold lines up to the day and ~0.8
  through the temporal store asked time-aware ("+time" stores), ~0.3-0.6 without (it answers with the last
  line: it does not compare days); `scripts.reproduce.memory_errors` names each wrong answer's cause and where
  "as of" answers sit); the rule reader shows the stores' shapes (full
  context falls with history length, fact and temporal stores hold up on updates, only temporal on "as of"
  questions, windows fail multi-session).
"""

from configs import common

STORES = (
    "gold",
    "full_context",
    "recent_window",
    "vector",
    "vector_lm",
    "facts",
    "core_archival",
    "temporal",
    "linked_notes",
    "gold+time",  # "as of day d" asked time-aware (`harness.time_filter`): gold lines up to day d,
    "vector+time",  # the vector store's nearest utterances up to day d,
    "temporal+time",  # the temporal store's facts valid on day d
)


def get_config(arg: str | None = None):
    args = common.parse_arg(
        arg,
        size="tiny",
        layers=4,
        steps=6000,
        budget=96,
        lengths="10/30/100/300/1000/3000",
        seeds="0/1",
        decisions="greedy/scored",
        curriculum1=500,
        curriculum2=3000,
        max_vars=3,
        near=0.5,
        context_weight=1.0,
        short_conv=8,
    )
    config = common.lm_experiment(size=args.size)
    config.experiment = "memory"
    seq_len = args.budget + 112  # the longest example: context, a sum question and its worked (column) answer
    config.model.update(vocab_size=100, max_seq_len=seq_len)
    if args.layers:
        config.model.n_layers = args.layers
    config.model.tokenizer = "text"
    config.model.n_kv_heads = config.model.n_heads  # every head its own keys: the name match is a per-head lookup
    config.model.short_conv = args.short_conv  # a key carrying a name's last characters: up to seven and the one before
    del config.task
    del config.eval
    config.task = dict(
        budget=args.budget,
        min_events=6,
        max_events=64,
        context_weight=args.context_weight,
        questions=3,
        easy=0.8,
        curriculum_steps=(args.curriculum1, args.curriculum2),
        max_vars=args.max_vars,
        near=args.near,
    )
    config.train.update(
        steps=args.steps,
        batch_size=16,
        seq_len=seq_len,
        pack=True,
        lr=3e-3,
        warmup_steps=100,
        weight_decay=0.01,
        b2=0.98,
        eval_every=250,
        checkpoint_every=250,
        log_every=25,
    )
    config.study = dict(
        lengths=tuple(int(x) for x in args.lengths.split("/")),
        seeds=tuple(int(x) for x in args.seeds.split("/")),
        stores=STORES,
        k=8,
        questions_per_ability=20,
        lm_reader=True,
        decisions=tuple(args.decisions.split("/")),
    )
    config.lock()
    return config
