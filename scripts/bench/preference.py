"""DPO training step: Lumen's preference trainer vs TRL's `DPOTrainer` on the same Llama, weights and batch (CPU).

The TRL side runs in the parity venv as a subprocess (`scripts/bench/trl_dpo_worker.py`); it builds a random
`LlamaForCausalLM`, saves it, and Lumen loads that very file (`hf.load_hf_checkpoint`). Both train on the same
token batch (B pairs, a prompt of P tokens, completions of C tokens; no padding, so both score exactly 2·B·(P+C)
tokens per step) with β, AdamW and the learning rate equal and no gradient clipping. The sides alternate: each
round is one TRL step then one Lumen step, each timed alone after untimed warm-up steps; the speed ratio is the
median of the rounds' ratios (TRL s / Lumen s). The first step of both is checked to agree (loss ≈ log 2 with the
policy equal to its reference: Lumen's within 1e-6 of log 2, TRL's within 1e-5 of Lumen's; `logps/chosen` within
1e-4 relative). Both sides run fp32: the worker turns off TRL's default `bf16`, which would autocast the reference's
forward (and only it: the trainer prepares the reference, the timed `training_step` does not prepare the policy). For each reference mode (a frozen
reference model in the step, or reference log-probs precomputed once) the table also gives the compiled Lumen step's
memory (XLA's memory analysis: arguments + temporaries) against the bytes of one copy of the params.

COMMAND: .venv/bin/python -m scripts.bench.preference --no-record
RUNTIME: ~3 min on a busy 2-core CPU.  EXPECT: Lumen >= 2x TRL's tokens/s; with precomputed reference log-probs the
  step's argument bytes drop by one model's params (one model, not two).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import subprocess
import tempfile
import time
from typing import Any

import jax
import numpy as np
import optax

from configs import common as config_common
from experiments import preference
from framework import sharding
from framework.models import hf
from scripts.bench import common

REPO = pathlib.Path(__file__).resolve().parents[2]
WORKER = pathlib.Path(__file__).with_name("trl_dpo_worker.py")
SIZES = {
    "tiny": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=192
    ),
    "small": dict(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=384
    ),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="tiny,small")
    p.add_argument("--batch", type=int, default=8, help="pairs per step")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    p.add_argument("--completion", type=int, default=48, help="completion tokens (chosen and rejected)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: the cores this process may use)")
    p.add_argument("--trl_python", "--trl-python", default=str(REPO / ".venv-parity" / "bin" / "python"))
    p.add_argument("--no-record", dest="record", action="store_false", help="print only; do not edit BENCHMARKS.md")
    return p.parse_args(argv)


def llama_config(size: str) -> dict[str, Any]:
    return dict(
        SIZES[size],
        vocab_size=96,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        hidden_act="silu",
        tie_word_embeddings=False,
        head_dim=SIZES[size]["hidden_size"] // 4,
    )


def token_batch(args, vocab: int, seed: int = 0) -> dict[str, list[list[int]]]:
    rng = np.random.default_rng(seed)

    def draw(n, eos):
        ids = rng.integers(3, vocab, (args.batch, n))
        if eos:
            ids[:, -1] = 2  # completions end with EOS, as DPOTrainer's data do
        return ids.tolist()

    return {
        "prompt_ids": draw(args.prompt, False),
        "chosen_ids": draw(args.completion, True),
        "rejected_ids": draw(args.completion, True),
    }


class TRLWorker:
    """The TRL side: a subprocess answering one JSON line (seconds, loss, metrics) per step."""

    def __init__(self, request: dict[str, Any], python: str, tmp: str):
        req = pathlib.Path(tmp, "request.json")
        req.write_text(json.dumps(request))
        self.cmd = [python, str(WORKER), "--request", str(req)]
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._reply()

    def _reply(self) -> dict[str, Any]:
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise SystemExit(f"TRL worker exited with {self.proc.wait()} ({shlex.join(self.cmd)}); see its stderr")

    def step(self) -> dict[str, Any]:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def lumen_side(folder: str, batch: dict[str, list], *, beta: float, lr: float, precompute: bool):
    """(step() -> (seconds, metrics), memory analysis of the compiled step, param bytes) of Lumen's trainer."""
    cfg, params = hf.load_hf_checkpoint(folder, scan_layers=False)
    prompt = np.asarray(batch["prompt_ids"], np.int32)
    arrays = {}
    for side in ("chosen", "rejected"):
        comp = np.asarray(batch[f"{side}_ids"], np.int32)
        arrays[f"{side}_tokens"] = np.concatenate([prompt, comp], 1)
        arrays[f"{side}_mask"] = np.concatenate([np.zeros_like(prompt), np.ones_like(comp)], 1).astype(np.float32)
    B = len(prompt)
    data = preference.PairData.make(arrays, B, 0)
    mesh_cfg = config_common.mesh_config(data=1)
    mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:1])
    rules = sharding.rules_from_config(mesh_cfg)
    task = preference.preference_task(
        cfg,
        params,
        data,
        kind="sigmoid",
        hparams=dict(beta=beta),
        precompute_ref_logps=precompute,
        mesh=mesh,
        rules=rules,
    )
    from framework.training import loop

    tx = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)  # torch AdamW's defaults, as TRL's
    # Its own buffers: the old state is donated each step, and the reference (frozen) must survive that.
    state = jax.jit(lambda rng: loop.init_train_state(task.init_params(rng), tx, rng))(jax.random.key(0))
    with_frozen = task.frozen is not None
    step_fn = jax.jit(loop.make_train_step(task.loss_fn, tx, None, with_frozen=with_frozen), donate_argnums=0)
    host = next(iter(task.batches(0)))
    dev_batch = {k: jax.device_put(v) for k, v in host.items()}
    extra = (jax.device_put(task.frozen),) if with_frozen else ()
    mem = step_fn.lower(state, dev_batch, *extra).compile().memory_analysis()
    holder = {"state": state}

    def step():
        t0 = time.perf_counter()
        holder["state"], metrics = step_fn(holder["state"], dev_batch, *extra)
        metrics = jax.block_until_ready(metrics)
        return time.perf_counter() - t0, {k: float(v) for k, v in metrics.items()}

    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    return step, mem, param_bytes


def bench_mode(size: str, precompute: bool, args, tmp: str) -> tuple[list[Any], dict[str, Any], dict[str, str]]:
    llama = llama_config(size)
    batch = token_batch(args, llama["vocab_size"])
    folder = str(pathlib.Path(tmp, f"{size}_{int(precompute)}"))
    beta, lr = 0.1, 1e-4
    request = dict(
        llama_config=llama,
        seed=0,
        out_dir=folder,
        batch=batch,
        beta=beta,
        lr=lr,
        precompute_ref_logps=precompute,
        threads=args.threads or common.num_cores(),
    )
    trl = TRLWorker(request, args.trl_python, tmp)
    try:
        step, mem, param_bytes = lumen_side(folder, batch, beta=beta, lr=lr, precompute=precompute)
        first_trl, (_, first_lumen) = trl.step(), step()
        check = {
            "loss (TRL, Lumen)": (first_trl["loss"], first_lumen["loss"]),
            "logps/chosen (TRL, Lumen)": (first_trl["metrics"]["logps/chosen"], first_lumen["logps/chosen"]),
        }
        # both sides fp32 (the worker turns off TRL's default bf16, which autocasts its prepared reference only)
        np.testing.assert_allclose(first_lumen["loss"], np.log(2.0), atol=1e-6)
        np.testing.assert_allclose(first_lumen["loss"], first_trl["loss"], atol=1e-5)
        np.testing.assert_allclose(first_lumen["logps/chosen"], first_trl["metrics"]["logps/chosen"], rtol=1e-4)
        for _ in range(args.warmup - 1):
            trl.step(), step()
        t_trl, t_lumen = [], []
        for _ in range(args.rounds):  # alternate: one TRL step, then one Lumen step
            t_trl.append(trl.step()["seconds"])
            t_lumen.append(step()[0])
    finally:
        trl.close()
    tokens = 2 * args.batch * (args.prompt + args.completion)
    ratios = [a / b for a, b in zip(t_trl, t_lumen)]
    mode = "precomputed" if precompute else "reference model"
    row = [
        size,
        mode,
        f"{tokens / common.median(t_trl):,.0f}",
        f"{tokens / common.median(t_lumen):,.0f}",
        f"{common.median(ratios):.2f}x",
        f"{mem.argument_size_in_bytes / 2**20:.2f}",
        f"{mem.temp_size_in_bytes / 2**20:.2f}",
        f"{param_bytes / 2**20:.2f}",
    ]
    return row, check, trl.info


def main(argv=None) -> None:
    args = parse_args(argv)
    monitor = common.ContentionMonitor()
    rows, checks, info = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            for precompute in (False, True):
                row, check, info = bench_mode(size, precompute, args, tmp)
                rows.append(row)
                checks[f"{size}/{row[1]}"] = check
                print(common.markdown_table(HEADERS, [row]), flush=True)
    body = "\n".join(
        [
            common.markdown_table(HEADERS, rows),
            "",
            f"B = {args.batch} pairs, prompt {args.prompt} + completion {args.completion} tokens, fp32, DPO (sigmoid, "
            f"β = 0.1), AdamW lr 1e-4, no clipping; {args.rounds} rounds of one TRL step then one Lumen step after "
            f"{args.warmup} untimed steps each; tokens/s from each side's median step, ratio = median of the rounds' "
            "ratios. Lumen step memory: XLA's memory analysis of the compiled step (arguments: params, AdamW moments, "
            "batch and, with a reference model, its params; temporaries). First-step agreement: "
            + "; ".join(
                f"{k}: loss {v['loss (TRL, Lumen)'][0]:.6f} vs {v['loss (TRL, Lumen)'][1]:.6f}, logps/chosen "
                f"{v['logps/chosen (TRL, Lumen)'][0]:.4f} vs {v['logps/chosen (TRL, Lumen)'][1]:.4f}"
                for k, v in checks.items()
            ),
        ]
    )
    versions = dict(info, jax=jax.__version__)
    entry = common.Entry(
        "DPO train step vs TRL", common.command_line("scripts.bench.preference", argv), versions, body, monitor.note()
    )
    common.publish(entry, append_to_file=args.record)


HEADERS = [
    "size",
    "reference",
    "TRL tok/s",
    "Lumen tok/s",
    "Lumen / TRL",
    "Lumen args MiB",
    "Lumen temp MiB",
    "one model MiB",
]

if __name__ == "__main__":
    main()
