"""Two tiny random-weight arithmetic LMs and two routers: the server the API tests start (no training).

COMMAND: python -m scripts.serve --config=configs/serve/test.py --config.port=8123
RUNTIME: ready in ~10 s on a 2-core CPU (imports, the routers' outcome table of 16 queries, compiles).
EXPECT: every endpoint works; the answers are noise (untrained weights): the API, not the models, is under test.
"""

import ml_collections

from configs.serve import common


def get_config(arg: str | None = None):
    del arg
    config = common.server(window_ms=20.0, max_wait_ms=80.0, max_batch=16, min_batch=8, default_max_tokens=8)
    config.workdir = ""
    config.seed = 0
    config.task = ml_collections.ConfigDict(dict(modulus=10, num_steps=(1, 3)))
    config.models = ml_collections.ConfigDict(
        {
            "a": common.model("tiny-a", 16, 1, train_steps=0, seed=1, max_seq_len=48),
            "b": common.model("tiny-b", 32, 1, train_steps=0, seed=2, max_seq_len=48),
        }
    )
    config.routers = ml_collections.ConfigDict(
        dict(names="difficulty,random", thresholds=(0.5,), prices=(0.5,), table_problems=8)
    )
    config.lock()
    return config
