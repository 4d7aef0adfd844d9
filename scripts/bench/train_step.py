"""MFU of the jitted train step: its model FLOP/s against this machine's measured fp32 matmul FLOP/s.

COMMAND: .venv/bin/python -m scripts.bench.train_step --size=base
RUNTIME: ~1.5 min on a quiet 2-core CPU (defaults: base, batch 64 x seq 128, 10 rounds, matmuls 2048 and 4096).
EXPECT: the goal is model FLOP/s >= 50% of the matmul FLOP/s measured in the same run.

The step is `framework.training.loop`'s own step function (`make_train_step`: value_and_grad of the train_lm loss, the
config's AdamW + clipping, the non-finite guard), jitted with the donated state inside the config's mesh and
logical-axis rules, as `loop.train` does on one device. Model FLOPs = `lm.flops_per_token(cfg, seq_len)` x batch
x seq_len per step (PaLM appendix B: 6N + attention; remat recompute not counted). The reference is a jitted fp32
`jnp.dot` of two NxN matrices. After the warm-ups (compiles), each round times one call of every matmul and one
train step back to back, so both see the same background load on a shared machine; MFU = model FLOP/s over the
best matmul FLOP/s, both medians over the rounds ("best case": fastest step over fastest matmul).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import warnings

import numpy as np

from scripts.bench import common


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="base", help="model size of configs.common.MODEL_SIZES")
    p.add_argument("--batch_size", type=int, default=None, help="default: the config's train.batch_size")
    p.add_argument("--seq_len", type=int, default=None, help="default: the config's train.seq_len")
    p.add_argument("--steps", type=int, default=10, help="timed rounds (one train step each), after 2 warm-ups")
    p.add_argument("--remat", default=None, help="none | full | dots (default: the config's model.remat)")
    p.add_argument("--matmul_sizes", default="2048,4096", help="comma-separated N of the NxN fp32 matmul reference")
    p.add_argument("--no_append", action="store_true", help="print only; do not write BENCHMARKS.md")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    return args


def build_config(args: argparse.Namespace):
    """The train_lm experiment config for `--size`, with the flag overrides applied and validated."""
    from configs import common as configs_common
    from experiments import train_lm
    from framework.tasks import data

    config = configs_common.lm_experiment(size=args.size)
    if args.batch_size is not None:
        config.train.batch_size = args.batch_size
    if args.seq_len is not None:
        config.train.seq_len = args.seq_len
        config.model.max_seq_len = max(config.model.max_seq_len, args.seq_len)
        # The longest chains that fit; the timing does not depend on token content.
        fits = [k for k in range(1, 9) if data.max_seq_len(k, config.task.modulus) <= args.seq_len]
        config.task.num_steps = (1, max(fits or [1]))
    if args.remat is not None:
        config.model.remat = args.remat
    config.lock()
    return config, train_lm.validate(config)


def make_matmul(n: int):
    """A blocking call of a jitted fp32 [n, n] @ [n, n] (2 n^3 FLOPs)."""
    import jax
    import jax.numpy as jnp

    a, b = (jax.random.normal(k, (n, n), jnp.float32) for k in jax.random.split(jax.random.key(0), 2))
    dot = jax.jit(jnp.dot)
    return lambda: dot(a, b).block_until_ready()


def make_train_step(config, model_cfg, stack: contextlib.ExitStack):
    """A blocking call of one step of the loop's jitted train step on a real batch, and a final-loss getter."""
    import jax

    from experiments import train_lm
    from framework import sharding
    from framework.training import loop, optim

    tc = config.train
    _, task = train_lm.make_task(config)  # exactly the loss and batches `train_lm.run` trains on
    tx, schedule = optim.make_optimizer(tc), optim.lr_schedule(tc)
    mesh = sharding.make_mesh(config.mesh)
    with warnings.catch_warnings():  # loop.train enters `with mesh` as well: same context, minus the warning
        warnings.filterwarnings("ignore", "`with mesh:` context manager", DeprecationWarning)
        stack.enter_context(mesh)
    stack.enter_context(sharding.rules_context(mesh))
    rng = jax.random.key(config.seed)
    holder = {"state": loop.init_train_state(task.init_params(rng), tx, rng)}
    step_fn = jax.jit(loop.make_train_step(task.loss_fn, tx, schedule), donate_argnums=0)
    batch = sharding.put_batch(next(iter(task.batches(0))), mesh)

    def one_step():
        holder["state"], holder["metrics"] = step_fn(holder["state"], batch)
        jax.block_until_ready(holder["metrics"])

    return one_step, lambda: float(holder["metrics"]["loss"])


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(config, model_cfg, sizes: list[int], rounds: int) -> tuple[list[float], dict[int, list[float]]]:
    """(train-step seconds, {N: matmul seconds}) over `rounds` interleaved rounds, after 2 warm-ups of each."""
    with contextlib.ExitStack() as stack:
        step, final_loss = make_train_step(config, model_cfg, stack)
        matmuls = {n: make_matmul(n) for n in sizes}
        for fn in [step, *matmuls.values()] * 2:
            fn()
        step_s, matmul_s = [], {n: [] for n in sizes}
        for _ in range(rounds):
            for n, fn in matmuls.items():
                matmul_s[n].append(_timed(fn))
            step_s.append(_timed(step))
        loss = final_loss()
    if not np.isfinite(loss):
        raise RuntimeError(f"train step produced a non-finite loss ({loss}); the timing is meaningless")
    return step_s, matmul_s


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    monitor = common.ContentionMonitor()
    import jax

    from framework.models import lm

    config, model_cfg = build_config(args)
    tc = config.train
    sizes = [int(n) for n in args.matmul_sizes.split(",")]
    step_s, matmul_s = measure(config, model_cfg, sizes, args.steps)
    tokens = tc.batch_size * tc.seq_len
    step_flops = lm.flops_per_token(model_cfg, tc.seq_len) * tokens
    model = step_flops / common.median(step_s)
    peaks = {n: 2 * n**3 / common.median(s) for n, s in matmul_s.items()}
    best_case = (step_flops / min(step_s)) / max(2 * n**3 / min(s) for n, s in matmul_s.items())

    headers = ["size", "params", "batch x seq", "remat", "step (ms)", "tokens/s", "model GFLOP/s"]
    headers += [f"matmul {n} GFLOP/s" for n in sizes] + ["MFU", "MFU best case"]
    row = [args.size, f"{lm.param_count(model_cfg) / 1e6:.2f}M", f"{tc.batch_size} x {tc.seq_len}"]
    row += [model_cfg.remat, f"{common.median(step_s) * 1e3:.1f}", f"{tokens / common.median(step_s):,.0f}"]
    row += [f"{model / 1e9:.1f}"] + [f"{peaks[n] / 1e9:.1f}" for n in sizes]
    row += [f"{model / max(peaks.values()):.1%}", f"{best_case:.1%}"]
    table = common.markdown_table(headers, [row])
    print(table, flush=True)
    body = "\n".join(
        [
            table,
            "",
            f"`configs.common.lm_experiment(size={args.size!r})`, fp32, task.pack={config.task.pack}, the loop's "
            f"jitted train step (AdamW, grad clipping, non-finite guard; donated state) on "
            f"{jax.devices()[0].device_kind} x{jax.device_count()}. "
            f"{args.steps} rounds after 2 warm-ups, each round one fp32 `jnp.dot` NxN per N then one train step; "
            f"medians reported (step min {min(step_s) * 1e3:.1f} ms, max {max(step_s) * 1e3:.1f} ms). MFU = model "
            f"FLOP/s / best matmul FLOP/s; best case = fastest step / fastest matmul. Model FLOPs per step = "
            f"flops_per_token x batch x seq = {step_flops / 1e9:.2f} GFLOP. XLA:CPU uses all "
            f"{common.num_cores()} cores.",
        ]
    )
    entry = common.Entry(
        title=f"Train step MFU: {args.size} (CPU)",
        command=common.command_line("scripts.bench.train_step", argv),
        versions={"jax": jax.__version__, "python": sys.version.split()[0]},
        body=body,
        contention=monitor.note(),
    )
    common.publish(entry, append_to_file=not args.no_append)


if __name__ == "__main__":
    main()
