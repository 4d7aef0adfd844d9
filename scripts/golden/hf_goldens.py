"""Generate golden Hugging Face fixtures (Llama, Qwen2, Mistral, Gemma, Gemma-2) with real `transformers` (CPU, fp32).

Builds tiny random `<Family>ForCausalLM` models with fixed seeds, saves each as a safetensors checkpoint
plus reference logits, so `tests/test_hf.py` can check Lumen's HF loader + model without torch.

COMMAND: /work/main/.venv-parity/bin/python scripts/golden/hf_goldens.py --out tests/assets/hf
SETUP:   python3 -m venv .venv-parity && .venv-parity/bin/pip install torch==2.13.0 transformers safetensors numpy
RUNTIME: ~1 min on a busy 2-core CPU (mostly importing torch).  EXPECT: ten case folders, ~4 MB in total
         (one case only: --cases llama_nopad).

Each case folder `<out>/<case>/` holds:
  config.json, model.safetensors (or model.safetensors.index.json + shards)  -- from `save_pretrained`
  golden.safetensors   -- input_ids int32 [2, 17], logits float32 [2, 17, vocab] from `model(input_ids).logits`,
                          greedy_tokens int32 [2, 12] from HF `generate` (greedy) on input_ids[:, :8]
  golden.json          -- transformers/torch versions, seed, and a few summary numbers
`llama_gqa/` additionally holds a tiny offline-trained `tokenizer.json` (BPE on arithmetic strings), `llama_nopad/` a
2048-token byte-level BPE `tokenizer.json` trained offline on standard-library sources.

`--verify-export DIR` instead loads each `DIR/<case>/` (a folder Lumen's `save_hf_checkpoint` wrote from the golden
case of that name) with `AutoModelForCausalLM` and prints max |logits - golden| and whether HF greedy tokens match:
  .venv/bin/python -c "from framework.models import hf; [hf.save_hf_checkpoint(*hf.load_hf_checkpoint(
      f'tests/assets/hf/{c}')[::-1], f'/tmp/export/{c}') for c in ('llama_gqa', 'gemma2_softcap')]"
  .venv-parity/bin/python scripts/golden/hf_goldens.py --verify-export /tmp/export

`--save-logits DIR` writes transformers' logits of each Lumen-exported `DIR/<case>/` on the case's golden input_ids
into `<out>/<case>/<--logits-name>` (the quantised-export fixture of tests/test_hf_export.py; its docstring has the
commands).

This script must never import jax or Lumen: it is the independent reference.
"""

from __future__ import annotations

import argparse
import inspect
import json
import pathlib
import shutil
from typing import Any

import numpy as np
import safetensors.numpy
import torch
import transformers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

# model_type -> (config class, model class); the case name's prefix (before "_") picks the family.
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "gemma": (GemmaConfig, GemmaForCausalLM),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM),
}

BATCH, SEQ = 2, 17
GREEDY_PROMPT, GREEDY_NEW = 8, 12  # greedy_tokens: HF generate's continuation of input_ids[:, :8]
WEIGHT_STD = 0.2  # large enough that logits are O(1..10), so a 1e-4 parity check means something

_BASE: dict[str, Any] = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    vocab_size=96,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
)

# case name -> (config overrides, save_pretrained kwargs, seed)
CASES: dict[str, tuple[dict[str, Any], dict[str, Any], int]] = {
    # GQA (4 query heads share 2 kv heads), untied lm_head, default rope_theta.
    "llama_gqa": (dict(num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=False), {}, 1234),
    # MHA, tied embeddings, Llama-3 style rope_theta, a different d_ff, eps and a list of eos ids.
    "llama_tied": (
        dict(
            num_key_value_heads=4,
            rope_theta=500000.0,
            tie_word_embeddings=True,
            intermediate_size=96,
            rms_norm_eps=1e-5,
            eos_token_id=[2, 3],
        ),
        {},
        2345,
    ),
    # MQA (1 kv head), 3 layers, explicit head_dim != hidden/heads, saved as several shards.
    "llama_sharded": (
        dict(
            num_key_value_heads=1,
            num_hidden_layers=3,
            head_dim=32,
            rope_theta=10000.0,
            tie_word_embeddings=False,
            vocab_size=80,
        ),
        {"max_shard_size": "100KB"},
        3456,
    ),
    # Qwen2: q/k/v biases (random, not zero), GQA, untied.
    "qwen2_bias": (dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=1e6), {}, 4567),
    # Mistral: a sliding window (5) shorter than the 17-token input and the 8 + 12 greedy continuation.
    "mistral_window": (
        dict(num_key_value_heads=2, sliding_window=5, tie_word_embeddings=False, head_dim=16),
        {},
        5678,
    ),
    # Gemma: GeGLU (tanh), RMSNorm (1 + w), embeddings x sqrt(64), head_dim 24 != 64 / 4, tied, MQA.
    "gemma_geglu": (
        dict(num_key_value_heads=1, head_dim=24, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True),
        {},
        6789,
    ),
    # Gemma-2: 3 layers alternating local (window 6) / global / local, attention and final softcaps that bite,
    # query_pre_attn_scalar 24 != head_dim 32, sandwich norms, tied.
    "gemma2_softcap": (
        dict(
            num_hidden_layers=3,
            num_key_value_heads=2,
            head_dim=32,
            hidden_activation="gelu_pytorch_tanh",
            sliding_window=6,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=8.0,
            query_pre_attn_scalar=24,
            tie_word_embeddings=True,
        ),
        {},
        7890,
    ),
    # Special ids as real checkpoints have them (the cases the SAE harvest, generation, calibration and export are
    # checked on). Llama: MQA, tied, no pad (pad_token_id null), a 2048-token byte-level BPE tokenizer.json.
    "llama_nopad": (
        dict(
            vocab_size=2048,
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=1,
            intermediate_size=64,
            tie_word_embeddings=True,
            rope_theta=10000.0,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=None,
        ),
        {},
        8901,
    ),
    # Qwen2: no BOS, no pad (both null), max_window_layers left at its default 28 (an unmodelled field to carry).
    "qwen2_nobos": (
        dict(
            num_key_value_heads=2,
            tie_word_embeddings=False,
            rope_theta=1e6,
            bos_token_id=None,
            eos_token_id=2,
            pad_token_id=None,
        ),
        {},
        9012,
    ),
    # Gemma-2 with Gemma's own ids: pad 0, eos 1, bos 2; MQA, window 4, default softcaps.
    "gemma2_ids": (
        dict(
            num_key_value_heads=1,
            head_dim=16,
            hidden_activation="gelu_pytorch_tanh",
            sliding_window=4,
            query_pre_attn_scalar=16,
            tie_word_embeddings=True,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        ),
        {},
        9123,
    ),
}
# Cases whose folder also holds a tokenizer.json: (trainer, vocab size) -- see save_tokenizer / save_bpe_tokenizer.
TOKENIZER_CASES = ("llama_gqa", "llama_nopad")

ARITH_CORPUS = [
    "Q 12+34\nA 46\n",
    "Q 7+8\nA 15\n",
    "Q 99+1\nA 100\n",
    "Q 50-25\nA 25\n",
    "Q 3*4\nA 12\n",
    "Q 123+456\nA 579\n",
    "Q 60/5\nA 12\n",
    "Q 0+0\nA 0\n",
]


def _family_base(family: str) -> dict[str, Any]:
    """_BASE without the fields a family's config does not take (Gemma has no mlp_bias; Gemma-2 names its act.)."""
    base = dict(_BASE)
    if family != "llama":
        base.pop("mlp_bias")
    if family in ("qwen2", "mistral"):
        base.pop("attention_bias")
    if family in ("gemma", "gemma2"):
        base.pop("hidden_act")
    return base


def build_model(overrides: dict[str, Any], seed: int, family: str = "llama"):
    """Build a fp32 eval-mode tiny `family` model with large random weights (deterministic in `seed`)."""
    config_cls, model_cls = FAMILIES[family]
    torch.manual_seed(seed)
    kwargs = {} if family == "llama" else {"attn_implementation": "eager"}  # eager: the softcap-capable reference
    config = config_cls(**{**_family_base(family), **overrides}, **kwargs)
    model = model_cls(config).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    # Gemma's RMSNorm multiplies by (1 + w): random around 0 there gives the same scales as around 1 elsewhere.
    norm_center = 0.0 if family in ("gemma", "gemma2") else 1.0
    with torch.no_grad():
        # named_parameters() dedupes tied tensors, so a tied embedding is initialised once.
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(norm_center + 0.1 * noise)  # RMSNorm scales random around 1
            else:
                p.copy_(WEIGHT_STD * noise)
    return model


def family_of(case: str) -> str:
    return case.split("_")[0]


def save_checkpoint(model, case_dir: pathlib.Path, save_kwargs: dict[str, Any]) -> None:
    """`save_pretrained` as safetensors; `safe_serialization` only where this transformers still takes it."""
    kwargs = dict(save_kwargs)
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True
    model.save_pretrained(str(case_dir), **kwargs)
    if not any(case_dir.glob("*.safetensors")):
        raise RuntimeError(f"save_pretrained wrote no safetensors in {case_dir}")


def save_golden(model, case_dir: pathlib.Path, seed: int) -> dict[str, Any]:
    """Run the reference forward pass and save input_ids + fp32 logits."""
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed + 2)
    input_ids = torch.randint(0, vocab, (BATCH, SEQ), generator=gen, dtype=torch.int64)
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits.to(torch.float32)
        # Greedy continuation of the first GREEDY_PROMPT tokens (exactly GREEDY_NEW tokens, no early stop), so
        # Lumen's `generate` on the imported checkpoint can be checked token for token against HF `generate`.
        greedy = model.generate(
            input_ids[:, :GREEDY_PROMPT],
            attention_mask=torch.ones_like(input_ids[:, :GREEDY_PROMPT]),
            max_new_tokens=GREEDY_NEW,
            min_new_tokens=GREEDY_NEW,
            do_sample=False,
            pad_token_id=0,
        )[:, GREEDY_PROMPT:]
    logits_np = logits.numpy()
    safetensors.numpy.save_file(
        {
            "input_ids": input_ids.numpy().astype(np.int32),
            "logits": np.ascontiguousarray(logits_np),
            "greedy_tokens": greedy.numpy().astype(np.int32),
        },
        str(case_dir / "golden.safetensors"),
    )
    meta = {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "seed": seed,
        "weight_std": WEIGHT_STD,
        "input_shape": [BATCH, SEQ],
        "logits_abs_max": float(np.abs(logits_np).max()),
        "logits_std": float(logits_np.std()),
    }
    (case_dir / "golden.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def save_tokenizer(case_dir: pathlib.Path, vocab_size: int) -> None:
    """Train a tiny BPE tokenizer offline on arithmetic strings; ids 0/1/2 = pad/bos/eos."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # One token per digit and per operator/space/newline, so arithmetic stays digit-aligned.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Split(pattern=Regex(r"[+\-*/= \n]"), behavior="isolated"),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=list("0123456789+-*/= QA\n"),
        show_progress=False,
    )
    tok.train_from_iterator(ARITH_CORPUS * 4, trainer=trainer)
    if tok.get_vocab_size() > vocab_size:
        raise RuntimeError(f"tokenizer vocab {tok.get_vocab_size()} > model vocab {vocab_size}")
    tok.save(str(case_dir / "tokenizer.json"))


def _stdlib_corpus() -> list[str]:
    """A fixed offline text corpus: the source of a few standard-library modules of this Python."""
    import argparse as m1
    import difflib as m2
    import json.decoder as m3
    import textwrap as m4

    return [inspect.getsource(m) for m in (m1, m2, m3, m4)]


def save_bpe_tokenizer(case_dir: pathlib.Path, vocab_size: int) -> None:
    """Train a byte-level BPE tokenizer of `vocab_size` ids offline; ids 0/1/2 = <unk>/<s>/</s>, no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_stdlib_corpus(), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer vocab {tok.get_vocab_size()} != model vocab {vocab_size}")
    tok.save(str(case_dir / "tokenizer.json"))


def save_logits(export_dir: pathlib.Path, golden_dir: pathlib.Path, out_name: str) -> None:
    """For each `export_dir/<case>/` (a Lumen export of golden case <case>): transformers' fp32 logits on that case's
    golden input_ids, written to `golden_dir/<case>/<out_name>` (a fixture `make test` compares Lumen against)."""
    for case_dir in sorted(p for p in export_dir.iterdir() if p.is_dir()):
        golden = safetensors.numpy.load_file(str(golden_dir / case_dir.name / "golden.safetensors"))
        model = transformers.AutoModelForCausalLM.from_pretrained(str(case_dir), attn_implementation="eager").eval()
        with torch.no_grad():
            logits = model(input_ids=torch.from_numpy(golden["input_ids"].astype(np.int64))).logits.float().numpy()
        safetensors.numpy.save_file(
            {"logits": np.ascontiguousarray(logits)}, str(golden_dir / case_dir.name / out_name)
        )
        print(
            f"{case_dir.name}: {type(model).__name__} logits {logits.shape} -> {golden_dir / case_dir.name / out_name}"
        )


def verify_export(export_dir: pathlib.Path, golden_dir: pathlib.Path) -> None:
    """Loads Lumen-exported folders with transformers; prints logit parity and greedy agreement with the goldens."""
    for case_dir in sorted(p for p in export_dir.iterdir() if p.is_dir()):
        golden = safetensors.numpy.load_file(str(golden_dir / case_dir.name / "golden.safetensors"))
        model = transformers.AutoModelForCausalLM.from_pretrained(str(case_dir), attn_implementation="eager").eval()
        input_ids = torch.from_numpy(golden["input_ids"].astype(np.int64))
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits.float().numpy()
            greedy = model.generate(
                input_ids[:, :GREEDY_PROMPT],
                attention_mask=torch.ones_like(input_ids[:, :GREEDY_PROMPT]),
                max_new_tokens=GREEDY_NEW,
                min_new_tokens=GREEDY_NEW,
                do_sample=False,
                pad_token_id=0,
            )[:, GREEDY_PROMPT:].numpy()
        diff = float(np.abs(logits - golden["logits"]).max())
        same = bool((greedy == golden["greedy_tokens"]).all())
        print(f"{case_dir.name}: {type(model).__name__} max|logits - golden| = {diff:.2e}, greedy tokens equal: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("tests/assets/hf"))
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--verify-export", type=pathlib.Path, default=None, help="check Lumen-exported folders")
    parser.add_argument("--save-logits", type=pathlib.Path, default=None, help="HF logits of Lumen-exported folders")
    parser.add_argument("--logits-name", default="export_logits.safetensors", help="file name for --save-logits")
    args = parser.parse_args()
    if args.verify_export is not None:
        verify_export(args.verify_export, args.out)
        return
    if args.save_logits is not None:
        save_logits(args.save_logits, args.out, args.logits_name)
        return
    torch.use_deterministic_algorithms(True)
    for name in args.cases:
        overrides, save_kwargs, seed = CASES[name]
        case_dir = args.out / name
        if case_dir.exists():
            shutil.rmtree(case_dir)
        case_dir.mkdir(parents=True)
        model = build_model(overrides, seed, family_of(name))
        save_checkpoint(model, case_dir, save_kwargs)
        meta = save_golden(model, case_dir, seed)
        if name == "llama_gqa":
            save_tokenizer(case_dir, model.config.vocab_size)
        if name == "llama_nopad":
            save_bpe_tokenizer(case_dir, model.config.vocab_size)
        size = sum(f.stat().st_size for f in case_dir.iterdir())
        print(
            f"{name}: {sorted(f.name for f in case_dir.iterdir())} {size / 1e3:.0f} kB "
            f"|logits|max={meta['logits_abs_max']:.2f}"
        )


if __name__ == "__main__":
    main()
