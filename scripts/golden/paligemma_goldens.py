"""Makes the PaliGemma parity fixture: a tiny random `PaliGemmaForConditionalGeneration` built offline by transformers.

COMMAND: .venv-parity/bin/python scripts/golden/paligemma_goldens.py [--out tests/assets/paligemma]
RUNTIME: a few seconds on a CPU. Writes config.json + model.safetensors (fp32) and golden.npz: pixel_values
[B, H, W, C] (Lumen's layout), input_ids [B, T], token_type_ids [B, T] (0 = prefix, 1 = suffix), logits [B, T, V]
(fp32, with the prefix-LM mask the token types give), greedy_tokens [B, G] (HF generate from the same prompts with
an all-prefix prompt, no stop token) and the generation's logits at the prompts' last position.

Weights are redrawn wider than transformers' init (std 0.1, LayerNorm/RMSNorm scales around their identity) so the
logits spread over several units and a wrong mapping shows far above the 1e-4 tolerance.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np
import torch
from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipVisionConfig

IMAGE_TOKEN = 100
VOCAB = 128
IMAGE_SIZE, PATCH = 16, 8
N_IMAGE = (IMAGE_SIZE // PATCH) ** 2
NEW_TOKENS = 8
STD = 0.3


def build() -> PaliGemmaForConditionalGeneration:
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_channels=3,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        layer_norm_eps=1e-6,
        hidden_act="gelu_pytorch_tanh",
        vision_use_head=False,
    )
    text = GemmaConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=12,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh",
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    )
    config = PaliGemmaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=IMAGE_TOKEN,
        projection_dim=48,
        hidden_size=48,
        vocab_size=VOCAB,
    )
    torch.manual_seed(0)
    model = PaliGemmaForConditionalGeneration(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name or "layernorm" in name or name.endswith("norm.weight"):
                base = 0.0 if "language_model" in name else (1.0 if name.endswith("weight") else 0.0)
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(STD * torch.randn(p.shape, generator=gen))
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/assets/paligemma")
    out = pathlib.Path(ap.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    model = build()
    model.save_pretrained(out, safe_serialization=True)

    rng = np.random.default_rng(0)
    B, prompt_len = 3, 6
    pixels = rng.uniform(-1, 1, (B, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    text = rng.integers(3, IMAGE_TOKEN, (B, prompt_len))
    ids = np.concatenate([np.full((B, N_IMAGE), IMAGE_TOKEN), np.full((B, 1), 2), text], axis=1).astype(np.int64)
    types = np.zeros_like(ids)
    types[1, -3:] = 1  # row 1: the last 3 tokens are a causal suffix (an answer), as in training
    with torch.no_grad():
        logits = (
            model(
                input_ids=torch.tensor(ids),
                pixel_values=torch.tensor(pixels),
                token_type_ids=torch.tensor(types),
                attention_mask=torch.ones(ids.shape, dtype=torch.long),
            )
            .logits.float()
            .numpy()
        )
        gen = model.generate(
            input_ids=torch.tensor(ids),
            pixel_values=torch.tensor(pixels),
            token_type_ids=torch.zeros(ids.shape, dtype=torch.long),
            attention_mask=torch.ones(ids.shape, dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        )
    greedy = gen.sequences[:, ids.shape[1] :].numpy()
    np.savez(
        out / "golden.npz",
        pixel_values=pixels.transpose(0, 2, 3, 1),
        input_ids=ids.astype(np.int32),
        token_type_ids=types.astype(np.int32),
        logits=logits,
        greedy_tokens=greedy.astype(np.int32),
        first_step_scores=gen.scores[0].float().numpy(),
    )
    (out / "golden.json").write_text(json.dumps({"image_token_id": IMAGE_TOKEN, "new_tokens": NEW_TOKENS}) + "\n")
    print(f"wrote {out}: logits {logits.shape}, greedy {greedy.tolist()}")


if __name__ == "__main__":
    main()
