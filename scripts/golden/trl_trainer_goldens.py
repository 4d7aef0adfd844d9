"""Trainer-level golden fixtures made by real TRL: `DPOTrainer` and `KTOTrainer` on a tiny random Llama, one batch.

Where `trl_goldens.py` checks TRL's loss arithmetic on given log-probs, this script runs the trainers themselves:
a tiny random `LlamaForCausalLM` policy and a second one (another seed) as `ref_model`, a word-level tokenizer built
with `tokenizers` (one word per id, so the rows' token ids are known), a data set of exactly one batch (rows of
different prompt and completion lengths, so padding is exercised), and TRL's own data pipeline and collator. For
each trainer it records the collated batch TRL trained on (input ids, completion masks, KTO's mismatched KL rows and
labels), the loss and every metric TRL logs for the first step, then takes one plain SGD step (no clipping, no
weight decay) and records the loss and metrics of the same batch under the updated policy: the second step checks
the gradient, the first the forward pass, the reference and the metrics. Lumen's test (`tests/test_preference.py`)
loads the same safetensors and feeds the same batch to its trainer's loss function.

COMMAND: /work/main/.venv-parity/bin/python scripts/golden/trl_trainer_goldens.py --out tests/assets/trl/trainer
RUNTIME: ~30 s (importing torch + trl).  EXPECT: policy/ and ref/ (config.json + model.safetensors, ~100 kB each),
  batches.npz and goldens.json.

This script must never import jax or Lumen: it is the independent reference.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer  # noqa: E402

VOCAB = 48
LLAMA = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    head_dim=8,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    hidden_act="silu",
    tie_word_embeddings=False,
    initializer_range=0.3,  # peaked random distributions: the two models' log-probs differ by nats, not noise
)
SPECIAL = {0: "<pad>", 1: "<bos>", 2: "<eos>"}
PAIRS = 4  # DPO pairs; KTO rows = 2 * PAIRS (each pair's chosen desirable, rejected undesirable)
BETA, LR = 0.1, 0.5  # SGD with a large LR: the second step's metrics move well past float noise


def word(i: int) -> str:
    return SPECIAL.get(int(i), f"w{int(i)}")


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer (built with `tokenizers`), one word per id, no BOS added."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={word(i): i for i in range(VOCAB)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def text_rows(seed: int = 0) -> dict[str, list[str]]:
    """PAIRS prompts with a chosen and a rejected completion each, of different lengths, each ending with EOS."""
    rng = np.random.default_rng(seed)
    words = lambda n, lead="": lead + " ".join(word(i) for i in rng.integers(3, VOCAB, n))  # noqa: E731
    rows = dict(prompt=[], chosen=[], rejected=[])
    for _ in range(PAIRS):
        rows["prompt"].append(words(int(rng.integers(2, 6))))
        rows["chosen"].append(words(int(rng.integers(2, 7)), " ") + " <eos>")
        rows["rejected"].append(words(int(rng.integers(2, 7)), " ") + " <eos>")
    return rows


def models(folder: pathlib.Path):
    """(policy, reference): two random Llamas (seeds 0 and 1), saved under folder/policy and folder/ref."""
    out = []
    for seed, name in ((0, "policy"), (1, "ref")):
        torch.manual_seed(seed)
        m = LlamaForCausalLM(LlamaConfig(**LLAMA)).to(torch.float32)
        m.save_pretrained(folder / name, safe_serialization=True)
        out.append(m)
    return out


def common_args(tmp: str) -> dict:
    return dict(
        output_dir=tmp,
        learning_rate=LR,
        beta=BETA,
        max_length=None,
        optim="sgd",
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=None,
        bf16=False,  # TRL's configs default to bf16, which autocasts the prepared ref_model's forward: fp32 here
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def two_steps(trainer, expect_rows: int) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """(the collated batch, [loss and metrics of step 1, of step 2 after one SGD step on it])."""
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1
    model = trainer.model
    model.train()  # Llama has no dropout: train and eval forwards are the same
    batch = next(iter(trainer.get_train_dataloader()))
    if len(batch["input_ids"]) != expect_rows:
        raise SystemExit(f"expected one batch of {expect_rows} rows, got {len(batch['input_ids'])}")
    steps = []
    for _ in range(2):
        for v in trainer._metrics["train"].values():
            v.clear()
        loss = trainer.training_step(model, batch)
        metrics = {k: float(v[-1]) for k, v in trainer._metrics["train"].items() if v}
        metrics.pop("num_tokens", None)
        steps.append(dict(loss=float(loss), metrics=metrics))
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
    return batch, steps


def dpo_golden(policy, ref, rows, tmp) -> tuple[dict[str, np.ndarray], dict]:
    data = Dataset.from_dict(rows)
    args = DPOConfig(**common_args(tmp), per_device_train_batch_size=PAIRS, loss_type=["sigmoid"])
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=data, processing_class=tokenizer())
    batch, steps = two_steps(trainer, 2 * PAIRS)
    arrays = {"dpo_input_ids": batch["input_ids"].numpy(), "dpo_completion_mask": batch["completion_mask"].numpy()}
    return arrays, dict(trainer="DPOTrainer", kind=["sigmoid"], beta=BETA, lr=LR, steps=steps)


def kto_golden(policy, ref, rows, tmp) -> tuple[dict[str, np.ndarray], dict]:
    n = len(rows["prompt"])
    data = Dataset.from_dict(
        dict(
            prompt=rows["prompt"] * 2,
            completion=rows["chosen"] + rows["rejected"],
            label=[True] * n + [False] * n,
        )
    )
    args = KTOConfig(**common_args(tmp), per_device_train_batch_size=2 * n, train_sampling_strategy="sequential")
    trainer = KTOTrainer(model=policy, ref_model=ref, args=args, train_dataset=data, processing_class=tokenizer())
    batch, steps = two_steps(trainer, 2 * n)
    keys = ("input_ids", "completion_mask", "KL_input_ids", "KL_completion_mask", "label")
    arrays = {f"kto_{k}": batch[k].numpy().astype(np.int32) for k in keys}
    hparams = dict(beta=BETA, desirable_weight=1.0, undesirable_weight=1.0)
    return arrays, dict(trainer="KTOTrainer", kind=["kto"], hparams=hparams, lr=LR, steps=steps)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tests/assets/trl/trainer")
    out = pathlib.Path(ap.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    rows = text_rows()
    arrays, cases = {}, []
    for make in (dpo_golden, kto_golden):
        policy, ref = models(out)  # fresh weights for each trainer (the first one's SGD step changes its policy)
        with tempfile.TemporaryDirectory() as tmp:
            a, case = make(policy, ref.eval(), rows, tmp)
        arrays |= {k: v.astype(np.int32) for k, v in a.items()}
        cases.append(case)
    np.savez(out / "batches.npz", **arrays)
    record = dict(trl=trl.__version__, torch=torch.__version__, transformers=transformers.__version__, cases=cases)
    (out / "goldens.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
