"""Serve Lumen models (and routers over them) behind an OpenAI-compatible HTTP API.

  python -m scripts.serve --config=configs/serve/demo.py --config.port=8000

The models named in the config are trained into (or loaded from) `config.workdir`, or random-initialised when their
`train_steps` is 0; routers are fit on an outcome table of them; then uvicorn serves `framework.serving.create_app`
on `config.host` (127.0.0.1 by default: nothing listens beyond this machine unless asked). SIGINT/SIGTERM stop
accepting connections, finish the requests in flight, then exit.
"""

from __future__ import annotations

import logging

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Serving config file (path[:arg]).", lock_config=True)
flags.mark_flags_as_required(["config"])


def build_engine(config):
    """The `Engine` a serving config describes: its models (cheapest first) and routers."""
    from experiments import routing
    from framework.serving import Engine, ServedRouter

    models = routing.build_models(config, config.workdir or None)
    fitted = routing.build_routers(config, models, routing.build_probe(config, config.workdir or None))
    names = tuple(m.name for m in models)
    prices = tuple(config.routers.get("prices", ()))
    served = {n: ServedRouter(r, names, tuple(config.routers.thresholds), prices) for n, r in fitted.items()}
    return Engine(
        {m.name: m for m in models},
        served,
        window_s=config.window_ms / 1000.0,
        max_batch=config.max_batch,
        min_batch=config.min_batch,
        max_wait_s=config.max_wait_ms / 1000.0,
        default_max_tokens=config.default_max_tokens,
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import uvicorn

    from framework.serving import create_app

    logging.getLogger("absl").setLevel(logging.WARNING)
    config = _CONFIG.value
    engine = build_engine(config)
    print(f"lumen serve: {', '.join(engine.model_names())} on http://{config.host}:{config.port}", flush=True)
    uvicorn.run(
        create_app(engine),
        host=config.host,
        port=int(config.port),
        log_level=config.log_level,
        timeout_graceful_shutdown=60,
    )


if __name__ == "__main__":
    app.run(main)
