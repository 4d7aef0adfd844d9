"""VLM speed: decode tokens/s with an image in the prompt vs text-only once the prefill is done; the ViT's train-step MFU.

COMMAND: .venv/bin/python -m scripts.bench.vlm [--batch 8] [--rounds 5] [--no-append]
RUNTIME: ~2-4 min on a 2-core CPU (compiles included).

Decode: the `vlm` study's model (configs/vlm/common.py) generates greedily with no stop token from three prompt
sets of B rows: image prompts (N = 32 placeholders + BOS + "value:"), text prompts of the same length, and short text
prompts. Each set runs `vlm.generate` with N1 and N2 > N1 new tokens in interleaved rounds; decode tokens/s is
B * (N2 - N1) / (min t(N2) - min t(N1)), so the prefill (and the encoder) cancel out and what remains is the
per-token loop over a cache whose first slots hold image tokens or text. Minima over rounds, not medians: on a
shared machine the difference of two medians of short calls is dominated by other processes.

MFU: the encoder's train step (AdamW on a per-patch regression head, the loop's `make_train_step`), model FLOPs =
3 x `vision.flops_per_image` x batch, against this machine's best fp32 matmul FLOP/s measured in the same rounds
(as scripts/bench/train_step.py does for the LM).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from scripts.bench import common
from scripts.bench.train_step import make_matmul


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", default="8,88", help="N1,N2: the two decode lengths whose difference is timed")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--vit-batch", type=int, default=64)
    ap.add_argument("--matmul-sizes", default="512,1024")
    ap.add_argument("--no-append", action="store_true", help="print the entry without writing BENCHMARKS.md")
    return ap.parse_args(argv)


def decode_rates(cfg, params, batch: int, n1: int, n2: int, rounds: int) -> dict[str, tuple[float, float]]:
    """(decode tokens per wall second, per CPU second of this process) per prompt kind, from the difference of two
    generation lengths."""
    import jax

    from framework.models import vlm
    from framework.tasks import render

    rng = np.random.default_rng(0)
    images = np.stack([render.render_expression("3+4*2", seed=b) for b in range(batch)])
    image_prompt = vlm.prompt_tokens(cfg, render.TEXT_TOKENIZER.encode("value:"), with_image=True)
    kinds = {
        "image": (images, [image_prompt] * batch),
        "text, same length": (None, [rng.integers(3, 99, image_prompt.size).astype(np.int32)] * batch),
        "text, short": (None, [rng.integers(3, 99, 7).astype(np.int32)] * batch),
    }

    def run(kind, n):
        imgs, prompts = kinds[kind]
        out = vlm.generate(params, cfg, imgs, prompts, max_new_tokens=n, stop_tokens=())
        jax.block_until_ready(out.tokens)

    times = {(k, n): [] for k in kinds for n in (n1, n2)}
    cpu = {key: [] for key in times}
    for key in times:  # compile and warm every case
        run(*key)
    for _ in range(rounds):
        for key in times:
            t0, c0 = time.perf_counter(), time.process_time()
            run(*key)
            times[key].append(time.perf_counter() - t0)
            cpu[key].append(time.process_time() - c0)
    rate = lambda t, k: batch * (n2 - n1) / (min(t[k, n2]) - min(t[k, n1]))  # noqa: E731
    return {k: (rate(times, k), rate(cpu, k)) for k in kinds}


def vit_step(cfg, batch: int):
    """A blocking call of one jitted encoder train step (AdamW via the loop's step) and its model FLOPs."""
    import jax
    import jax.numpy as jnp

    from configs import common as cfg_common
    from framework.models import vision
    from framework.training import loop, optim

    tc = cfg_common.train_config(steps=100, warmup_steps=1)
    vc = cfg.vision
    rng = jax.random.key(0)
    params = {"vit": vision.init(vc, rng), "head": 0.02 * jax.random.normal(rng, (vc.d_model, 4))}
    images = jnp.asarray(
        np.random.default_rng(0).uniform(-1, 1, (batch, vc.image_height, vc.image_width, 1)), jnp.float32
    )
    target = jnp.asarray(np.random.default_rng(1).normal(size=(batch, vc.num_patches, 4)), jnp.float32)

    def loss_fn(p, b):
        pred = vision._apply(p["vit"], b["images"], vc) @ p["head"]
        return jnp.mean((pred - b["target"]) ** 2), {}

    tx = optim.make_optimizer(tc)
    holder = {"state": loop.init_train_state(params, tx, rng)}
    step = jax.jit(loop.make_train_step(loss_fn, tx, optim.lr_schedule(tc)), donate_argnums=0)
    data = {"images": images, "target": target}

    def one():
        holder["state"], metrics = step(holder["state"], data)
        jax.block_until_ready(metrics)

    return one, 3 * vision.flops_per_image(vc) * batch


def main(argv=None) -> None:
    args = parse_args(argv)
    monitor = common.ContentionMonitor()
    import jax

    from configs.vlm import common as vlm_common
    from experiments import vlm as vlm_exp
    from framework.models import vlm

    cfg = vlm_exp.model_config(vlm_common.vlm_experiment())
    params = vlm.init(cfg, jax.random.key(0))
    n1, n2 = (int(x) for x in args.new_tokens.split(","))
    rates = decode_rates(cfg, params, args.batch, n1, n2, args.rounds)
    base = rates["text, same length"]
    decode_rows = [
        [k, f"{w:,.0f}", f"{w / base[0]:.3f}", f"{c:,.0f}", f"{c / base[1]:.3f}"] for k, (w, c) in rates.items()
    ]
    headers = ["prompt", "decode tok/s (wall)", "vs text, same length", "tok per CPU-s", "vs text, same length"]
    decode_table = common.markdown_table(headers, decode_rows)

    step, flops = vit_step(cfg, args.vit_batch)
    sizes = [int(n) for n in args.matmul_sizes.split(",")]
    matmuls = {n: make_matmul(n) for n in sizes}
    for fn in [step, *matmuls.values()] * 2:
        fn()
    step_s = common.time_runs(step, args.rounds * 4, warmup=0)
    peak = max(2 * n**3 / common.median(common.time_runs(fn, args.rounds, warmup=0)) for n, fn in matmuls.items())
    model = flops / common.median(step_s)
    mfu_table = common.markdown_table(
        ["encoder", "batch", "step (ms)", "model GFLOP/s", "best matmul GFLOP/s", "MFU"],
        [[f"{cfg.vision.n_layers}L d{cfg.vision.d_model} N{cfg.num_image_tokens}", args.vit_batch,
          f"{common.median(step_s) * 1e3:.1f}", f"{model / 1e9:.2f}", f"{peak / 1e9:.1f}", f"{model / peak:.1%}"]],
    )  # fmt: skip
    print(decode_table, "\n", mfu_table, flush=True)
    body = "\n".join(
        [
            decode_table,
            "",
            f"Greedy `vlm.generate`, batch {args.batch}, no stop token; tokens/s = B x ({n2} - {n1}) / (min "
            f"t({n2}) - min t({n1})) over {args.rounds} interleaved rounds, so prefill and encoder cancel; the CPU columns use this "
            f"process's CPU seconds (all its threads) instead of wall seconds, less sensitive to other processes. "
            f"LM: the vlm study's tiny LM (d {cfg.lm.d_model}, {cfg.lm.n_layers} layers).",
            "",
            mfu_table,
            "",
            "Encoder train step (AdamW, per-patch regression head); model FLOPs = 3 x vision.flops_per_image x "
            "batch; MFU against the best fp32 matmul measured in the same run.",
        ]
    )
    entry = common.Entry(
        title="VLM decode with images and ViT train-step MFU (CPU)",
        command=common.command_line("scripts.bench.vlm", argv),
        versions={"jax": jax.__version__, "python": sys.version.split()[0]},
        body=body,
        contention=monitor.note(),
    )
    common.publish(entry, append_to_file=not args.no_append)


if __name__ == "__main__":
    main()
