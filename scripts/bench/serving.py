"""Server throughput: tokens/s under concurrent clients vs calling `generate` directly on the same batches.

COMMAND: .venv/bin/python -m scripts.bench.serving [--clients 32 --requests 4 --max_tokens 64 --d_model 256] [--append]
RUNTIME: ~2-4 min on a 2-core CPU (compiles, then --rounds rounds).
EXPECT: the server's tokens/s >= 70% of direct `generate` on the same batches (the issue's target).

One random-weight arithmetic LM (`--d_model`, `--n_layers`) is served in this process by uvicorn on 127.0.0.1 (the
`Engine` and `create_app` of `framework.serving`; a batch closes `--window_ms` after its last request or
`--max_wait_ms` after its first, at most `--clients` rows a call). A separate client process (no GIL shared with the
server) opens `--clients` concurrent HTTP/1.1 keep-alive connections on one asyncio loop, each sending `--requests`
greedy completions (`max_tokens`) one after another; the wall time is the client process's, from the first request
to the last response. A light raw-HTTP client is used so that on a machine where clients and server share the cores,
the clients' own work (an httpx client costs several times more CPU per request) is not billed to the server.
The batcher records every `generate` call it makes (the padded prompts and N); the direct side then replays exactly
those calls with `inference.generate`, timed one by one. Tokens are the completion tokens the server returned (each
row cut at its max_tokens or its stop token), the same on both sides. Rounds alternate server then direct, so both
see the same machine conditions; the ratio is the median over rounds. Where the time goes: the server's ratio is
(duty cycle: the share of the serving wall time spent inside `generate`) x (direct generate time / the same calls'
time inside the server, < 1 when HTTP work competes with them for the cores). Beside wall time, the CPU seconds of
this process (the server's event loop and worker on one side, the replay on the other; the client process excluded)
give a ratio that other processes competing for the cores disturb less. Every batch bucket is compiled before the
rounds (the server shares this process's compile cache), and the model has no stop token, so each row makes
max_tokens tokens. `--append` records the result in BENCHMARKS.md (its "Serving" section).
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import subprocess
import sys
import threading
import time

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(args):
    from experiments.routing import random_params
    from framework.models import lm
    from framework.routing.table import Model

    d = args.d_model
    # No stop token: every row runs to its max_tokens, so each request carries the same work on both sides.
    cfg = lm.LMConfig(
        vocab_size=24,
        d_model=d,
        n_layers=args.n_layers,
        n_heads=4,
        n_kv_heads=2,
        head_dim=d // 4,
        d_ff=3 * d,
        max_seq_len=256,
        scan_layers=False,
        eos_ids=(),
    )
    return Model("bench", random_params(cfg, 0), cfg)


def _serve(engine, port):
    import uvicorn

    from framework.serving import create_app

    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread


def _clients(url, args, seed) -> tuple[int, float, float]:
    """Runs the clients in a separate process (no GIL shared with the server); (tokens, wall s, client CPU s)."""
    cmd = [sys.executable, "-m", "scripts.bench.serving", "--client_url", url, "--seed", str(seed)]
    cmd += [f"--{k}={getattr(args, k)}" for k in ("clients", "requests", "max_tokens")]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    return r["tokens"], r["wall"], r["cpu"]


async def _client_loop(args) -> tuple[int, float]:
    """`--clients` concurrent HTTP/1.1 keep-alive connections, each sending `--requests` completions in turn."""
    import asyncio
    import urllib.parse

    rng = np.random.default_rng(args.seed)
    url = urllib.parse.urlparse(args.client_url)
    problems = [f"Q {rng.integers(10)}+{rng.integers(10)}*{rng.integers(10)}\n" for _ in range(args.clients)]

    async def client(p: str) -> int:
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        body = json.dumps({"model": "bench", "prompt": p, "max_tokens": args.max_tokens, "temperature": 0}).encode()
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        n = 0
        for _ in range(args.requests):
            writer.write(head + body)
            await writer.drain()
            status = (await reader.readline()).split()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                k, _, v = line.decode().partition(":")
                if k.lower() == "content-length":
                    length = int(v)
            payload = json.loads(await reader.readexactly(length))
            if status[1] != b"200":
                raise RuntimeError(f"server answered {status}: {payload}")
            n += payload["usage"]["completion_tokens"]
        writer.close()
        return n

    t = time.perf_counter()
    tokens = sum(await asyncio.gather(*(client(p) for p in problems)))
    return tokens, time.perf_counter() - t


def _client_main(args) -> None:
    import asyncio

    c0 = _cpu()
    tokens, wall = asyncio.run(_client_loop(args))
    print(json.dumps({"tokens": tokens, "wall": wall, "cpu": _cpu() - c0}))


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _direct(model, trace) -> float:
    import jax

    from framework import inference

    total = 0.0
    for _, prompts, N, kw, _ in trace:
        t = time.perf_counter()
        out = inference.generate(model.params, model.cfg, prompts, max_new_tokens=N, **kw)
        jax.block_until_ready(out.tokens)
        total += time.perf_counter() - t
    return total


def _warm(model, args) -> None:
    """Compiles `generate` for every batch bucket the server can form (the server shares this process's cache)."""
    from framework import inference
    from framework.inference import bucket_length
    from framework.tasks import data

    ids = data.encode_text_prompt("Q 1+2*3\n")
    N = bucket_length(args.max_tokens, 1 << 30, minimum=16)
    B = 1
    while B <= bucket_length(args.clients, 1 << 30, minimum=1):
        inference.generate(model.params, model.cfg, [ids] * B, max_new_tokens=N)
        B *= 2


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--max_tokens", type=int, default=64)
    ap.add_argument("--d_model", type=int, default=256)
    ap.add_argument("--n_layers", type=int, default=4)
    ap.add_argument("--window_ms", type=float, default=5.0)
    ap.add_argument("--max_wait_ms", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default="")
    ap.add_argument("--append", action="store_true", help="write the entry into BENCHMARKS.md")
    ap.add_argument("--client_url", default="", help=argparse.SUPPRESS)  # internal: run the clients only
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.client_url:
        return _client_main(args)

    import jax

    from framework.serving import Engine
    from scripts.bench import common

    monitor = common.ContentionMonitor()
    model = _model(args)
    engine = Engine(
        {"bench": model}, window_s=args.window_ms / 1000, max_wait_s=args.max_wait_ms / 1000, max_batch=args.clients
    )
    port = _free_port()
    server, thread = _serve(engine, port)
    url = f"http://127.0.0.1:{port}"
    _warm(model, args)
    _clients(url, args, 0)  # warm-up of the HTTP path
    rounds = []
    for i in range(args.rounds):
        engine.batcher.trace = []
        c0, busy0 = _cpu(), engine.batcher.busy_s
        tokens, wall, client_cpu = _clients(url, args, i + 1)
        server_cpu, busy = _cpu() - c0, engine.batcher.busy_s - busy0
        trace, engine.batcher.trace = engine.batcher.trace, None
        _direct(model, trace)  # untimed: compiles any shape the warm-up did not see
        c0 = _cpu()
        direct = _direct(model, trace)
        direct_cpu = _cpu() - c0
        rows = sum(len(t[4]) for t in trace)
        rounds.append(
            {
                "tokens": tokens,
                "server_s": wall,
                "direct_s": direct,
                "calls": len(trace),
                "mean_rows_per_call": rows / len(trace),
                "server_tok_s": tokens / wall,
                "direct_tok_s": tokens / direct,
                "ratio": direct / wall,
                "duty_cycle": busy / wall,
                "generate_speed": direct / busy,
                "server_cpu_s": server_cpu,
                "direct_cpu_s": direct_cpu,
                "cpu_ratio": direct_cpu / server_cpu,
                "client_cpu_s": client_cpu,
                "cpu_ratio_with_clients": direct_cpu / (server_cpu + client_cpu),
            }
        )
    server.should_exit = True
    thread.join(30)
    engine.close()
    keys = ("ratio", "cpu_ratio", "cpu_ratio_with_clients", "duty_cycle", "generate_speed")
    med = {k: float(np.median([r[k] for r in rounds])) for k in keys}
    table = common.markdown_table(
        [
            "round",
            "tokens",
            "calls",
            "rows/call",
            "server tok/s",
            "direct tok/s",
            "ratio",
            "duty cycle",
            "generate speed",
            "CPU ratio",
            "CPU ratio, clients included",
        ],
        [
            [
                i,
                r["tokens"],
                r["calls"],
                f"{r['mean_rows_per_call']:.1f}",
                f"{r['server_tok_s']:.1f}",
                f"{r['direct_tok_s']:.1f}",
                f"{r['ratio']:.3f}",
                f"{r['duty_cycle']:.3f}",
                f"{r['generate_speed']:.3f}",
                f"{r['cpu_ratio']:.3f}",
                f"{r['cpu_ratio_with_clients']:.3f}",
            ]
            for i, r in enumerate(rounds)
        ],
    )
    summary = (
        f"median server / direct tokens/s: {med['ratio']:.3f} (target >= 0.70) = duty cycle {med['duty_cycle']:.3f} "
        f"x generate speed in the server {med['generate_speed']:.3f}; CPU seconds direct / server: "
        f"{med['cpu_ratio']:.3f} ({med['cpu_ratio_with_clients']:.3f} with the client process's CPU added)"
    )
    print(table + "\n" + summary)
    body = (
        f"{args.clients} concurrent clients (one asyncio process, HTTP/1.1 keep-alive), {args.requests} greedy "
        f"completions each of {args.max_tokens} tokens, a random d{args.d_model} x {args.n_layers}-layer arithmetic "
        f"LM; batch closes {args.window_ms:g} ms after its last request or {args.max_wait_ms:g} ms after its first. "
        f"Direct = `inference.generate` replayed on the server's own batches; rounds alternate the sides.\n\n"
        f"{table}\n\n{summary}. Duty cycle = share of the serving wall time inside `generate`; generate speed = "
        "direct time of the same calls / their time inside the server."
    )
    entry = common.Entry(
        title="Serving: OpenAI-compatible server vs direct generate",
        command=common.command_line("scripts.bench.serving", argv),
        versions={"jax": jax.__version__},
        body=body,
        contention=monitor.note(),
    )
    common.publish(entry, append_to_file=args.append)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rounds": rounds, "median": med}, f, indent=1)


if __name__ == "__main__":
    main()
