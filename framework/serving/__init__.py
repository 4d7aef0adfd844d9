"""An OpenAI-compatible HTTP server over Lumen models and routers (FastAPI + uvicorn), batching requests.

from framework.serving import Engine, ServedRouter, create_app
engine = Engine({"arith-s": model_s, "arith-m": model_m}, {"mf": ServedRouter(mf_router, ("arith-s", "arith-m"))})
app = create_app(engine)          # uvicorn.run(app, host="127.0.0.1", port=8000), or `python -m scripts.serve`

Model names are plain model names or `router-<router>-<threshold>`; concurrent requests share `generate` calls.
"""

from framework.serving.app import create_app
from framework.serving.batcher import Batcher, Job, Row
from framework.serving.engine import ApiError, Engine, ServedRouter

__all__ = ["ApiError", "Batcher", "Engine", "Job", "Row", "ServedRouter", "create_app"]
