"""KV-cache memory: the "hidden memory tax" of Llama-2-7B/70B-shaped caches, and the paged allocator's measured waste.

COMMAND: .venv/bin/python -m scripts.bench.kv_cache
RUNTIME: ~20 s on a 2-core CPU (no model runs; the allocator runs on a few thousand sequences).
EXPECT: byte counts exact by construction (`kv_cache_bytes`, tested equal to what `init_cache` allocates); paged waste
falls with the page size, dense pre-allocation wastes most of its slots on short sequences.

Table 1 sizes caches with `framework.inference.kv_cache_bytes` (the function the tests check against real allocations)
for one sequence of 4k/32k/128k tokens: Llama-2-7B shape (32 layers, 32 query heads of 128) and Llama-2-70B shape
(80 layers, 64 query heads of 128), each with MHA (K = H), GQA (K = 8) and MQA (K = 1) kv heads, bf16 and int8
(int8 adds one fp32 scale per token and kv head for K and V). The real Llama-2-7B is MHA, the real 70B GQA-8.

Table 2 runs the page allocator (`kv_cache.allocate` on a `PagePool`) on two length distributions and reports the
share of allocated token slots that hold no token: (a) the arithmetic task's prompt + gold solution lengths
(`sample_problems`, K = 1..8, mod 100), (b) a chat-like log-normal (median 600 tokens, sigma 1.2, capped at 32k).
Dense pre-allocation sizes every sequence for the longest, so its waste is 1 - mean / max.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

from scripts.bench import common

GIB = 1024**3
LLAMA2 = {
    "Llama-2-7B": dict(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, head_dim=128, d_ff=11008),
    "Llama-2-70B": dict(vocab_size=32000, d_model=8192, n_layers=80, n_heads=64, head_dim=128, d_ff=28672),
}
TOKENS = (4096, 32768, 131072)
PAGE_SIZES = (8, 16, 32, 64, 128, 256)


def memory_tax_rows():
    from framework.inference import kv_cache_bytes
    from framework.models import lm

    rows, records = [], []
    for name, shape in LLAMA2.items():
        for attn, K in (("MHA", shape["n_heads"]), ("GQA-8", 8), ("MQA", 1)):
            cfg = lm.LMConfig(n_kv_heads=K, max_seq_len=max(TOKENS), **shape)
            for dtype in ("bfloat16", "int8"):
                gib = [kv_cache_bytes(cfg, 1, t, dtype, "dense") / GIB for t in TOKENS]
                per_token = kv_cache_bytes(cfg, 1, 1, dtype, "dense")
                rows.append([name, attn, K, dtype, f"{per_token / 1024:.1f}"] + [f"{g:.2f}" for g in gib])
                records.append(
                    dict(
                        model=name,
                        attention=attn,
                        kv_heads=K,
                        dtype=dtype,
                        bytes_per_token=per_token,
                        gib={str(t): g for t, g in zip(TOKENS, gib)},
                    )
                )
    return rows, records


def arithmetic_lengths(n: int, seed: int = 0) -> np.ndarray:
    from framework.tasks import arithmetic, tokenizer

    problems = arithmetic.sample_problems(seed, n, num_steps=(1, 8), modulus=100)
    text = [arithmetic.format_prompt(p) + arithmetic.format_solution(p) for p in problems]
    return np.asarray([len(tokenizer.encode(t)) + 2 for t in text])  # + BOS and EOS


def chat_lengths(n: int, seed: int = 0) -> np.ndarray:
    rs = np.random.default_rng(seed)
    return np.clip(np.round(rs.lognormal(np.log(600), 1.2, size=n)), 1, 32768).astype(int)


def measured_waste(lengths: np.ndarray, page_size: int) -> float:
    """Runs the real allocator: every sequence asks for ceil(len / C) pages; waste = empty slots / allocated slots."""
    import jax.numpy as jnp

    from framework.inference import kv_cache

    counts = -(-lengths // page_size)
    pool = kv_cache.PagePool.create(int(counts.sum()))
    pool, pages, ok = kv_cache.allocate(pool, jnp.asarray(counts, jnp.int32), int(counts.max()))
    assert bool(ok) and int(pool.n_free) == 0
    allocated_slots = int((np.asarray(pages) >= 0).sum()) * page_size
    return 1.0 - lengths.sum() / allocated_slots


def waste_rows(n: int):
    rows, records = [], []
    for name, lengths in (("arithmetic (K 1..8)", arithmetic_lengths(n)), ("chat log-normal", chat_lengths(n))):
        dense = 1.0 - lengths.mean() / lengths.max()
        waste = {c: measured_waste(lengths, c) for c in PAGE_SIZES}
        rows.append(
            [name, f"{np.median(lengths):.0f}", f"{lengths.max()}", f"{100 * dense:.1f}%"]
            + [f"{100 * waste[c]:.1f}%" for c in PAGE_SIZES]
        )
        records.append(
            dict(
                workload=name,
                n=n,
                median=float(np.median(lengths)),
                max=int(lengths.max()),
                dense_waste=dense,
                paged_waste={str(c): w for c, w in waste.items()},
            )
        )
    return rows, records


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sequences", type=int, default=4096, help="sequences per workload for the allocator")
    p.add_argument("--json", default="runs/bench/kv_cache.json", help="where to write the figures as JSON")
    p.add_argument("--no_append", action="store_true", help="print only; do not write BENCHMARKS.md")
    args = p.parse_args(argv)

    tax_rows, tax = memory_tax_rows()
    w_rows, waste = waste_rows(args.sequences)
    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(memory_tax=tax, paged_waste=waste), indent=2))

    tax_table = common.markdown_table(
        ["model", "attention", "kv heads", "cache dtype", "KiB/token"] + [f"GiB @ {t // 1024}k" for t in TOKENS],
        tax_rows,
    )
    waste_table = common.markdown_table(
        ["workload", "median len", "max len", "dense waste"] + [f"paged C={c}" for c in PAGE_SIZES], w_rows
    )
    import jax

    body = (
        "KV cache of one sequence (`kv_cache_bytes`, K and V over all layers; int8 includes its fp32 scales):\n\n"
        + tax_table
        + f"\n\nEmpty token slots among those allocated, {args.sequences} sequences per workload (the page allocator "
        "run on their lengths; dense = every sequence pre-allocated at the longest):\n\n"
        + waste_table
        + f"\n\nJSON: `{args.json}`.\n"
    )
    entry = common.Entry(
        title="KV-cache memory tax and paged waste",
        command=common.command_line("scripts.bench.kv_cache", argv),
        versions={"jax": jax.__version__},
        body=body,
    )
    common.publish(entry, append_to_file=not args.no_append)


if __name__ == "__main__":
    main()
