"""The OpenAI-compatible HTTP API over an `Engine`: models, completions, chat completions, streaming, health.

Endpoints: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`, `GET /health`. Errors have the
OpenAI body `{"error": {"message", "type", "param", "code"}}`: 404 for an unknown model, 400 for a bad field
(characters outside the tokenizer's alphabet name the character and its position; `max_tokens` beyond the context),
400 for a body that is not JSON or not an object.

`stream=true` sends server-sent events (`data: {chunk}` lines, then `data: [DONE]`), one chunk per token. A request's
tokens come from one batched `generate` call (the whole row is decoded on the accelerator without a Python step per
token), so the chunks follow each other once that call returns. A client that disconnects mid-stream only ends its
own stream.

`logprobs`: completions (`logprobs: k`) return the chosen tokens' log-probs under the model (raw logits,
temperature 1) in the legacy format; chat (`logprobs: true`) returns `choices[].logprobs.content`. Alternatives
(`top_logprobs`) list only the chosen token: `generate` does not keep the other candidates.

Each response's `model` is the model that answered (with a router, the routed model; `routed_by` names the router
and each choice carries its own `model`).
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from framework.serving.engine import ApiError, Choice, Engine


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}", None, "invalid_json")
    return body


def _usage(choices: list[Choice], n: int) -> dict:
    prompt = sum(c.prompt_tokens for c in choices[::n])  # choices are prompt-major, n per prompt
    completion = sum(len(c.tokens) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _top_model(choices: list[Choice]) -> str:
    names = list(dict.fromkeys(c.model for c in choices))
    return names[0] if len(names) == 1 else ",".join(names)


def _completion_logprobs(c: Choice) -> dict:
    offsets, at = [], 0
    for t in c.tokens:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": list(c.tokens),
        "token_logprobs": list(c.logprobs),
        "top_logprobs": [{t: lp} for t, lp in zip(c.tokens, c.logprobs)],
        "text_offset": offsets,
    }


def _chat_logprobs(c: Choice) -> dict:
    return {
        "content": [
            {
                "token": t,
                "logprob": lp,
                "bytes": list(t.encode()),
                "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}],
            }
            for t, lp in zip(c.tokens, c.logprobs)
        ]
    }


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def create_app(engine: Engine) -> FastAPI:
    """The FastAPI app serving `engine`; its lifespan closes the engine after the last in-flight request."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.close()

    app = FastAPI(title="Lumen OpenAI-compatible server", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return _error(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        return _error(ApiError(400, f"invalid request: {e.errors()}", None, "invalid_request"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": engine.model_names(), "generate_calls": engine.batcher.calls}

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "created": now, "owned_by": "lumen"} for n in engine.model_names()],
        }

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _json_body(request)
        _, _, candidates = engine.resolve(body.get("model"))
        s = engine.sampling(body, chat=False)
        prompt = body.get("prompt")
        texts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise ApiError(
                400,
                f"prompt must be a string or a non-empty list of strings, got {prompt!r}",
                "prompt",
                "invalid_value",
            )
        lp = body.get("logprobs")
        if lp is not None and (isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= 5):
            raise ApiError(400, f"logprobs must be an integer in [0, 5], got {lp!r}", "logprobs", "invalid_value")
        params = ["prompt" if len(texts) == 1 else f"prompt[{i}]" for i in range(len(texts))]
        choices = await engine.complete(body["model"], texts, s, params)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        extra = {"routed_by": body["model"]} if body["model"] not in engine.models else {}
        if body.get("stream"):
            return StreamingResponse(
                _stream_completion(choices, rid, created, lp is not None, extra), media_type="text/event-stream"
            )
        out = [
            {
                "index": i,
                "text": c.text,
                "finish_reason": c.finish_reason,
                "model": c.model,
                "logprobs": _completion_logprobs(c) if lp is not None else None,
            }
            for i, c in enumerate(choices)
        ]
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": _top_model(choices),
            "choices": out,
            "usage": _usage(choices, s.n),
            **extra,
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _json_body(request)
        router, threshold, candidates = engine.resolve(body.get("model"))
        s = engine.sampling(body, chat=True)
        texts = {m: engine.chat_prompt(m, body.get("messages")) for m in candidates}
        if len(set(texts.values())) != 1:
            raise ApiError(400, "a router's models must share one chat format", "model", "invalid_value")
        text = next(iter(texts.values()))
        choices = await engine.complete(body["model"], [text], s, ["messages"])
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        want_lp = bool(body.get("logprobs"))
        extra = {"routed_by": body["model"]} if router is not None else {}
        if body.get("stream"):
            return StreamingResponse(
                _stream_chat(choices, rid, created, want_lp, extra), media_type="text/event-stream"
            )
        out = [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
                "model": c.model,
                "logprobs": _chat_logprobs(c) if want_lp else None,
            }
            for i, c in enumerate(choices)
        ]
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": _top_model(choices),
            "choices": out,
            "usage": _usage(choices, s.n),
            **extra,
        }

    return app


async def _stream_completion(choices: list[Choice], rid: str, created: int, logprobs: bool, extra: dict):
    for i, c in enumerate(choices):
        for t, lp in zip(c.tokens, c.logprobs):
            chunk_lp = {"tokens": [t], "token_logprobs": [lp], "top_logprobs": [{t: lp}], "text_offset": [0]}
            yield _sse(
                {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": c.model,
                    **extra,
                    "choices": [
                        {"index": i, "text": t, "finish_reason": None, "logprobs": chunk_lp if logprobs else None}
                    ],
                }
            )
        yield _sse(
            {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": c.model,
                **extra,
                "choices": [{"index": i, "text": "", "finish_reason": c.finish_reason, "logprobs": None}],
            }
        )
    yield "data: [DONE]\n\n"


async def _stream_chat(choices: list[Choice], rid: str, created: int, logprobs: bool, extra: dict):
    for i, c in enumerate(choices):
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": c.model, **extra}
        yield _sse(
            base | {"choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
        )
        for t, lp in zip(c.tokens, c.logprobs):
            lpo = {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}]}
            yield _sse(
                base
                | {
                    "choices": [
                        {
                            "index": i,
                            "delta": {"content": t},
                            "finish_reason": None,
                            "logprobs": lpo if logprobs else None,
                        }
                    ]
                }
            )
        yield _sse(base | {"choices": [{"index": i, "delta": {}, "finish_reason": c.finish_reason}]})
    yield "data: [DONE]\n\n"
