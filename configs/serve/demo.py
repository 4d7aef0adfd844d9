"""Three small arithmetic LMs (mod-10 chains) and routers over them behind the OpenAI-compatible server.

COMMAND: python -m scripts.serve --config=configs/serve/demo.py [--config.port=8000] [--config.host=127.0.0.1]
RUNTIME: the models train on the spot into runs/serve_demo (60, 200 and 400 steps) and routers are fit on a
  128-query outcome table of them: ~95 CPU-seconds, i.e. about a minute on a quiet 2-core CPU (7 min on a shared,
  saturated one); a second start loads the checkpoints from there (~15 CPU-seconds).
EXPECT: `GET /v1/models` lists arith-xs, arith-s, arith-m, router-{mf,knn,difficulty,random}-0.5 (threshold rule)
  and router-{mf,knn,difficulty,random}-utility-0.1 (expected-utility rule at price 0.1); e.g.
  curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
    -d '{"model": "router-mf-0.5", "messages": [{"role": "user", "content": "3+4*7"}]}'
  answers with the solution lines of the routed model, whose name is the response's "model". These models are
  partly trained on purpose (routing needs models that err): the small ones are mostly wrong.
"""

import ml_collections

from configs.serve import common


def get_config(arg: str | None = None):
    del arg
    config = common.server()
    config.workdir = "runs/serve_demo"
    config.seed = 0
    config.task = ml_collections.ConfigDict(dict(modulus=10, num_steps=(1, 8)))
    config.models = ml_collections.ConfigDict(
        {
            "xs": common.model("arith-xs", 16, 1, train_steps=60, lr=1e-2),
            "s": common.model("arith-s", 32, 2, train_steps=200, lr=1e-2),
            "m": common.model("arith-m", 64, 2, train_steps=400, lr=5e-3),
        }
    )
    config.routers = ml_collections.ConfigDict(
        dict(names="mf,knn,difficulty,random", thresholds=(0.5,), prices=(0.1,), table_problems=128)
    )
    config.lock()
    return config
