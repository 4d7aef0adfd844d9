"""The Hugging Face side of `scripts/bench/decode.py`: build a random Llama, save it, time `model.generate`.

Runs under any Python with torch + transformers + safetensors and never imports JAX or Lumen, so the decode
benchmark can drive it in a separate interpreter (`--hf-python`) when torch is not installable next to JAX:

  python scripts/bench/hf_decode_worker.py --request req.json   # then batch keys on stdin, one per line

The request (JSON) holds the Llama config, the init seed, the checkpoint folder to write, the prompts per batch
size, max_new_tokens and the torch thread count. The worker builds and saves the model, prints one JSON line with
the versions, then answers each batch key read on stdin (one per line) with one JSON line: the wall seconds of one
`generate` call on that batch and its greedy tokens (the benchmark times each call after an untimed one). The
benchmark alternates these calls with Lumen's, so both sides are timed under the same machine conditions.
"""

from __future__ import annotations

import argparse
import inspect
import json
import pathlib
import platform
import sys
import time
from typing import Any, TextIO


def build_and_save(llama_config: dict[str, Any], seed: int, out_dir: str):
    """A fp32 eval-mode `LlamaForCausalLM` with seeded random weights, saved as safetensors in `out_dir`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**llama_config)).to(torch.float32).eval()
    kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True
    model.save_pretrained(out_dir, **kwargs)
    if not any(pathlib.Path(out_dir).glob("*.safetensors")):
        raise RuntimeError(f"save_pretrained wrote no safetensors file in {out_dir}")
    return model


class Session:
    """The saved model and a timed greedy `generate` of exactly `max_new_tokens` (EOS disabled) per batch of
    equal-length prompts."""

    def __init__(self, request: dict[str, Any]):
        import torch
        from transformers import GenerationConfig

        torch.set_num_threads(int(request["threads"]))
        self.model = build_and_save(request["llama_config"], int(request["seed"]), request["out_dir"])
        self.max_new_tokens = int(request["max_new_tokens"])
        self.inputs = {b: torch.tensor(rows, dtype=torch.long) for b, rows in request["prompts"].items()}
        self.gen_cfg = GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=self.max_new_tokens,
            do_sample=False,
            eos_token_id=None,  # never stop early: both sides decode exactly N tokens
            pad_token_id=self.model.config.pad_token_id,
            bos_token_id=self.model.config.bos_token_id,
        )

    def versions(self) -> dict[str, Any]:
        import torch
        import transformers

        return {
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
            "torch_threads": torch.get_num_threads(),
        }

    def _generate(self, batch: str):
        import torch

        input_ids = self.inputs[batch]
        with torch.inference_mode():
            return self.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=self.gen_cfg
            )

    def time_once(self, batch: str) -> dict[str, Any]:
        """Wall seconds of one `generate` call on `batch` and its new tokens."""
        t0 = time.perf_counter()
        out = self._generate(batch)
        seconds = time.perf_counter() - t0
        new = out[:, self.inputs[batch].shape[1] :]
        if new.shape[1] != self.max_new_tokens:
            raise RuntimeError(f"HF generate produced {new.shape[1]} new tokens, expected {self.max_new_tokens}")
        return {"seconds": seconds, "tokens": new.tolist()}


def serve(request: dict[str, Any], stdin: TextIO, stdout: TextIO) -> None:
    """The worker's loop: versions first, then one timed call per batch key read."""
    session = Session(request)
    print(json.dumps(session.versions()), file=stdout, flush=True)
    for line in stdin:
        if line.strip():
            print(json.dumps(session.time_once(line.strip())), file=stdout, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--request", required=True, help="request JSON file")
    args = parser.parse_args()
    serve(json.loads(pathlib.Path(args.request).read_text()), sys.stdin, sys.stdout)


if __name__ == "__main__":
    main()
