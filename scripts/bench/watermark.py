"""Watermark costs: `generate` with KGW, SynthID or Gumbel against the unwatermarked decode (ratio in one run, the
two sides alternating), and detection throughput of one jitted batch beside `transformers`' detectors.

COMMAND: .venv/bin/python -m scripts.bench.watermark --hf_python .venv-parity/bin/python
         .venv/bin/python -m scripts.bench.watermark --no_hf --rows 2000     # quicker, Lumen only
RUNTIME: ~6 min on a 2-core CPU (defaults).
EXPECT: each scheme's decode within ~1.3x of the unwatermarked decode at batch 1 and 8 (a vocabulary of 4096; the
SynthID processor's cost grows with vocab x depth); detection of 10k x 256 tokens in one call, well ahead of
`transformers`' per-row KGW detector.

Decode: one random model (d 256, 4 layers, vocab 4096), prompts of 16 tokens, 64 new tokens at temperature 1, no
early stop. Each scheme is compiled once, then `--rounds` rounds of one unwatermarked call and one watermarked call
(order alternating between rounds); a round's ratio is watermarked / unwatermarked wall seconds and the table gives
the median ratio and its range, and the median ratio of the process's CPU seconds (steadier than wall time when
other processes share the cores). Detection: `--rows` x 256 random tokens (the prompt's 16 not scored), one call of
`detect` per scheme after a compiling call of the same shape; `transformers`' side runs in `--hf_python` (this file
with `--hf_worker`): SynthID as `compute_g_values` + `compute_context_repetition_mask` + the mean score on the same
tokens (batched torch) on the first `--hf_synthid_rows` rows, its `SynthIDTextWatermarkDetector` (the Bayesian
detector's path) on the same rows beside Lumen's `detect_bayesian`, and KGW as `WatermarkDetector` (one row at a time
in Python) on the first `--hf_kgw_rows` rows, each reported as rows/s (their green lists differ from Lumen's: the
comparison is of throughput on the same token arrays). MarkLLM is not installed in the parity venv, so it is not
compared.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import tempfile
import time

import numpy as np

V, PROMPT, NEW, WIDTH = 4096, 16, 64, 256
KEYS = (654, 400, 836, 123, 340, 443, 597, 160, 57, 29, 590, 639, 13, 715, 468, 990, 966, 226, 324, 585)


def hf_worker(path: str, synthid_rows: int, kgw_rows: int) -> None:
    """Runs under a Python with torch + transformers: times their detectors on the tokens in `path`."""
    import torch
    from transformers import GenerationConfig, WatermarkingConfig
    from transformers.generation.logits_process import SynthIDTextWatermarkLogitsProcessor
    from transformers.generation.watermarking import WatermarkDetector

    torch.set_num_threads(max(1, torch.get_num_threads()))
    tokens = torch.tensor(np.load(path)["tokens"][:synthid_rows], dtype=torch.long)
    proc = SynthIDTextWatermarkLogitsProcessor(
        ngram_len=5,
        keys=list(KEYS),
        sampling_table_size=2**16,
        sampling_table_seed=0,
        context_history_size=1024,
        device="cpu",
    )
    t0 = time.perf_counter()
    g = proc.compute_g_values(tokens)
    mask = proc.compute_context_repetition_mask(tokens)[:, PROMPT - 4 :]
    g = g[:, PROMPT - 4 :]
    score = (g * mask[..., None]).sum((1, 2)) / (g.shape[-1] * mask.sum(1))
    synthid_s = time.perf_counter() - t0
    # The Bayesian path: SynthIDTextWatermarkDetector (EOS mask, repetition mask, g-values, BayesianDetectorModel;
    # its weights untrained: the cost does not depend on them).
    from transformers import BayesianDetectorConfig, BayesianDetectorModel, SynthIDTextWatermarkDetector

    class _Tok:  # the detector reads only eos_token_id from its tokenizer
        eos_token_id = 2

    bayes = SynthIDTextWatermarkDetector(BayesianDetectorModel(BayesianDetectorConfig(len(KEYS))), proc, _Tok())
    with torch.no_grad():
        t0 = time.perf_counter()
        bayes(tokens)
        bayes_s = time.perf_counter() - t0
    cfg = GenerationConfig(watermarking_config=WatermarkingConfig(greenlist_ratio=0.25, bias=2.0))

    class _Cfg:  # WatermarkDetector reads only these fields of the model config
        pad_token_id, bos_token_id, eos_token_id, is_encoder_decoder, vocab_size = 0, 1, 2, False, V

    det = WatermarkDetector(model_config=_Cfg(), device="cpu", watermarking_config=cfg.watermarking_config)
    t0 = time.perf_counter()
    det(tokens[:kgw_rows], z_threshold=4.0)
    kgw_s = time.perf_counter() - t0
    print(
        json.dumps(
            dict(
                synthid_s=synthid_s,
                synthid_rows=len(tokens),
                bayes_s=bayes_s,
                kgw_s=kgw_s,
                kgw_rows=kgw_rows,
                mean_score=float(score.float().mean()),
                torch=torch.__version__,
                threads=torch.get_num_threads(),
            )
        )
    )


def _wanted(name: str, schemes: str) -> bool:
    return not schemes or any(s.strip().lower() in name.lower() for s in schemes.split(","))


def _decode_ratios(args, common):
    import jax

    from framework import watermark as wm
    from framework.inference import generate
    from framework.models import lm

    cfg = lm.LMConfig(
        vocab_size=V, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32, d_ff=768, max_seq_len=512
    )
    params = lm.init(cfg, jax.random.key(0))
    schemes = {
        "KGW(γ=0.25, δ=2, h=1)": ("p", wm.KGW(V)),
        "KGW self-hash h=4": ("p", wm.KGW(V, context_width=4, seeding="self")),
        f"SynthID (depth {len(KEYS)}, n=5)": ("p", wm.SynthID(V, keys=KEYS, ngram_len=5)),
        "Gumbel (h=4)": ("s", wm.Gumbel(V, context_width=4)),
    }
    schemes = {k: v for k, v in schemes.items() if _wanted(k, args.schemes)}
    rows = []
    for batch in args.batches:
        prompts = np.random.default_rng(0).integers(3, V, (batch, PROMPT)).astype(np.int32)

        def call(hook):
            out = generate(
                params, cfg, prompts, max_new_tokens=NEW, temperature=1.0, stop_tokens=(), rng=jax.random.key(1), **hook
            )
            jax.block_until_ready(out.tokens)

        call({})
        for name, (kind, scheme) in schemes.items():
            hook = {"logits_processors": (scheme,)} if kind == "p" else {"sampler": scheme}
            call(hook)
            ratios, cpu_ratios, base_s, mark_s, base_cpu, mark_cpu = [], [], [], [], [], []
            for r in range(args.rounds):
                order = [({}, base_s, base_cpu), (hook, mark_s, mark_cpu)]
                for h, sink, cpu_sink in order if r % 2 == 0 else order[::-1]:
                    t0, c0 = time.perf_counter(), time.process_time()
                    call(h)
                    sink.append(time.perf_counter() - t0)
                    cpu_sink.append(time.process_time() - c0)
                ratios.append(mark_s[-1] / base_s[-1])
                cpu_ratios.append(mark_cpu[-1] / base_cpu[-1])
            rows.append(
                [
                    batch,
                    name,
                    f"{batch * NEW / common.median(base_s):.0f}",
                    f"{batch * NEW / common.median(mark_s):.0f}",
                    f"{common.median(ratios):.2f}x",
                    f"{min(ratios):.2f}-{max(ratios):.2f}",
                    f"{common.median(cpu_ratios):.2f}x",
                ]
            )
            print(rows[-1], flush=True)
    return common.markdown_table(
        ["batch", "scheme", "plain tok/s", "marked tok/s", "median ratio", "range", "CPU-seconds ratio"], rows
    )


def _detection(args, common):
    import jax

    from framework import watermark as wm

    tokens = np.random.default_rng(3).integers(3, V, (args.rows, WIDTH)).astype(np.int32)
    start = np.full(args.rows, PROMPT, np.int32)
    schemes = {
        "KGW": wm.KGW(V),
        "KGW ignore repeats": wm.KGW(V),
        f"SynthID depth {len(KEYS)}": wm.SynthID(V, keys=KEYS, ngram_len=5),
        "Gumbel": wm.Gumbel(V, context_width=4),
    }
    schemes["SynthID Bayesian (trained-detector path)"] = "bayesian"
    rows = []
    for name, scheme in schemes.items():
        if not _wanted(name, args.schemes):
            continue
        if scheme == "bayesian":
            rows.append(_bayesian_detection(args, tokens, start, name))
            continue
        kw = {"ignore_repeated_ngrams": True} if "repeats" in name else {}
        t0 = time.perf_counter()
        jax.block_until_ready(wm.detect(scheme, tokens, None, start, **kw))
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        jax.block_until_ready(wm.detect(scheme, tokens, None, start, **kw))
        s = time.perf_counter() - t0
        rows.append([f"Lumen {name}", args.rows, f"{first:.2f}", f"{s:.2f}", f"{args.rows / s:,.0f}"])
        print(rows[-1], flush=True)
    if not args.no_hf:
        with tempfile.TemporaryDirectory() as d:
            path = pathlib.Path(d) / "tokens.npz"
            np.savez(path, tokens=tokens)
            out = subprocess.run(
                [
                    args.hf_python,
                    __file__,
                    "--hf_worker",
                    str(path),
                    "--hf_synthid_rows",
                    str(args.hf_synthid_rows),
                    "--hf_kgw_rows",
                    str(args.hf_kgw_rows),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
        hf = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(
            [
                f"transformers SynthID (g-values + mask + mean, torch {hf['torch']})",
                hf["synthid_rows"],
                "",
                f"{hf['synthid_s']:.2f}",
                f"{hf['synthid_rows'] / hf['synthid_s']:,.0f}",
            ]
        )
        rows.append(
            [
                "transformers SynthIDTextWatermarkDetector (Bayesian; batched torch)",
                hf["synthid_rows"],
                "",
                f"{hf['bayes_s']:.2f}",
                f"{hf['synthid_rows'] / hf['bayes_s']:,.0f}",
            ]
        )
        rows.append(
            [
                "transformers KGW WatermarkDetector (per row)",
                hf["kgw_rows"],
                "",
                f"{hf['kgw_s']:.2f}",
                f"{hf['kgw_rows'] / hf['kgw_s']:,.0f}",
            ]
        )
    return common.markdown_table(["detector", "rows", "first call s", "call s", "rows/s"], rows)


def _bayesian_detection(args, tokens, start, name):
    """`detect_bayesian` on the same rows: an untrained detector (the cost does not depend on its weights)
    calibrated on the first 1000 rows."""
    import jax
    import jax.numpy as jnp

    from framework import watermark as wm
    from framework.watermark.bayesian import BayesianScorer

    sid = wm.SynthID(V, keys=KEYS, ngram_len=5)
    params = BayesianScorer(sid.depth, sid.g_rate).init(
        jax.random.key(0), jnp.zeros((1, 8, sid.depth)), jnp.ones((1, 8), bool)
    )
    det = wm.BayesianSynthID(sid, jax.device_get(params)).calibrate((tokens[:1000], None, start[:1000]))
    times = []
    for _ in range(2):  # the first call compiles
        t0 = time.perf_counter()
        jax.block_until_ready(wm.detect_bayesian(det, tokens, None, start))
        times.append(time.perf_counter() - t0)
    row = [f"Lumen {name}", args.rows, f"{times[0]:.2f}", f"{times[1]:.2f}", f"{args.rows / times[1]:,.0f}"]
    print(row, flush=True)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--rows", type=int, default=10_000)
    p.add_argument("--hf_python", default=".venv-parity/bin/python")
    p.add_argument("--hf_synthid_rows", type=int, default=1000)
    p.add_argument("--hf_kgw_rows", type=int, default=200)
    p.add_argument("--no_hf", action="store_true")
    p.add_argument("--schemes", default="", help="comma list of name parts to run (e.g. synthid,gumbel); all if empty")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    p.add_argument("--no_detection", action="store_true")
    p.add_argument("--no_decode", action="store_true")
    p.add_argument("--no_record", action="store_true", help="print only; do not write BENCHMARKS.md")
    p.add_argument("--hf_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.hf_worker:
        return hf_worker(args.hf_worker, args.hf_synthid_rows, args.hf_kgw_rows)
    import jax

    from scripts.bench import common

    monitor = common.ContentionMonitor()
    decode = "(not run)" if args.no_decode else _decode_ratios(args, common)
    detection = "(not run)" if args.no_detection else _detection(args, common)
    body = (
        f"Decode ({PROMPT}-token prompts, {NEW} new tokens, temperature 1, vocab {V}; ratio = watermarked / "
        f"plain wall seconds per round, {args.rounds} alternating rounds):\n\n{decode}\n\nDetection of "
        f"{args.rows} x {WIDTH} random tokens (one jitted batch per scheme; first call compiles):\n\n{detection}"
    )
    entry = common.Entry(
        "Watermarks: decode overhead and detection throughput",
        common.command_line("scripts.bench.watermark", argv),
        {"jax": jax.__version__, "numpy": np.__version__},
        body,
        monitor.note(),
    )
    common.publish(entry, append_to_file=not args.no_record)


if __name__ == "__main__":
    main()
