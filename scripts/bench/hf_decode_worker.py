"""The Hugging Face side of `scripts/bench/decode.py`: build a random Llama, save it, time `model.generate`.

Runs under any Python with torch + transformers + safetensors and never imports JAX or Lumen, so the decode
benchmark can drive it in a separate interpreter (`--hf-python`) when torch is not installable next to JAX:

  python scripts/bench/hf_decode_worker.py --request req.json --result out.json

The request (JSON) holds the Llama config, the init seed, the checkpoint folder to write, the prompts per batch
size, max_new_tokens, the number of timed runs and the torch thread count; the result holds the versions, the
per-run seconds and the greedy tokens of each batch, for the agreement check on the Lumen side.
"""

from __future__ import annotations

import argparse
import inspect
import json
import pathlib
import platform
import statistics
import time
from typing import Any


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


def time_generate(model, prompts: list[list[int]], max_new_tokens: int, runs: int) -> dict[str, Any]:
    """Greedy `generate` of exactly `max_new_tokens` (EOS disabled) on equal-length prompts; a warm-up run first."""
    import torch
    from transformers import GenerationConfig

    input_ids = torch.tensor(prompts, dtype=torch.long)
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=None,  # never stop early: both sides decode exactly N tokens
        pad_token_id=model.config.pad_token_id,
        bos_token_id=model.config.bos_token_id,
    )

    def once():
        with torch.inference_mode():
            return model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=gen_cfg
            )

    out = once()  # warm-up (allocator, kernels), excluded
    seconds = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = once()
        seconds.append(time.perf_counter() - t0)
    new = out[:, input_ids.shape[1] :]
    if new.shape[1] != max_new_tokens:
        raise RuntimeError(f"HF generate produced {new.shape[1]} new tokens, expected {max_new_tokens}")
    return {"seconds": seconds, "median_s": statistics.median(seconds), "tokens": new.tolist()}


def run(request: dict[str, Any]) -> dict[str, Any]:
    """Builds and saves the model, then times generate for every batch in `request["prompts"]`."""
    import torch
    import transformers

    torch.set_num_threads(int(request["threads"]))
    model = build_and_save(request["llama_config"], int(request["seed"]), request["out_dir"])
    batches = {
        str(b): time_generate(model, prompts, int(request["max_new_tokens"]), int(request["runs"]))
        for b, prompts in request["prompts"].items()
    }
    return {
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "torch_threads": torch.get_num_threads(),
        "batches": batches,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--request", required=True, help="request JSON file")
    parser.add_argument("--result", required=True, help="where to write the result JSON")
    args = parser.parse_args()
    result = run(json.loads(pathlib.Path(args.request).read_text()))
    pathlib.Path(args.result).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
