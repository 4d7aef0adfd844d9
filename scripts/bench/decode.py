"""Decode throughput: Lumen `generate` vs Hugging Face `generate` (PyTorch, CPU) on the same random Llama, and the
cost of a no-op logits processor in Lumen.

COMMAND: .venv/bin/python -m scripts.bench.decode --hf-python .venv-parity/bin/python
         .venv/bin/python -m scripts.bench.decode --lumen_only   # the processor's cost alone (no torch needed)
RUNTIME: ~2 min on a 2-core CPU (tiny only; `--sizes tiny,small` ~5 min); `--lumen_only` ~1 min.
EXPECT: identical greedy tokens on both sides; the target is Lumen >= 3x HF tokens/s on `tiny`, and a no-op
logits processor costing <= 10% of a call (same tokens).

One random `LlamaForCausalLM` per size is built by transformers and saved as safetensors; Lumen loads that same
folder with `load_hf_checkpoint`. Both decode the same prompts greedily in fp32, exactly `--max_new_tokens` each
(no early stop: Lumen `stop_tokens=()`, HF `eos_token_id=None`, `min_new_tokens=max_new_tokens`). A call's time is
the wall seconds of the whole call (prefill included). The two sides alternate: `--runs` rounds of one HF call then
one Lumen call, never at the same time, each timed call after an untimed call of its own side (the first compiles
Lumen). Each round's ratio (HF seconds / Lumen seconds) compares them under the same machine conditions; the table
reports the median ratio and its range, and tokens/s from each side's median call. On the shared VMs we run on, the
machine's speed drifts over minutes (Lumen's batch-8 call took 0.14 s in one process and 0.27 s in another on
2026-11-24, while a 2048^2 matmul held 160-173 GFLOP/s), so timing one side's runs and then the other's a minute
later compared different machines. torch uses as many threads as there are cores; XLA:CPU always uses every core.

If `import torch, transformers` works here, the HF side runs in this process; otherwise it runs in
`--hf_python` (a Python with torch + transformers, e.g. .venv-parity) as `hf_decode_worker.py`, which needs
neither JAX nor Lumen and answers one timed call per request.

The processor's cost is measured the same way, Lumen against Lumen: rounds of one call with
`logits_processors=(noop_processor,)` (which makes the decode loop carry and update the [B, T + N] token buffer that
processors read) then one without, each after an untimed call of its own; the overhead is the median of the rounds'
ratios minus one, in wall time and in the process's CPU time (all threads), which other processes competing for the
cores disturb less. `--lumen_only` skips HF: the model is then `lm.init` of the same converted config (random weights
of the same shapes; the timing depends only on them).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import pathlib
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from scripts.bench import common, hf_decode_worker

_LLAMA_BASE = dict(
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    initializer_range=0.02,
)
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=768,
        vocab_size=512,
    ),
    "small": dict(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=1536,
        vocab_size=4096,
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="tiny", help=f"comma-separated, from {sorted(SIZES)}")
    p.add_argument("--batch_sizes", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=7, help="timed rounds per case (HF call, then Lumen call)")
    p.add_argument("--threads", type=int, default=common.num_cores(), help="torch threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hf_python", "--hf-python", default=None, help="a Python with torch+transformers (subprocess)")
    p.add_argument("--no_append", action="store_true", help="print only; do not write BENCHMARKS.md")
    p.add_argument("--lumen_only", action="store_true", help="only the no-op processor's cost (no HF, no torch)")
    args = p.parse_args(argv)
    unknown = [s for s in args.sizes.split(",") if s not in SIZES]
    if unknown:
        p.error(f"--sizes: unknown {unknown}; choose from {sorted(SIZES)}")
    if args.runs < 1 or args.prompt_len < 2 or args.max_new_tokens < 1:
        p.error("--runs and --max_new_tokens must be >= 1, --prompt_len >= 2")
    return args


def _torch_here() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "safetensors"))


class _HFWorker:
    """The HF side as a subprocess of `hf_python` running `hf_decode_worker.py` (one JSON line per request)."""

    def __init__(self, request: dict[str, Any], hf_python: str, tmp: str):
        req = pathlib.Path(tmp, "request.json")
        req.write_text(json.dumps(request))
        self.cmd = [hf_python, hf_decode_worker.__file__, "--request", str(req)]
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._reply()

    def _reply(self) -> dict[str, Any]:
        for line in self.proc.stdout:  # anything a library prints on stdout is skipped
            if line.startswith("{"):
                return json.loads(line)
        raise SystemExit(f"HF worker exited with {self.proc.wait()} ({shlex.join(self.cmd)}); see its stderr above")

    def time_once(self, batch: str) -> dict[str, Any]:
        self.proc.stdin.write(batch + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


@contextlib.contextmanager
def hf_side(request: dict[str, Any], hf_python: str | None):
    """Yields (session with `time_once(batch)`, versions info, where it runs): in process when torch is importable
    here, else a worker in `hf_python`."""
    if hf_python is None and _torch_here():
        session = hf_decode_worker.Session(request)
        yield session, session.versions(), "in-process"
        return
    if hf_python is None:
        raise SystemExit(
            "torch/transformers are not importable in this Python; pass --hf_python PATH of one that has them "
            "(e.g. --hf_python .venv-parity/bin/python)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        worker = _HFWorker(request, hf_python, tmp)
        try:
            yield worker, worker.info, f"subprocess {hf_python}"
        finally:
            worker.close()


def noop_processor(logits_BV, tokens_BS, lengths_B):
    """A logits processor that changes nothing: what remains is the cost of having one (the token buffer)."""
    return logits_BV


def lumen_side(cfg, params, prompts: dict[str, list[list[int]]], max_new_tokens: int, logits_processors=()):
    """`time_once(batch)` -> {"seconds", "tokens"} of one greedy Lumen `generate` call on `prompts[batch]`."""
    import jax

    from framework.inference import generate

    def time_once(batch: str) -> dict[str, Any]:
        tokens_BT = np.asarray(prompts[batch], np.int32)
        t0, cpu0 = time.perf_counter(), time.process_time()
        out = generate(
            params,
            cfg,
            tokens_BT,
            max_new_tokens=max_new_tokens,
            stop_tokens=(),
            logits_processors=logits_processors,
        )
        jax.block_until_ready(out.tokens)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
        if int(np.min(out.lengths)) != max_new_tokens:
            raise RuntimeError(f"Lumen generated {np.asarray(out.lengths)} tokens, expected {max_new_tokens} each")
        return {"seconds": seconds, "cpu_seconds": cpu_seconds, "tokens": np.asarray(out.tokens).tolist()}

    return time_once


def alternate(first, second, batch: str, rounds: int) -> dict[str, list]:
    """`rounds` rounds of one `first` call then one `second` call on `batch` (never at the same time), each timed
    call after an untimed one of its own side; ratios = first s / second s per round, under the same conditions."""
    out = {"first_s": [], "second_s": []}
    for _ in range(rounds):
        # Each side's timed call follows an untimed one of its own: timed right after the other side's call, HF's
        # batch-1 call took 0.66 s instead of 0.42 s (likely cold caches and the other side's threads still awake).
        first(batch)
        a = first(batch)
        second(batch)
        b = second(batch)
        out["first_s"].append(a["seconds"])
        out["second_s"].append(b["seconds"])
        if "cpu_seconds" in a and "cpu_seconds" in b:  # in-process sides: CPU time (all threads) as well
            out.setdefault("cpu_ratios", []).append(a["cpu_seconds"] / b["cpu_seconds"])
        out["first_tokens"], out["second_tokens"] = a["tokens"], b["tokens"]
    out["ratios"] = [a / b for a, b in zip(out["first_s"], out["second_s"])]
    return out


def interleaved(hf, lumen, batch: str, rounds: int) -> dict[str, list]:
    """`rounds` rounds of one HF call then one Lumen call on `batch` (`alternate`): each round's ratio (HF s /
    Lumen s) compares the two under the same machine conditions, which drift on a shared VM over minutes."""
    r = alternate(hf.time_once, lumen, batch, rounds)
    return {
        "hf_s": r["first_s"],
        "lumen_s": r["second_s"],
        "hf_tokens": r["first_tokens"],
        "lumen_tokens": r["second_tokens"],
        "ratios": r["ratios"],
    }


def processor_row(size: str, b: int, with_noop, plain, rounds: int) -> list[Any]:
    """One row of the processor table: Lumen with a no-op processor against Lumen without, alternated."""
    r = alternate(with_noop, plain, str(b), rounds)
    cpu = r.get("cpu_ratios")
    return [
        size,
        b,
        _spread(r["second_s"]),
        _spread(r["first_s"]),
        f"{common.median(r['ratios']) - 1:+.1%}",
        f"{min(r['ratios']) - 1:+.1%} to {max(r['ratios']) - 1:+.1%}",
        f"{common.median(cpu) - 1:+.1%}" if cpu else "n/a",
        "yes" if r["first_tokens"] == r["second_tokens"] else "NO",
    ]


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[int, float]:
    """(steps identical in every row before the first difference, fraction of equal positions)."""
    a_BN, b_BN = np.asarray(a), np.asarray(b)
    same_N = np.all(a_BN == b_BN, axis=0)
    prefix = int(np.argmin(same_N)) if not same_N.all() else same_N.size
    return prefix, float(np.mean(a_BN == b_BN))


def _prompts(llama: dict[str, Any], batch_sizes: list[int], args: argparse.Namespace) -> dict[str, list[list[int]]]:
    rng = np.random.default_rng(args.seed)
    prompts = {}
    for b in batch_sizes:  # BOS, then random ids past the special tokens; equal lengths, so no padding anywhere
        body = rng.integers(3, llama["vocab_size"], size=(b, args.prompt_len - 1))
        prompts[str(b)] = np.concatenate([np.full((b, 1), llama["bos_token_id"]), body], axis=1).tolist()
    return prompts


def bench_size(size: str, args: argparse.Namespace) -> tuple[list[list[Any]], list[list[Any]], dict[str, Any]]:
    """Both sides on one model size; returns the HF table's rows, the processor table's rows and the HF side's
    info (versions, threads, where)."""
    from framework.models.hf import load_hf_checkpoint

    llama = {**_LLAMA_BASE, **SIZES[size]}
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    prompts = _prompts(llama, batch_sizes, args)
    rows, proc_rows = [], []
    with tempfile.TemporaryDirectory() as ckpt_dir:
        request = dict(
            llama_config=llama,
            seed=args.seed,
            out_dir=ckpt_dir,
            prompts=prompts,
            max_new_tokens=args.max_new_tokens,
            threads=args.threads,
        )
        with hf_side(request, args.hf_python) as (hf, info, where):
            info = {**info, "where": where}
            cfg, params = load_hf_checkpoint(ckpt_dir)
            lumen = lumen_side(cfg, params, prompts, args.max_new_tokens)
            noop = lumen_side(cfg, params, prompts, args.max_new_tokens, (noop_processor,))
            for b in batch_sizes:
                r = interleaved(hf, lumen, str(b), args.runs)
                tps = lambda s: b * args.max_new_tokens / s  # noqa: E731
                prefix, frac = agreement(r["hf_tokens"], r["lumen_tokens"])
                rows.append(
                    [
                        size,
                        b,
                        f"{tps(common.median(r['hf_s'])):.0f}",
                        f"{tps(common.median(r['lumen_s'])):.0f}",
                        f"{common.median(r['ratios']):.2f}x",
                        f"{min(r['ratios']):.2f}-{max(r['ratios']):.2f}x",
                        f"{prefix}/{args.max_new_tokens}",
                        f"{frac:.1%}",
                        _spread(r["hf_s"]),
                        _spread(r["lumen_s"]),
                    ]
                )
            for b in batch_sizes:
                proc_rows.append(processor_row(size, b, noop, lumen, args.runs))
    return rows, proc_rows, info


def bench_size_lumen_only(size: str, args: argparse.Namespace) -> list[list[Any]]:
    """The processor table's rows for one size, on `lm.init` weights of the converted config (no HF side)."""
    import jax

    from framework.models import lm
    from framework.models.hf_families import hf_config_to_lm_config

    llama = {**_LLAMA_BASE, **SIZES[size]}
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    prompts = _prompts(llama, batch_sizes, args)
    cfg = hf_config_to_lm_config({"model_type": "llama", **llama})
    params = lm.init(cfg, jax.random.key(args.seed))
    lumen = lumen_side(cfg, params, prompts, args.max_new_tokens)
    noop = lumen_side(cfg, params, prompts, args.max_new_tokens, (noop_processor,))
    return [processor_row(size, b, noop, lumen, args.runs) for b in batch_sizes]


HEADERS = ["size", "batch", "HF tok/s", "Lumen tok/s", "Lumen / HF", "per round (min-max)"]
HEADERS += ["identical greedy steps", "equal tokens"]
HEADERS += ["HF s/call (min-max)", "Lumen s/call (min-max)"]
PROC_HEADERS = ["size", "batch", "Lumen s/call (min-max)", "with a no-op processor", "processor overhead"]
PROC_HEADERS += ["per round (min-max)", "overhead in CPU time", "same tokens"]


def _spread(seconds: list[float]) -> str:
    return f"{common.median(seconds):.3f} ({min(seconds):.3f}-{max(seconds):.3f})"


def _processor_note(args: argparse.Namespace) -> str:
    return (
        f"No-op logits processor: Lumen `generate(..., logits_processors=(noop_processor,))` against the same call "
        f"without it, greedy, prompt {args.prompt_len} tokens, exactly {args.max_new_tokens} new tokens; {args.runs} "
        f"rounds of one call with it then one without, each after an untimed call of its own; overhead = the median "
        f"of the rounds' ratios (with / without) - 1, of wall time and of the process's CPU time (all threads; "
        f"steadier than wall time when other processes compete for the cores)."
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    monitor = common.ContentionMonitor()
    import jax

    shapes = "; ".join(f"{s}: {_describe(s)}" for s in args.sizes.split(","))
    machine = f"XLA:CPU on all {common.num_cores()} cores ({jax.devices()[0].device_kind})"
    versions = {"jax": jax.__version__, "python": sys.version.split()[0]}
    if args.lumen_only:
        proc_rows = []
        for size in args.sizes.split(","):
            proc_rows += bench_size_lumen_only(size, args)
        print(common.markdown_table(PROC_HEADERS, proc_rows), flush=True)
        body = "\n".join(
            [
                common.markdown_table(PROC_HEADERS, proc_rows),
                "",
                f"Random Llama-shaped Lumen model (`lm.init`; {shapes}), fp32. {_processor_note(args)} {machine}.",
            ]
        )
        _publish(
            "Decode: cost of a no-op logits processor in Lumen generate (CPU)", body, versions, args, argv, monitor
        )
        return

    rows, proc_rows, hf = [], [], None
    for size in args.sizes.split(","):
        size_rows, size_proc_rows, hf = bench_size(size, args)
        rows += size_rows
        proc_rows += size_proc_rows
        print(common.markdown_table(HEADERS, size_rows), flush=True)
        print(common.markdown_table(PROC_HEADERS, size_proc_rows), flush=True)
    body = "\n".join(
        [
            common.markdown_table(HEADERS, rows),
            "",
            f"Random Llama ({shapes}), fp32, greedy, prompt {args.prompt_len} tokens, exactly {args.max_new_tokens} "
            f"new tokens (no early stop); tok/s = batch x new tokens / wall time of the whole call, prefill included; "
            f"{args.runs} rounds of one HF call then one Lumen call, each after an untimed call of its own side "
            f"(the first compiles Lumen); "
            f"tok/s from each side's median call, Lumen / HF = the median of the rounds' ratios (HF s / Lumen s). "
            f"HF: `model.generate`, default "
            f"dynamic KV cache, torch threads = {hf['torch_threads']}, run {hf['where']}. Lumen: "
            f"`framework.inference.generate` on `load_hf_checkpoint` of the same folder, {machine}.",
            "",
            common.markdown_table(PROC_HEADERS, proc_rows),
            "",
            _processor_note(args),
        ]
    )
    versions = {
        "jax": jax.__version__,
        "torch": hf["versions"]["torch"],
        "transformers": hf["versions"]["transformers"],
        "python (Lumen/HF)": f"{sys.version.split()[0]}/{hf['versions']['python']}",
    }
    _publish("Decode: Lumen generate vs HF generate (CPU)", body, versions, args, argv, monitor)


def _publish(title: str, body: str, versions: dict, args: argparse.Namespace, argv, monitor) -> None:
    """Prints this run's BENCHMARKS.md section and (unless --no_append) writes it in place of the old one."""
    command = common.command_line("scripts.bench.decode", argv)
    entry = common.Entry(title=title, command=command, versions=versions, body=body, contention=monitor.note())
    common.publish(entry, append_to_file=not args.no_append)


def _describe(size: str) -> str:
    s = SIZES[size]
    return (
        f"hidden {s['hidden_size']}, {s['num_hidden_layers']} layers, {s['num_attention_heads']} heads / "
        f"{s['num_key_value_heads']} kv, mlp {s['intermediate_size']}, vocab {s['vocab_size']}"
    )


if __name__ == "__main__":
    main()
