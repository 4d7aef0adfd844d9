"""The TRL side of `scripts/bench/preference.py`: a random Llama, saved, trained by TRL's `DPOTrainer` step by step.

Runs under a Python with torch + transformers + trl + datasets (the parity venv) and never imports JAX or Lumen:

  python scripts/bench/trl_dpo_worker.py --request req.json   # then one line per step on stdin

The request (JSON) holds the Llama config, the init seed, the folder to save the weights in (Lumen loads the same
file), the token-id batch (prompt_ids, chosen_ids, rejected_ids: lists of B rows), beta, the learning rate,
whether reference log-probs are precomputed, and the torch thread count. The worker builds the model, a frozen
copy as reference (or none with precomputed reference log-probs), a `DPOTrainer` on the batch as its whole data
set, prints one JSON line with the versions, then answers each stdin line with one JSON line: the wall seconds of
one optimisation step (`trainer.training_step`, the AdamW update and zero_grad, the same work as Lumen's step),
the loss and TRL's logged metrics of that step.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


SPECIAL = {0: "<pad>", 1: "<bos>", 2: "<eos>"}


def word(i: int) -> str:
    """The word of token id i: specials in brackets (an added token must not be a prefix of another word)."""
    return SPECIAL.get(int(i), f"w{int(i)}")


def _tokenizer(vocab_size: int, folder: str):
    """A word-level tokenizer with one word per id (`word`): the batch is written as such words, so DPOTrainer's own
    tokenization gives back exactly the request's ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word(i): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    fast.save_pretrained(folder)
    return fast


class Session:
    def __init__(self, request: dict[str, Any]):
        import torch
        from datasets import Dataset
        from transformers import LlamaConfig, LlamaForCausalLM
        from trl import DPOConfig, DPOTrainer

        torch.set_num_threads(int(request["threads"]))
        torch.manual_seed(int(request["seed"]))
        model = LlamaForCausalLM(LlamaConfig(**request["llama_config"])).to(torch.float32)
        model.save_pretrained(request["out_dir"], safe_serialization=True)
        tmp = tempfile.mkdtemp()
        tok = _tokenizer(request["llama_config"]["vocab_size"], tmp)
        batch = request["batch"]
        words = lambda ids, lead="": lead + " ".join(map(word, ids))  # noqa: E731
        data = Dataset.from_dict(
            {
                "prompt": [words(r) for r in batch["prompt_ids"]],
                "chosen": [words(r, " ") for r in batch["chosen_ids"]],  # each ends with the EOS id: no EOS added
                "rejected": [words(r, " ") for r in batch["rejected_ids"]],
            }
        )
        precompute = bool(request["precompute_ref_logps"])
        args = DPOConfig(
            output_dir=tmp,
            per_device_train_batch_size=len(batch["prompt_ids"]),
            learning_rate=float(request["lr"]),
            beta=float(request["beta"]),
            max_length=None,
            precompute_ref_log_probs=precompute,
            report_to=[],
            use_cpu=True,
            logging_steps=1,
            save_strategy="no",
            lr_scheduler_type="constant",
            weight_decay=0.0,
            bf16=False,  # TRL's default bf16 autocasts the prepared reference's forward: fp32 on both sides
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        ref = None if precompute else copy.deepcopy(model).eval()
        self.trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=data, processing_class=tok)
        self.trainer.create_optimizer()
        self.trainer.current_gradient_accumulation_steps = 1  # what Trainer.train sets before its steps
        self.model = self.trainer.model
        self.model.train()
        self.inputs = next(iter(self.trainer.get_train_dataloader()))
        ids = self.inputs["input_ids"][: len(batch["prompt_ids"])].tolist()
        want = [p + c for p, c in zip(batch["prompt_ids"], batch["chosen_ids"])]
        if sorted(ids) != sorted(want):  # the data loader shuffles the rows; the batch is the whole data set
            raise SystemExit(f"DPOTrainer tokenized the batch to other ids: {ids[0]} vs {want[0]}")

    def step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        loss = self.trainer.training_step(self.model, self.inputs)
        self.trainer.optimizer.step()
        self.trainer.optimizer.zero_grad()
        seconds = time.perf_counter() - t0
        metrics = {k: float(v[-1]) for k, v in self.trainer._metrics["train"].items() if v}
        return {"seconds": seconds, "loss": float(loss), "metrics": metrics}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--request", required=True)
    request = json.loads(pathlib.Path(ap.parse_args().request).read_text())
    session = Session(request)
    import torch
    import transformers
    import trl

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}
    print(json.dumps(info), flush=True)
    for _ in sys.stdin:
        print(json.dumps(session.step()), flush=True)


if __name__ == "__main__":
    main()
