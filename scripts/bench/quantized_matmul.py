"""Decode-shaped quantised matmuls vs bf16: the Pallas int8 / int4 / NF4 weight-only kernels on a GPU.

COMMAND: python -m scripts.bench.quantized_matmul            (on a machine with a CUDA GPU; --impl interpret on CPU
         only checks that the script runs: interpret-mode timings mean nothing)
RUNTIME: ~1-2 min on an H100.
EXPECT (issue 8 goals, not yet measured: no GPU was available when this was written): int8 >= 1.6x and int4 >= 2.5x
the bf16 matmul's speed at M = 1..16 (the bandwidth limits being 2x and 4x fewer weight bytes).

For each (K, N) weight and each M in --ms, times y = x @ W for x bf16 [M, K]: bf16 W (XLA dot) against int8
per-channel, int4 group-wise (affine) and NF4 weights through `kernels.quantized_matmul` (impl `pallas`).  Each
timing is the median of --runs calls of a jitted function after a warm-up that compiles; the table reports
microseconds, speed-ups over bf16 measured in the same run, and the effective weight bandwidth (weight bytes /
time).  Every quantised result is also checked against the jnp reference before timing.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from scripts.bench import common

HEADERS = ("K x N", "M", "bf16 us", "int8 us", "int4 us", "nf4 us", "int8 x", "int4 x", "nf4 x", "bf16 GB/s")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096", help="comma-separated KxN weights")
    p.add_argument("--ms", default="1,2,4,8,16", help="comma-separated decode batch sizes M")
    p.add_argument("--group_size", type=int, default=128)
    p.add_argument("--block_n", type=int, default=128)
    p.add_argument("--block_k", type=int, default=256)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--impl", default="pallas", choices=("pallas", "interpret"))
    p.add_argument("--no_append", action="store_true", help="print only; do not write BENCHMARKS.md")
    return p.parse_args(argv)


def bench_shape(K: int, N: int, args) -> list[list]:
    import jax
    import jax.numpy as jnp

    from framework.quant import qtensor
    from kernels import quantized_matmul as qmm

    bs = qmm.BlockSizes(block_m=16, block_n=args.block_n, block_k=args.block_k)
    w = jax.random.normal(jax.random.key(0), (K, N), jnp.float32) * 0.02
    w_bf16 = w.astype(jnp.bfloat16)
    q8 = qtensor.quantize_matrix(w, "int8")
    q4 = qtensor.quantize_matrix(w, "int4", group_size=args.group_size)
    nf4 = qtensor.quantize_matrix(w, "nf4", group_size=args.group_size)
    s_nf4 = nf4.block_scales()
    fns = {
        "bf16": jax.jit(lambda x: jnp.dot(x, w_bf16, preferred_element_type=jnp.float32).astype(x.dtype)),
        "int8": jax.jit(lambda x: qmm.int8_matmul(x, q8.values, q8.scales, impl=args.impl, block_sizes=bs)),
        "int4": jax.jit(
            lambda x: qmm.int4_matmul(
                x, q4.values, q4.scales, q4.zeros, group_size=q4.group_size, impl=args.impl, block_sizes=bs
            )
        ),
        "nf4": jax.jit(
            lambda x: qmm.int4_matmul(
                x,
                nf4.values,
                s_nf4,
                None,
                group_size=nf4.group_size,
                codebook=qtensor.NF4_LEVELS,
                impl=args.impl,
                block_sizes=bs,
            )
        ),
    }
    refs = {"int8": q8, "int4": q4, "nf4": nf4}
    rows = []
    for M in (int(m) for m in args.ms.split(",")):
        x = jax.random.normal(jax.random.key(M), (M, K), jnp.float32).astype(jnp.bfloat16)
        for name, qw in refs.items():  # correctness before speed: kernel vs dequantised reference
            got = np.asarray(fns[name](x), np.float32)
            want = np.asarray(x.astype(jnp.float32) @ qw.dequantize())
            err = np.max(np.abs(got - want)) / max(1.0, np.max(np.abs(want)))
            if err > 2e-2:
                raise SystemExit(f"{name} K={K} N={N} M={M}: kernel differs from the reference (rel err {err:.3g})")
        us = {}
        for name, fn in fns.items():
            secs = common.time_runs(lambda: fn(x).block_until_ready(), args.runs, warmup=2)
            us[name] = common.median(secs) * 1e6
        gbps = K * N * 2 / (us["bf16"] * 1e-6) / 1e9
        rows.append(
            [f"{K}x{N}", M, *(f"{us[n]:.1f}" for n in fns), *(f"{us['bf16'] / us[n]:.2f}" for n in refs), f"{gbps:.0f}"]
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    monitor = common.ContentionMonitor()
    import jax

    rows = []
    for shape in args.shapes.split(","):
        K, N = (int(v) for v in shape.split("x"))
        shape_rows = bench_shape(K, N, args)
        rows += shape_rows
        print(common.markdown_table(HEADERS, shape_rows), flush=True)
    body = "\n".join(
        [
            common.markdown_table(HEADERS, rows),
            "",
            f"x bf16 [M, K]; bf16 = XLA dot on a bf16 weight; int8 per channel, int4 affine group {args.group_size}, "
            f"NF4 block {args.group_size} through `kernels.quantized_matmul` impl={args.impl} (block_n "
            f"{args.block_n}, int8 block_k {args.block_k}); median of {args.runs} jitted calls after warm-up; "
            f"speed-ups are bf16 time / quantised time in the same run. Device: {jax.devices()[0].device_kind}.",
        ]
    )
    entry = common.Entry(
        title="Quantised matmuls (decode shapes) vs bf16",
        command=common.command_line("scripts.bench.quantized_matmul", argv),
        versions={"jax": jax.__version__, "python": sys.version.split()[0]},
        body=body,
        contention=monitor.note(),
    )
    common.publish(entry, append_to_file=not args.no_append)


if __name__ == "__main__":
    main()
