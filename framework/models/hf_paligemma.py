"""Import Hugging Face PaliGemma checkpoints (SigLIP vision tower + linear projector + Gemma LM) as a Lumen VLM.

Glossary: L LM layers, Lv encoder layers, D LM width, Dv encoder width, Hd encoder heads, Dh head dim, F/Fv mlp
widths, C channels, P patch side, N patches.

  cfg, params = load_paligemma_checkpoint("path/to/hf_folder")   # config.json + model.safetensors[.index.json]
  logits_BTV = vlm.apply(params, images_BHWC, tokens_BT, cfg, prefix_len_B=...)
  out = vlm.generate(params, cfg, images_BHWC, prompts, max_new_tokens=...)

Three declarative tables of `hf_families.Rule`s map the tensors: the encoder's (SigLIP names, laid out exactly as
`vision.init`), the projector's, and the text families' own Gemma / Gemma-2 table under the `language_model.`
prefix (`hf_families.ARCHITECTURES[...].rules`). Checkpoints spell the prefixes several ways (the hub's
`vision_tower.vision_model.` / `language_model.model.`, transformers >= 4.52's `model.vision_tower.` /
`model.language_model.`); names are brought to one canonical spelling before matching, and errors quote them as
the file has them. Missing, unexpected and mis-shaped tensors are reported together in one ValueError, as for the
text families. The language config goes through `hf_families.hf_config_to_lm_config` (its tokenizer is "hf");
`use_bidirectional_attention` is dropped there because PaliGemma's mask (prefix-LM over image + prompt, causal
after) is built by the VLM from `prefix_len`, not by the LM.

PaliGemma numbers positions from 1, Lumen from 0 (the prefix-LM mask compares positions with `prefix_len`): RoPE
sees only position differences, so the logits agree up to float rounding (tests/test_hf_paligemma.py: <= 1e-4).
Image tokens enter the LM unscaled (transformers >= 5 scales only the token lookup by sqrt(D); the projector
output is written over the scaled placeholders as it is).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from framework.models import hf, hf_families, vision, vlm
from framework.models.hf_families import Rule, identity, split_bias, split_heads_in, split_heads_out, transpose

ARCHITECTURE = "PaliGemmaForConditionalGeneration"

# Defaults of transformers' SiglipVisionConfig / GemmaConfig, for fields a checkpoint's config.json leaves out.
_SIGLIP_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_channels=3,
    image_size=224,
    patch_size=16,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
)
_GEMMA_DEFAULTS = dict(model_type="gemma", num_attention_heads=8, num_key_value_heads=1, head_dim=256)
_ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}

# (pattern, replacement): the first matching one gives a tensor name its canonical spelling.
_CANONICAL = (
    (r"^model\.vision_tower\.vision_model\.", "vision_tower."),
    (r"^model\.vision_tower\.", "vision_tower."),
    (r"^vision_tower\.vision_model\.", "vision_tower."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    (r"^model\.language_model\.model\.", "language_model."),
    (r"^model\.language_model\.", "language_model."),
    (r"^language_model\.model\.", "language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
)


def canonical_name(name: str) -> str:
    """A checkpoint tensor name in the canonical spelling the tables use (`vision_tower.embeddings...`,
    `multi_modal_projector.linear...`, `language_model.layers.0...`, `lm_head.weight`)."""
    for pattern, repl in _CANONICAL:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name


def _patch_kernel(w: np.ndarray, cfg: vision.ViTConfig) -> np.ndarray:
    """Conv2d weight [Dv, C, P, P] -> patch kernel [P*P*C, Dv] (rows in `vision.patchify`'s (row, col, channel))."""
    return w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])


def vision_rules() -> tuple[Rule, ...]:
    """SigLIP vision tower names (canonical) -> `vision.init` paths; shapes from a ViTConfig."""
    p = "vision_tower.encoder.layers.{i}"
    rows = [
        Rule(
            "vision_tower.embeddings.patch_embedding.weight",
            ("patch", "kernel"),
            lambda c: (c.d_model, c.channels, c.patch_size, c.patch_size),
            _patch_kernel,
        ),
        Rule("vision_tower.embeddings.patch_embedding.bias", ("patch", "bias"), lambda c: (c.d_model,)),
        Rule(
            "vision_tower.embeddings.position_embedding.weight",
            ("pos_embedding",),
            lambda c: (c.num_patches, c.d_model),
        ),
        Rule("vision_tower.post_layernorm.weight", ("final_norm", "scale"), lambda c: (c.d_model,)),
        Rule("vision_tower.post_layernorm.bias", ("final_norm", "bias"), lambda c: (c.d_model,)),
    ]
    for hf_norm, norm in (("layer_norm1", "attn_norm"), ("layer_norm2", "mlp_norm")):
        for hf_leaf, leaf in (("weight", "scale"), ("bias", "bias")):
            rows.append(Rule(f"{p}.{hf_norm}.{hf_leaf}", ("layers", norm, leaf), lambda c: (c.d_model,)))
    for name in "qkv":
        rows.append(
            Rule(
                f"{p}.self_attn.{name}_proj.weight",
                ("layers", f"{name}_proj", "kernel"),
                lambda c: (c.d_model, c.d_model),
                split_heads_out("n_heads"),
            )
        )
        rows.append(
            Rule(
                f"{p}.self_attn.{name}_proj.bias",
                ("layers", f"{name}_proj", "bias"),
                lambda c: (c.d_model,),
                split_bias("n_heads"),
            )
        )
    rows += [
        Rule(
            f"{p}.self_attn.out_proj.weight",
            ("layers", "o_proj", "kernel"),
            lambda c: (c.d_model, c.d_model),
            split_heads_in,
        ),
        Rule(f"{p}.self_attn.out_proj.bias", ("layers", "o_proj", "bias"), lambda c: (c.d_model,), identity),
        Rule(f"{p}.mlp.fc1.weight", ("layers", "fc1", "kernel"), lambda c: (c.d_ff, c.d_model), transpose),
        Rule(f"{p}.mlp.fc1.bias", ("layers", "fc1", "bias"), lambda c: (c.d_ff,)),
        Rule(f"{p}.mlp.fc2.weight", ("layers", "fc2", "kernel"), lambda c: (c.d_model, c.d_ff), transpose),
        Rule(f"{p}.mlp.fc2.bias", ("layers", "fc2", "bias"), lambda c: (c.d_model,)),
    ]
    return tuple(rows)


def projector_rules() -> tuple[Rule, ...]:
    """The linear projector; shapes from a VLMConfig."""
    return (
        Rule(
            "multi_modal_projector.linear.weight",
            ("linear", "kernel"),
            lambda c: (c.lm.d_model, c.vision.d_model),
            lambda w, c: w.T,
        ),
        Rule("multi_modal_projector.linear.bias", ("linear", "bias"), lambda c: (c.lm.d_model,)),
    )


def lm_rules(model_type: str) -> tuple[Rule, ...]:
    """The text family's own table (Gemma or Gemma-2) with `model.` spelled `language_model.`."""
    rules = hf_families.ARCHITECTURES[model_type].rules
    return tuple(
        dataclasses.replace(r, hf="language_model." + r.hf[len("model.") :]) if r.hf.startswith("model.") else r
        for r in rules
    )


# ------------------------------------------------------------------------------------------------- configs
def paligemma_config(hf_config: Mapping[str, Any], **lm_overrides: Any) -> vlm.VLMConfig:
    """The VLMConfig of a PaliGemma `config.json` dict; ValueError naming an unsupported field."""
    archs = list(hf_config.get("architectures") or [ARCHITECTURE])
    if hf_config.get("model_type") != "paligemma" or archs != [ARCHITECTURE]:
        raise ValueError(
            f"not a PaliGemma checkpoint: model_type={hf_config.get('model_type')!r}, architectures={archs} (expected "
            f"'paligemma' and [{ARCHITECTURE!r}]); text-only families load with hf.load_hf_checkpoint"
        )
    v = {**_SIGLIP_DEFAULTS, **(hf_config.get("vision_config") or {})}
    if v.get("vision_use_head"):
        raise ValueError("unsupported HF config field vision_config.vision_use_head=True: PaliGemma reads every patch")
    if v["hidden_act"] not in _ACTS:
        raise ValueError(
            f"unsupported HF config field vision_config.hidden_act={v['hidden_act']!r}: have {sorted(_ACTS)}"
        )
    vision_cfg = vision.ViTConfig(
        image_height=int(v["image_size"]),
        image_width=int(v["image_size"]),
        channels=int(v["num_channels"]),
        patch_size=int(v["patch_size"]),
        d_model=int(v["hidden_size"]),
        n_layers=int(v["num_hidden_layers"]),
        n_heads=int(v["num_attention_heads"]),
        d_ff=int(v["intermediate_size"]),
        mlp_activation=_ACTS[v["hidden_act"]],
        norm_eps=float(v["layer_norm_eps"]),
    )
    text = {**_GEMMA_DEFAULTS, **(hf_config.get("text_config") or {})}
    text.pop("use_bidirectional_attention", None)  # the VLM builds PaliGemma's prefix-LM mask itself
    text.setdefault("vocab_size", hf_config.get("vocab_size"))
    if text["model_type"] not in ("gemma", "gemma2"):
        raise ValueError(f"unsupported HF config field text_config.model_type={text['model_type']!r}: gemma or gemma2")
    lm_cfg = hf_families.hf_config_to_lm_config(text, **lm_overrides)
    projection = int(hf_config.get("projection_dim", lm_cfg.d_model))
    if projection != lm_cfg.d_model:
        raise ValueError(f"HF config projection_dim={projection} differs from text_config.hidden_size={lm_cfg.d_model}")
    token = hf_config.get("image_token_index", hf_config.get("image_token_id"))
    return vlm.VLMConfig(vision=vision_cfg, lm=lm_cfg, projector="linear", image_token_id=int(token), prefix_lm=True)


# ------------------------------------------------------------------------------------------------- loading
@dataclasses.dataclass
class _Group:
    """One table's share of the stream: its rules, the config its shapes come from, its layer count."""

    rules: tuple[Rule, ...]
    cfg: Any
    layers: int
    matchers: list = dataclasses.field(default_factory=list)
    out: hf._Collected = dataclasses.field(default_factory=hf._Collected)

    def __post_init__(self):
        self.matchers = [(r, r.regex()) for r in self.rules]


def load_paligemma_checkpoint(
    path: str | pathlib.Path, *, param_dtype: str = "float32", **lm_overrides: Any
) -> tuple[vlm.VLMConfig, vlm.Params]:
    """Loads a local PaliGemma folder (config.json + safetensors) as `(VLMConfig, params)` for `framework.models.vlm`.

    `lm_overrides` are LMConfig fields set on the language model (e.g. scan_layers=False). Raises ValueError for an
    unsupported config field or (all at once) missing / unexpected / mis-shaped tensors; FileNotFoundError for a
    missing config.json or safetensors file.
    """
    path = pathlib.Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no config.json in HF checkpoint folder {path}")
    hf_config = json.loads((path / "config.json").read_text())
    cfg = paligemma_config(hf_config, param_dtype=param_dtype, **lm_overrides)
    text_type = (hf_config.get("text_config") or {}).get("model_type", "gemma")
    groups = {
        "vision": _Group(vision_rules(), cfg.vision, cfg.vision.n_layers),
        "projector": _Group(projector_rules(), cfg, 1),
        "lm": _Group(tuple(r for r in lm_rules(text_type) if r.when(cfg.lm)), cfg.lm, cfg.lm.n_layers),
    }
    dtype = hf._NP_DTYPES[param_dtype]
    unexpected, tied_head = [], None
    for file in hf._checkpoint_files(path):
        if not file.exists():
            raise FileNotFoundError(f"shard {file.name} listed in {hf.INDEX_FILE} does not exist in {path}")
        with safe_open(str(file), framework="numpy") as handle:
            for name in handle.keys():
                canon = canonical_name(name)
                if canon == "lm_head.weight" and cfg.lm.tie_embeddings:
                    tied_head = hf._get_tensor(handle, file, name)
                    continue
                if not any(_take(g, handle, file, name, canon, dtype) for g in groups.values()):
                    unexpected.append(name)
    problems = []
    for key, g in groups.items():
        expected = [r.hf.replace("{i}", str(i)) for r in g.rules for i in (range(g.layers) if r.per_layer else [0])]
        missing = [n for n in expected if n not in g.out.seen]
        for title, names in (("missing", missing), ("mis-shaped", g.out.misshaped)):
            if names:
                problems.append(f"{len(names)} {title} {key} tensor(s):\n    " + "\n    ".join(names))
    unexpected += [n for g in groups.values() for n in g.out.unexpected]
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s):\n    " + "\n    ".join(unexpected))
    embed = groups["lm"].out.buffers.get(("embed", "embedding"))
    if tied_head is not None and embed is not None and not np.array_equal(tied_head.astype(dtype), embed):
        problems.append("lm_head.weight differs from the embedding although tie_word_embeddings=True")
    if problems:
        raise ValueError(f"HF checkpoint {path} does not match {ARCHITECTURE}:\n  " + "\n  ".join(problems))
    params: vlm.Params = {}
    for key, g in groups.items():
        params[key] = {}
        for p, value in g.out.buffers.items():
            hf._set_path(params[key], p, jnp.asarray(value))
    return cfg, params


def _take(g: _Group, handle, file, name: str, canon: str, dtype) -> bool:
    """Streams tensor `name` into group `g` if one of its rules matches (False otherwise)."""
    match = next(((r, m) for r, rx in g.matchers if (m := rx.match(canon))), None)
    if match is None:
        return False
    rule, m = match
    state = g.out
    layer = int(m.group(1)) if rule.per_layer else None
    if layer is not None and layer >= g.layers:
        state.unexpected.append(f"{name} (layer {layer} >= {g.layers} layers)")
        return True
    if canon in state.seen:  # the same tensor under two spellings, or in two shards
        state.unexpected.append(f"{name} (duplicate)")
        return True
    shape, want = tuple(handle.get_slice(name).get_shape()), rule.hf_shape(g.cfg)
    state.seen.add(canon)
    if shape != tuple(want):
        state.misshaped.append(f"{name}: shape {list(shape)}, expected {list(want)}")
        return True
    value = rule.transform(hf._get_tensor(handle, file, name).astype(np.float32), g.cfg).astype(dtype)
    if layer is None:
        state.buffers[rule.path] = value
    else:
        if rule.path not in state.buffers:
            state.buffers[rule.path] = np.empty((g.layers, *value.shape), dtype)
        state.buffers[rule.path][layer] = value
    return True
