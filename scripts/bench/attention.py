"""Flash attention: compiled temporary memory vs sequence length (CPU), and TFLOP/s against cuDNN and XLA (GPU).

COMMAND (CPU, always): .venv/bin/python -m scripts.bench.attention
COMMAND (GPU):         python -m scripts.bench.attention --mode=gpu
RUNTIME: CPU ~3-6 min on 2 cores (compiles only, nothing runs); GPU ~5 min.
EXPECT: CPU: the kernel's temporary memory grows linearly with T (log-log slope <= 1.2) while the reference's grows
quadratically (slope ~2), and the kernel needs >= 8x less at T = 8192. GPU: our forward >= 60% of cuDNN's TFLOP/s.

CPU mode compiles (never runs) `kernels.flash_attention` at T = S = 1k...16k, B = 1, H = 8 query heads over K = 2 kv
heads, D = 64, fp32, causal, twice: `impl="interpret"` (the Pallas kernel code through interpret mode, which lowers
to XLA loops over the same blocks the GPU kernel uses) and `impl="xla"` (the reference that materialises [T, S]),
each as forward only and as forward+backward (`jax.grad` of a weighted sum w.r.t. q, k, v), and reads
`compiled.memory_analysis().temp_size_in_bytes`: the scratch XLA allocates beyond inputs and outputs.
Slopes are least-squares fits of log(bytes) on log(T). Writes a log-log PNG and a JSON next to it.

GPU mode times the jitted forward and forward+backward of our Pallas kernel (`impl="pallas"`), cuDNN
(`impl="cudnn"`) and XLA (`impl="xla"`), bf16, B = 2, H = 16 (K = 16), T = S = 1k...16k, D = 64 and 128, causal and
not; FLOPs = 4 B H T S D for the forward (halved when causal), 2.5x that for the backward; median of 10 runs after 2
warm-ups, all implementations in the same process.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

from scripts.bench import common

MIB = 1024**2
CPU_LENGTHS = (1024, 2048, 4096, 8192, 16384)


def _fns(impl: str, causal: bool = True):
    import jax
    import jax.numpy as jnp

    from kernels import flash_attention

    def fwd(q, k, v):
        return flash_attention(q, k, v, causal=causal, impl=impl)

    def loss(q, k, v, w):
        return jnp.sum(fwd(q, k, v).astype(jnp.float32) * w)

    return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _shapes(T, B=1, H=8, K=2, D=64, dtype="float32"):
    import jax
    import jax.numpy as jnp

    dt = jnp.dtype(dtype)
    q = jax.ShapeDtypeStruct((B, T, H, D), dt)
    kv = jax.ShapeDtypeStruct((B, T, K, D), dt)
    return q, kv, kv, jax.ShapeDtypeStruct((B, T, H, D), jnp.float32)


def temp_bytes(fn, *args) -> int:
    return int(fn.lower(*args).compile().memory_analysis().temp_size_in_bytes)


def slope(lengths, values) -> float:
    return float(np.polyfit(np.log(lengths), np.log(np.maximum(values, 1)), 1)[0])


def cpu_memory(lengths, out_dir: pathlib.Path):
    records = {}
    for impl in ("interpret", "xla"):
        fwd, grad = _fns(impl)
        for T in lengths:
            q, k, v, w = _shapes(T)
            t0 = time.perf_counter()
            records[(impl, "fwd", T)] = temp_bytes(fwd, q, k, v)
            records[(impl, "fwd+bwd", T)] = temp_bytes(grad, q, k, v, w)
            print(
                f"{impl:9s} T={T:6d}: fwd {records[(impl, 'fwd', T)] / MIB:9.1f} MiB, fwd+bwd "
                f"{records[(impl, 'fwd+bwd', T)] / MIB:9.1f} MiB ({time.perf_counter() - t0:.0f} s to compile)"
            )
    rows, fits = [], {}
    for pass_ in ("fwd", "fwd+bwd"):
        kern = [records[("interpret", pass_, T)] for T in lengths]
        ref = [records[("xla", pass_, T)] for T in lengths]
        fits[pass_] = dict(kernel_slope=slope(lengths, kern), reference_slope=slope(lengths, ref))
        for T, a, b in zip(lengths, kern, ref):
            rows.append([pass_, T, f"{a / MIB:.1f}", f"{b / MIB:.1f}", f"{b / max(a, 1):.0f}x"])
        rows.append([pass_, "slope", f"{fits[pass_]['kernel_slope']:.2f}", f"{fits[pass_]['reference_slope']:.2f}", ""])

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for impl, label, color in (("interpret", "Pallas flash kernel", "tab:blue"), ("xla", "reference (XLA)", "tab:red")):
        for pass_, style in (("fwd", "-"), ("fwd+bwd", "--")):
            ys = [records[(impl, pass_, T)] / MIB for T in lengths]
            ax.loglog(lengths, ys, style, marker="o", color=color, label=f"{label}, {pass_}", base=2)
    ax.set_xlabel("sequence length T = S")
    ax.set_ylabel("compiled temporary memory (MiB)")
    ax.set_title("Attention scratch memory, B=1 H=8 K=2 D=64 fp32 causal")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / "attention_memory.png"
    fig.savefig(png, dpi=120)
    data = dict(
        lengths=list(lengths),
        temp_bytes={f"{i}/{p}/{T}": b for (i, p, T), b in records.items()},
        slopes=fits,
    )
    (out_dir / "attention_memory.json").write_text(json.dumps(data, indent=2))
    table = common.markdown_table(["pass", "T", "kernel MiB", "reference MiB", "reference / kernel"], rows)
    return table, fits, png


def gpu_tflops(lengths, runs: int = 10):
    import jax
    import jax.numpy as jnp

    rows = []
    for D in (64, 128):
        for causal in (False, True):
            for T in lengths:
                B, H = 2, 16
                ks = jax.random.split(jax.random.key(T + D), 4)
                q, k, v = (jax.random.normal(kk, (B, T, H, D), jnp.bfloat16) for kk in ks[:3])
                w = jax.random.normal(ks[3], (B, T, H, D), jnp.float32)
                flops = 4 * B * H * T * T * D * (0.5 if causal else 1.0)
                res = {}
                for impl in ("pallas", "cudnn", "xla"):
                    fwd, grad = _fns(impl, causal)
                    try:
                        t_f = common.median(common.time_runs(lambda: fwd(q, k, v).block_until_ready(), runs, 2))
                        t_b = common.median(common.time_runs(lambda: jax.block_until_ready(grad(q, k, v, w)), runs, 2))
                        res[impl] = (flops / t_f / 1e12, 3.5 * flops / t_b / 1e12)
                    except Exception as e:  # an implementation that cannot run this case (e.g. XLA out of memory)
                        print(f"{impl} D={D} causal={causal} T={T}: {type(e).__name__}: {str(e)[:200]}")
                        res[impl] = (float("nan"), float("nan"))
                ratio = res["pallas"][0] / res["cudnn"][0]
                rows.append(
                    [D, causal, T]
                    + [f"{res[i][0]:.0f} / {res[i][1]:.0f}" for i in ("pallas", "cudnn", "xla")]
                    + [f"{100 * ratio:.0f}%"]
                )
                print(rows[-1])
    return common.markdown_table(
        ["D", "causal", "T", "ours fwd / fwd+bwd TFLOP/s", "cuDNN", "XLA", "ours / cuDNN fwd"], rows
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--lengths", default=None, help="comma-separated T (default: 1k..16k)")
    p.add_argument("--out", default="docs/figures", help="where the CPU mode writes its PNG and JSON")
    p.add_argument("--no_append", action="store_true", help="print only; do not write BENCHMARKS.md")
    args = p.parse_args(argv)
    lengths = tuple(int(x) for x in args.lengths.split(",")) if args.lengths else CPU_LENGTHS

    import jax

    versions = {"jax": jax.__version__, "backend": jax.default_backend()}
    if args.mode == "cpu":
        table, fits, png = cpu_memory(lengths, pathlib.Path(args.out))
        i8k = lengths.index(8192) if 8192 in lengths else -1
        body = (
            "Compiled temporary memory (`memory_analysis().temp_size_in_bytes`) of `kernels.flash_attention`, "
            'B=1, H=8 over K=2 kv heads, D=64, fp32, causal: the Pallas kernel (`impl="interpret"`) vs the '
            'reference (`impl="xla"`); slopes are least-squares fits of log(bytes) on log(T).\n\n'
            + table
            + f"\n\nGoal: kernel slope <= 1.2 (measured fwd {fits['fwd']['kernel_slope']:.2f}, fwd+bwd "
            f"{fits['fwd+bwd']['kernel_slope']:.2f}); reference ~2 (fwd {fits['fwd']['reference_slope']:.2f}, fwd+bwd "
            f"{fits['fwd+bwd']['reference_slope']:.2f}); >= 8x less at T = {lengths[i8k]} (see the table). "
            f"Plot: `{png}`.\n"
        )
        title = "Flash attention memory vs sequence length (CPU, compiled)"
    else:
        body = gpu_tflops(lengths) + "\n"
        title = "Flash attention TFLOP/s vs cuDNN and XLA (GPU)"
    entry = common.Entry(
        title=title, command=common.command_line("scripts.bench.attention", argv), versions=versions, body=body
    )
    common.publish(entry, append_to_file=not args.no_append)


if __name__ == "__main__":
    main()
