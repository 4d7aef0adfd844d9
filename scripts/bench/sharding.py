"""Per-device memory and step time of the train step under DP, FSDP, TP and FSDP+TP on 8 simulated CPU devices.

COMMAND: .venv/bin/python -m scripts.bench.sharding --size=base
RUNTIME: ~5 min on a quiet 2-core CPU (base, batch 64 x seq 128, 4 modes, 5 rounds).
EXPECT: params + optimizer state per device ~1/8 of the total under FSDP, all of it under DP, the heads/mlp share
split 8 ways under TP; step times are only comparable as ratios taken in the same run (8 "devices" share 2 cores).

Each mode is `configs.common.lm_experiment(size)` with only `config.mesh` changed. The state is created by the
loop's own `sharded_state` (jit with out_shardings) and the step is the loop's `jit_train_step` (explicit in/out
shardings, donation), both exactly what `loop.train` runs. Memory: bytes of each device's shards of params + optimizer
state (max over devices), and XLA's per-device temporary buffers of the compiled step (`memory_analysis`). Time:
rounds interleave the modes (one step each) so all see the same background load; medians reported.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

MODES = {
    "dp": dict(data=-1, fsdp=1, tensor=1),
    "fsdp": dict(data=1, fsdp=-1, tensor=1),
    "tp": dict(data=1, fsdp=1, tensor=-1),
    "fsdp_tp": dict(data=1, fsdp=-1, tensor=2),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="base", help="model size of configs.common.MODEL_SIZES")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {list(MODES)}")
    p.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    p.add_argument("--batch_size", type=int, default=None, help="default: the config's train.batch_size")
    p.add_argument("--steps", type=int, default=5, help="timed rounds (one step per mode each), after 2 warm-ups")
    p.add_argument("--no_append", action="store_true", help="print only; do not write BENCHMARKS.md")
    args = p.parse_args(argv)
    bad = [m for m in args.modes.split(",") if m not in MODES]
    if bad or args.steps < 1 or args.devices < 1:
        p.error(f"--modes must be a subset of {list(MODES)} (got {bad}); --steps and --devices must be >= 1")
    return args


def build(size: str, mode: str, batch_size: int | None):
    """(config, mesh, rules, state, compiled step, batch) of one mode, built as loop.train builds them."""
    import jax

    from configs import common as configs_common
    from experiments import train_lm
    from framework import sharding
    from framework.training import loop, optim

    config = configs_common.lm_experiment(size=size)
    config.mesh.update(MODES[mode])
    if batch_size is not None:
        config.train.batch_size = batch_size
    _, task = train_lm.make_task(config)  # validates the config first
    tc = config.train
    tx, schedule = optim.make_optimizer(tc), optim.lr_schedule(tc)
    mesh, rules = sharding.make_mesh(config.mesh), sharding.rules_from_config(config.mesh)
    rng = jax.random.key(config.seed)
    with sharding.rules_context(mesh, rules):
        init, _, shardings = loop.sharded_state(task, tx, mesh, rules, rng)
        state = init(rng)
        batch = sharding.global_batch(next(iter(task.batches(0))), mesh, tc.batch_size, rules)
        step = loop.jit_train_step(task, tx, schedule, shardings, {k: v.sharding for k, v in batch.items()})
        compiled = step.lower(state, batch).compile()
    return config, mesh, state, compiled, batch


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={args.devices}"])
    import jax
    import numpy as np

    from framework import sharding
    from framework.models import lm
    from scripts.bench import common

    monitor = common.ContentionMonitor()
    modes = args.modes.split(",")
    built, memory = {}, {}
    for mode in modes:
        t0 = time.perf_counter()
        config, mesh, state, compiled, batch = build(args.size, mode, args.batch_size)
        held = sharding.bytes_per_device((state.params, state.opt_state))
        total = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))
        analysis = compiled.memory_analysis()
        temp = getattr(analysis, "temp_size_in_bytes", None) if analysis is not None else None
        memory[mode] = (dict(mesh.shape), max(held.values()), total, temp)
        built[mode] = {"state": state, "step": compiled, "batch": batch, "metrics": None}
        print(f"{mode}: built and compiled in {time.perf_counter() - t0:.1f} s", flush=True)

    def one(mode):
        b = built[mode]
        b["state"], b["metrics"] = b["step"](b["state"], b["batch"])
        jax.block_until_ready(b["metrics"])

    for _ in range(2):
        for mode in modes:
            one(mode)
    seconds = {m: [] for m in modes}
    for _ in range(args.steps):
        for mode in modes:
            t0 = time.perf_counter()
            one(mode)
            seconds[mode].append(time.perf_counter() - t0)
    losses = {m: float(built[m]["metrics"]["loss"]) for m in modes}
    if not all(np.isfinite(v) for v in losses.values()):
        raise RuntimeError(f"non-finite loss in {losses}; the timings are meaningless")

    base = common.median(seconds[modes[0]])
    headers = ["mode", "mesh (data, fsdp, tensor)", "params+opt / device (MB)", "share of total"]
    headers += ["XLA temp / device (MB)", "step (ms)", f"step / {modes[0]}", "loss after 2+N steps"]
    rows = []
    for m in modes:
        shape, held, total, temp = memory[m]
        rows.append(
            [
                m,
                f"{shape['data']}, {shape['fsdp']}, {shape['tensor']}",
                f"{held / 2**20:.2f}",
                f"{held / total:.1%}",
                "n/a" if temp is None else f"{temp / 2**20:.1f}",
                f"{common.median(seconds[m]) * 1e3:.0f}",
                f"{common.median(seconds[m]) / base:.2f}x",
                f"{losses[m]:.6f}",
            ]
        )
    table = common.markdown_table(headers, rows)
    print(table, flush=True)
    from configs import common as configs_common

    cfg = configs_common.lm_experiment(size=args.size)
    batch = args.batch_size or cfg.train.batch_size
    model_cfg = lm.LMConfig.from_config(cfg.model)
    body = "\n".join(
        [
            table,
            "",
            f"`configs.common.lm_experiment(size={args.size!r})` ({lm.param_count(model_cfg) / 1e6:.2f}M params), "
            f"fp32, batch {batch} x seq {cfg.train.seq_len}, on {jax.device_count()} simulated CPU devices "
            f"(`--xla_force_host_platform_device_count`) sharing {common.num_cores()} cores; only `config.mesh` "
            "differs between rows. Memory = bytes of one device's shards of params + AdamW state (max over devices; "
            "total = all of it), and XLA's temporary buffers of the compiled step per device (activations, "
            f"gradients, collectives' scratch). Step time: median of {args.steps} rounds after 2 warm-ups, the "
            "modes interleaved within each round. On simulated devices the collectives are memory copies and all 8 "
            "'devices' share the same cores, so the step-time ratios say what the sharding costs in extra work and "
            "copies on one host, not how the modes scale on real accelerators.",
        ]
    )
    entry = common.Entry(
        title=f"Sharding modes: {args.size}, {jax.device_count()} simulated CPU devices",
        command=common.command_line("scripts.bench.sharding", argv),
        versions={"jax": jax.__version__, "python": sys.version.split()[0]},
        body=body,
        contention=monitor.note(),
    )
    common.publish(entry, append_to_file=not args.no_append)


if __name__ == "__main__":
    main()
