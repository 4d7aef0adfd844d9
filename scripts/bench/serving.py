"""Server throughput: tokens/s under concurrent clients vs calling `generate` directly on the same batches.

COMMAND: .venv/bin/python -m scripts.bench.serving [--clients 32 --requests 4 --max_tokens 64 --d_model 256]
RUNTIME: ~2-4 min on a 2-core CPU (compiles, then --rounds rounds).
EXPECT: the server's tokens/s >= 70% of direct `generate` on the same batches (the issue's target).

One random-weight arithmetic LM (`--d_model`, `--n_layers`) is served in this process by uvicorn on 127.0.0.1 (the
`Engine` and `create_app` of `framework.serving`, batching window `--window_ms`, at most `--clients` rows a call).
`--clients` threads of a separate client process (so that they share no GIL with the server) each send
`--requests` greedy completions (`max_tokens`) one after another through httpx; the wall time is the client
process's, from the first request to the last response. The
batcher records every `generate` call it makes (the padded prompts and N); the direct side then replays exactly those
calls with `inference.generate`, timed one by one. Tokens are the completion tokens the server returned (each row cut
at its max_tokens or its stop token), the same on both sides. Rounds alternate server then direct, so both see the
same machine conditions; the ratio is the median over rounds. Beside wall time, the CPU seconds of this process (the
server's event loop and worker on one side, the replay on the other; the client process excluded) give a ratio that
other processes competing for the cores disturb less. Every batch bucket is compiled before the rounds (the
server shares this process's compile cache), and the model has no stop token, so each row makes max_tokens tokens. The client process runs on the same cores as the server: its
HTTP work is part of what the server side pays on this machine.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import resource
import socket
import subprocess
import sys
import threading
import time

import httpx
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


def _clients(url, args, seed) -> tuple[int, float]:
    """Runs the clients in a separate process (no GIL shared with the server); (tokens, wall seconds)."""
    cmd = [sys.executable, "-m", "scripts.bench.serving", "--client_url", url, "--seed", str(seed)]
    cmd += [f"--{k}={getattr(args, k)}" for k in ("clients", "requests", "max_tokens")]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    return r["tokens"], r["wall"]


def _client_main(args) -> None:
    rng = np.random.default_rng(args.seed)
    url = args.client_url
    problems = [f"Q {rng.integers(10)}+{rng.integers(10)}*{rng.integers(10)}\n" for _ in range(args.clients)]

    def client(p):
        n = 0
        with httpx.Client(timeout=600) as c:
            for _ in range(args.requests):
                r = c.post(
                    url + "/v1/completions",
                    json={"model": "bench", "prompt": p, "max_tokens": args.max_tokens, "temperature": 0},
                )
                r.raise_for_status()
                n += r.json()["usage"]["completion_tokens"]
        return n

    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
        tokens = sum(pool.map(client, problems))
    print(json.dumps({"tokens": tokens, "wall": time.perf_counter() - t}))


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--max_tokens", type=int, default=64)
    ap.add_argument("--d_model", type=int, default=256)
    ap.add_argument("--n_layers", type=int, default=4)
    ap.add_argument("--window_ms", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default="")
    ap.add_argument("--client_url", default="", help=argparse.SUPPRESS)  # internal: run the clients only
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client_url:
        return _client_main(args)

    from framework.serving import Engine

    model = _model(args)
    engine = Engine({"bench": model}, window_s=args.window_ms / 1000, max_batch=args.clients)
    port = _free_port()
    server, thread = _serve(engine, port)
    url = f"http://127.0.0.1:{port}"
    _warm(model, args)
    _clients(url, args, 0)  # warm-up of the HTTP path
    rounds = []
    for i in range(args.rounds):
        engine.batcher.trace = []
        c0 = _cpu()
        tokens, wall = _clients(url, args, i + 1)
        server_cpu = _cpu() - c0
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
                "server_cpu_s": server_cpu,
                "direct_cpu_s": direct_cpu,
                "cpu_ratio": direct_cpu / server_cpu,
            }
        )
    server.should_exit = True
    thread.join(30)
    engine.close()
    ratio = float(np.median([r["ratio"] for r in rounds]))
    cpu_ratio = float(np.median([r["cpu_ratio"] for r in rounds]))
    print(
        f"{'round':>5} | {'tokens':>6} | {'calls':>5} | {'rows/call':>9} | {'server tok/s':>12} | "
        f"{'direct tok/s':>12} | ratio | CPU ratio"
    )
    for i, r in enumerate(rounds):
        print(
            f"{i:5d} | {r['tokens']:6d} | {r['calls']:5d} | {r['mean_rows_per_call']:9.1f} | "
            f"{r['server_tok_s']:12.1f} | {r['direct_tok_s']:12.1f} | {r['ratio']:.3f} | {r['cpu_ratio']:.3f}"
        )
    print(
        f"median server / direct tokens/s: {ratio:.3f} (target >= 0.70); CPU seconds direct / server: {cpu_ratio:.3f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"args": vars(args), "rounds": rounds, "median_ratio": ratio, "median_cpu_ratio": cpu_ratio},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
