"""Burst vs sustained fp32 matmul FLOP/s on this machine: the denominator of the train-step MFU, examined.

  python -m scripts.bench.matmul_sustained [--seconds=15 --sizes=2048,4096]

RUNTIME: ~45 s with the defaults. `scripts/bench/train_step.py` divides the model FLOP/s by a matmul measured between
train steps. On a CPU whose clock boosts briefly (or a VM whose host throttles), a first call can run much faster
than the same call repeated for seconds, and MFU depends on which one is the "peak". This runs one NxN `jnp.dot`
back to back for --seconds per size and reports the first call, the fastest, the median, the mean over each fifth of
the run, and one call after 5 s idle. Records its section in BENCHMARKS.md unless --no_append.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from scripts.bench import common


def sustained(n: int, seconds: float) -> list[float]:
    """GFLOP/s of every back-to-back call of an NxN fp32 dot during `seconds` (after one compile call)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    rates, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        dot(a, b).block_until_ready()
        rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    time.sleep(5)
    t0 = time.perf_counter()
    dot(a, b).block_until_ready()
    rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)  # last entry: after 5 s idle
    return rates


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--sizes", default="2048,4096")
    p.add_argument("--no_append", action="store_true")
    args = p.parse_args(argv)
    monitor = common.ContentionMonitor()
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        *run, rested = sustained(n, args.seconds)
        k = max(1, len(run) // 5)
        fifths = [sum(run[i : i + k]) / len(run[i : i + k]) for i in range(0, k * 5, k)]
        rows.append(
            [n, len(run), f"{run[0]:.1f}", f"{max(run):.1f}", f"{common.median(run):.1f}"]
            + [" / ".join(f"{f:.1f}" for f in fifths), f"{rested:.1f}"]
        )
    headers = ["N", "calls", "first", "max", "median", "mean by fifth of the run", "after 5 s idle"]
    body = (
        common.markdown_table(headers, rows)
        + f"\n\nfp32 `jnp.dot` NxN, GFLOP/s per call, back to back for {args.seconds:g} s per size, "
        f"XLA:CPU on {common.num_cores()} cores."
    )
    entry = common.Entry(
        "Matmul FLOP/s, burst vs sustained (CPU)",
        common.command_line("scripts.bench.matmul_sustained", argv),
        {"jax": jax.__version__},
        body,
        monitor.note(),
    )
    common.publish(entry, append_to_file=not args.no_append)


if __name__ == "__main__":
    main()
