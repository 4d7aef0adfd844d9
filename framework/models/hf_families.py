"""Hugging Face model families for `framework.models.hf`: name-mapping tables and config converters.

Glossary: L layers, D model, H heads, K kv-heads, Dh head dim, F mlp, V vocab.

A family (`ArchSpec`, keyed by HF `model_type` in `ARCHITECTURES`) is an HF config.json -> LMConfig converter, its
inverse for export, and a declarative table of `Rule`s: each row names an HF tensor pattern (`{i}` = layer index),
the Lumen param path, the HF shape it must have and the transform into Lumen's layout (every transform is "maybe
transpose, then reshape", so `Rule.to_hf` inverts it exactly). To add a family: write its two config functions and
rows, and add an `ArchSpec` entry.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from framework.models.lm import LMConfig

Transform = Callable[[np.ndarray, LMConfig], np.ndarray]
ShapeFn = Callable[[LMConfig], tuple[int, ...]]


# ----------------------------------------------------------------------------------------------- transforms
def identity(w: np.ndarray, cfg: LMConfig) -> np.ndarray:
    return w


def transpose(w: np.ndarray, cfg: LMConfig) -> np.ndarray:
    """torch Linear weight [out, in] -> Lumen kernel [in, out]."""
    return w.T


def split_heads_out(n_heads_attr: str) -> Transform:
    """[n*Dh, D] -> [D, n, Dh] for q/k/v (n = cfg.<n_heads_attr>); RoPE is rotate_half, so no permutation."""

    def fn(w: np.ndarray, cfg: LMConfig) -> np.ndarray:
        return w.T.reshape(cfg.d_model, getattr(cfg, n_heads_attr), cfg.head_dim)

    fn.transposes = True
    return fn


def split_heads_in(w: np.ndarray, cfg: LMConfig) -> np.ndarray:
    """o_proj [D, H*Dh] -> [H, Dh, D]."""
    return w.T.reshape(cfg.n_heads, cfg.head_dim, cfg.d_model)


def split_bias(n_heads_attr: str) -> Transform:
    """q/k/v bias [n*Dh] -> [n, Dh]."""

    def fn(w: np.ndarray, cfg: LMConfig) -> np.ndarray:
        return w.reshape(getattr(cfg, n_heads_attr), cfg.head_dim)

    return fn


transpose.transposes = split_heads_in.transposes = True


@dataclasses.dataclass(frozen=True)
class Rule:
    """One row of a name-mapping table: HF tensor name pattern -> Lumen param path."""

    hf: str  # e.g. "model.layers.{i}.mlp.up_proj.weight"; "{i}" marks a stacked layer index
    path: tuple[str, ...]  # Lumen param path, e.g. ("layers", "mlp", "up_proj", "kernel")
    hf_shape: ShapeFn  # shape the HF tensor must have (per layer)
    transform: Transform = identity  # HF -> Lumen: optionally a transpose, then a reshape
    when: Callable[[LMConfig], bool] = lambda cfg: True  # row applies only if True (e.g. untied lm_head)

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf

    def regex(self) -> re.Pattern:
        return re.compile("^" + re.escape(self.hf).replace(re.escape("{i}"), r"(\d+)") + "$")

    def to_hf(self, w: np.ndarray, cfg: LMConfig) -> np.ndarray:
        """The inverse of `transform`: a Lumen array (one layer) back in HF's layout."""
        shape = self.hf_shape(cfg)
        if getattr(self.transform, "transposes", False):
            return np.ascontiguousarray(w.reshape(shape[::-1]).T)
        return np.ascontiguousarray(w.reshape(shape))


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """Everything needed to import (and export) one HF `model_type`."""

    architectures: tuple[str, ...]  # accepted `config.json["architectures"]` entries (the first one is written)
    config_fn: Callable[[Mapping[str, Any]], dict[str, Any]]  # HF config -> LMConfig kwargs (raises if unsupported)
    rules: tuple[Rule, ...]
    to_hf_config: Callable[[LMConfig], dict[str, Any]]  # LMConfig -> family-specific HF config fields
    ignore: tuple[str, ...] = ()  # regexes of HF tensors that are dropped on purpose
    tied_alias: tuple[str, str] | None = None  # (lm_head name, embedding name) when tie is allowed


# ----------------------------------------------------------------------------------------------- configs
_SUPPORTED_ROPE = ("default",)


def _rope_theta(hf: Mapping[str, Any]) -> float:
    """rope_theta from a transformers<5 (`rope_theta`, `rope_scaling`) or >=5 (`rope_parameters`) config."""
    scaling = hf.get("rope_scaling")
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in _SUPPORTED_ROPE:
            raise ValueError(
                f"unsupported HF config field rope_scaling={scaling!r}: rope type {kind!r} is not "
                f"implemented (supported: {list(_SUPPORTED_ROPE)} / no rope_scaling)"
            )
    params = hf.get("rope_parameters")
    theta = hf.get("rope_theta")
    if params:
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in _SUPPORTED_ROPE:
            raise ValueError(
                f"unsupported HF config field rope_parameters.rope_type={kind!r} (supported: "
                f"{list(_SUPPORTED_ROPE)}); rope_parameters={params!r}"
            )
        theta = params.get("rope_theta", theta)
    return float(10000.0 if theta is None else theta)


def _check_false(hf: Mapping[str, Any], *fields: str) -> None:
    for field in fields:
        if hf.get(field, False):
            raise ValueError(f"unsupported HF config field {field}={hf[field]!r}: Lumen has no such bias")


def _activation(hf: Mapping[str, Any], keys: tuple[str, ...], default: str, allowed: Mapping[str, str]) -> str:
    key = next((k for k in keys if hf.get(k) is not None), keys[0])
    act = hf.get(key, default)
    if act not in allowed:
        raise ValueError(f"unsupported HF config field {key}={act!r}: implemented are {sorted(allowed)}")
    return allowed[act]


def _common_config(hf: Mapping[str, Any], *, tie_default: bool = False) -> dict[str, Any]:
    """LMConfig kwargs every Llama-like family shares (sizes, rope, eps, special tokens)."""
    rope_theta = _rope_theta(hf)
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    absent = [k for k in required if hf.get(k) is None]
    if absent:
        raise ValueError(f"HF config is missing required fields {absent}")
    n_heads = int(hf["num_attention_heads"])
    eos = hf.get("eos_token_id")
    eos_ids = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    bos = hf.get("bos_token_id")
    pad = hf.get("pad_token_id")
    tie = hf.get("tie_word_embeddings")
    return dict(
        vocab_size=int(hf["vocab_size"]),
        d_model=int(hf["hidden_size"]),
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // n_heads),
        d_ff=int(hf["intermediate_size"]),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        rope_theta=rope_theta,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(tie_default if tie is None else tie),
        bos_id=None if bos is None else int(bos),
        eos_ids=eos_ids,
        pad_id=None if pad is None else int(pad),  # null stays null: padding is carried by masks and lengths
    )


_LAYER_TYPES = ("sliding_attention", "full_attention")


def _windows(hf: Mapping[str, Any], window: int | None, default_sliding: Callable[[int], bool]) -> dict[str, Any]:
    """sliding_window / sliding_window_layers from HF `sliding_window` and `layer_types` (or the family default)."""
    if window is None:
        return {}
    L = int(hf["num_hidden_layers"])
    types = hf.get("layer_types") or [_LAYER_TYPES[0] if default_sliding(i) else _LAYER_TYPES[1] for i in range(L)]
    bad = sorted({t for t in types if t not in _LAYER_TYPES})
    if bad or len(types) != L:
        raise ValueError(
            f"unsupported HF config field layer_types={list(types)!r}: expected {L} entries from {list(_LAYER_TYPES)}"
        )
    local = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    if not local:
        return {}
    return dict(sliding_window=int(window), sliding_window_layers=None if len(local) == L else local)


def _llama_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Maps a LlamaConfig dict to LMConfig kwargs; raises ValueError naming any unsupported field."""
    _check_false(hf, "attention_bias", "mlp_bias")
    _activation(hf, ("hidden_act",), "silu", {"silu": "silu"})
    return _common_config(hf)


def _mistral_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """MistralConfig: Llama plus a sliding window on every layer (HF Mistral ignores layer_types)."""
    _activation(hf, ("hidden_act",), "silu", {"silu": "silu"})
    window = hf.get("sliding_window")
    return {**_common_config(hf), **({} if window is None else dict(sliding_window=int(window)))}


def _qwen2_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Qwen2Config: Llama plus q/k/v biases; sliding layers only with use_sliding_window (from layer_types)."""
    _activation(hf, ("hidden_act",), "silu", {"silu": "silu"})
    window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
    max_window_layers = int(hf.get("max_window_layers", 0) or 0)
    return {**_common_config(hf), "qkv_bias": True, **_windows(hf, window, lambda i: i >= max_window_layers)}


_GELU = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}


def _no_bidirectional(hf: Mapping[str, Any]) -> None:
    if hf.get("use_bidirectional_attention"):
        raise ValueError("unsupported HF config field use_bidirectional_attention=True: Lumen LMs are causal")


def _gemma_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """GemmaConfig: GeGLU, RMSNorm (1 + w), embeddings times sqrt(d_model), tied by default.

    As transformers does, a legacy `hidden_act="gelu"` (the official Gemma releases) means the tanh approximation.
    """
    _check_false(hf, "attention_bias")
    _no_bidirectional(hf)
    act = _activation(hf, ("hidden_act", "hidden_activation"), "gelu_pytorch_tanh", {**_GELU, "gelu": "gelu_tanh"})
    return {
        **_common_config(hf, tie_default=True),
        "mlp_activation": act,
        "norm_plus_one": True,
        "scale_embeddings": True,
    }


def _gemma2_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Gemma2Config: Gemma plus sandwich norms, both softcaps, query_pre_attn_scalar, alternating local layers."""
    _check_false(hf, "attention_bias")
    _no_bidirectional(hf)
    act = _activation(hf, ("hidden_activation", "hidden_act"), "gelu_pytorch_tanh", _GELU)
    softcaps = {k: hf.get(k, d) for k, d in (("attn_logit_softcapping", 50.0), ("final_logit_softcapping", 30.0))}
    return {
        **_common_config(hf, tie_default=True),
        "mlp_activation": act,
        "norm_plus_one": True,
        "scale_embeddings": True,
        "post_norms": True,
        "attn_logit_softcap": None
        if softcaps["attn_logit_softcapping"] is None
        else float(softcaps["attn_logit_softcapping"]),
        "final_logit_softcap": None
        if softcaps["final_logit_softcapping"] is None
        else float(softcaps["final_logit_softcapping"]),
        "query_pre_attn_scalar": float(hf.get("query_pre_attn_scalar", 256)),
        **_windows(hf, hf.get("sliding_window", 4096), lambda i: i % 2 == 0),
    }


_HF_ACT = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}


def _layer_types(cfg: LMConfig) -> list[str]:
    return [_LAYER_TYPES[0] if w is not None else _LAYER_TYPES[1] for w in cfg.layer_windows]


def _llama_hf(cfg: LMConfig) -> dict[str, Any]:
    return dict(hidden_act=_HF_ACT[cfg.mlp_activation], attention_bias=False, mlp_bias=False)


def _mistral_hf(cfg: LMConfig) -> dict[str, Any]:
    return dict(hidden_act=_HF_ACT[cfg.mlp_activation], sliding_window=cfg.sliding_window)


def _qwen2_hf(cfg: LMConfig) -> dict[str, Any]:
    windowed = cfg.sliding_window is not None
    return dict(
        hidden_act=_HF_ACT[cfg.mlp_activation],
        use_sliding_window=windowed,
        sliding_window=cfg.sliding_window,
        max_window_layers=0,
        layer_types=_layer_types(cfg),
    )


def _gemma_hf(cfg: LMConfig) -> dict[str, Any]:
    return dict(hidden_act=_HF_ACT[cfg.mlp_activation], attention_bias=False)


def _gemma2_hf(cfg: LMConfig) -> dict[str, Any]:
    return dict(
        hidden_activation=_HF_ACT[cfg.mlp_activation],
        attention_bias=False,
        attn_logit_softcapping=cfg.attn_logit_softcap,
        final_logit_softcapping=cfg.final_logit_softcap,
        query_pre_attn_scalar=_gemma2_query_scalar(cfg),
        sliding_window=cfg.sliding_window,
        layer_types=_layer_types(cfg),
    )


# ----------------------------------------------------------------------------------------------- tables
def _layer_rules(prefix: str, *, qkv_bias: bool = False, sandwich: bool = False) -> tuple[Rule, ...]:
    """Rows shared by Llama-style decoders (`{prefix}.layers.{i}....`); Qwen2 biases, Gemma-2 norm names."""
    p = f"{prefix}.layers.{{i}}"
    proj = {"q": "n_heads", "k": "n_kv_heads", "v": "n_kv_heads"}
    rows = [Rule(f"{p}.input_layernorm.weight", ("layers", "attn_norm", "scale"), lambda c: (c.d_model,))]
    for name, attr in proj.items():
        rows.append(
            Rule(
                f"{p}.self_attn.{name}_proj.weight",
                ("layers", "attn", f"{name}_proj", "kernel"),
                lambda c, a=attr: (getattr(c, a) * c.head_dim, c.d_model),
                split_heads_out(attr),
            )
        )
        if qkv_bias:
            rows.append(
                Rule(
                    f"{p}.self_attn.{name}_proj.bias",
                    ("layers", "attn", f"{name}_proj", "bias"),
                    lambda c, a=attr: (getattr(c, a) * c.head_dim,),
                    split_bias(attr),
                )
            )
    rows.append(
        Rule(
            f"{p}.self_attn.o_proj.weight",
            ("layers", "attn", "o_proj", "kernel"),
            lambda c: (c.d_model, c.n_heads * c.head_dim),
            split_heads_in,
        )
    )
    if sandwich:  # Gemma-2: post_attention_layernorm normalises the attention output; pre_feedforward feeds the MLP
        norms = {
            "post_attention_layernorm": "post_attn_norm",
            "pre_feedforward_layernorm": "mlp_norm",
            "post_feedforward_layernorm": "post_mlp_norm",
        }
    else:
        norms = {"post_attention_layernorm": "mlp_norm"}
    rows += [
        Rule(f"{p}.{hf}.weight", ("layers", lumen, "scale"), lambda c: (c.d_model,)) for hf, lumen in norms.items()
    ]
    for name, shape in (("gate_proj", lambda c: (c.d_ff, c.d_model)), ("up_proj", lambda c: (c.d_ff, c.d_model))):
        rows.append(Rule(f"{p}.mlp.{name}.weight", ("layers", "mlp", name, "kernel"), shape, transpose))
    rows.append(
        Rule(
            f"{p}.mlp.down_proj.weight",
            ("layers", "mlp", "down_proj", "kernel"),
            lambda c: (c.d_model, c.d_ff),
            transpose,
        )
    )
    return tuple(rows)


def _decoder_rules(**layer_kw: Any) -> tuple[Rule, ...]:
    return (
        Rule("model.embed_tokens.weight", ("embed", "embedding"), lambda c: (c.vocab_size, c.d_model)),
        *_layer_rules("model", **layer_kw),
        Rule("model.norm.weight", ("final_norm", "scale"), lambda c: (c.d_model,)),
        Rule(
            "lm_head.weight",
            ("lm_head", "kernel"),
            lambda c: (c.vocab_size, c.d_model),
            transpose,
            when=lambda c: not c.tie_embeddings,
        ),
    )


LLAMA_RULES: tuple[Rule, ...] = _decoder_rules()
_ROTARY_BUFFER = (r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$",)  # saved by old versions
_TIED = ("lm_head.weight", "model.embed_tokens.weight")

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(("LlamaForCausalLM",), _llama_config, LLAMA_RULES, _llama_hf, _ROTARY_BUFFER, _TIED),
    "mistral": ArchSpec(("MistralForCausalLM",), _mistral_config, LLAMA_RULES, _mistral_hf, _ROTARY_BUFFER, _TIED),
    "qwen2": ArchSpec(
        ("Qwen2ForCausalLM",), _qwen2_config, _decoder_rules(qkv_bias=True), _qwen2_hf, _ROTARY_BUFFER, _TIED
    ),
    "gemma": ArchSpec(("GemmaForCausalLM",), _gemma_config, LLAMA_RULES, _gemma_hf, _ROTARY_BUFFER, _TIED),
    "gemma2": ArchSpec(
        ("Gemma2ForCausalLM",), _gemma2_config, _decoder_rules(sandwich=True), _gemma2_hf, _ROTARY_BUFFER, _TIED
    ),
}


def supported_architectures() -> list[str]:
    """Every `config.json["architectures"]` entry that `load_hf_checkpoint` imports."""
    return sorted(a for spec in ARCHITECTURES.values() for a in spec.architectures)


def _arch_spec(hf_config: Mapping[str, Any]) -> ArchSpec:
    model_type = hf_config.get("model_type")
    archs = list(hf_config.get("architectures") or [])
    if model_type == "paligemma":
        raise ValueError(
            "model_type='paligemma' is a vision-language model: load it with "
            "framework.models.hf_paligemma.load_paligemma_checkpoint(path)"
        )
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"unsupported HF architecture {archs or None} (config field model_type={model_type!r}); supported "
            f"architectures: {supported_architectures()} (model_type one of {sorted(ARCHITECTURES)})"
        )
    spec = ARCHITECTURES[model_type]
    bad = [a for a in archs if a not in spec.architectures]
    if bad:
        raise ValueError(
            f"unsupported HF config field architectures={bad!r} for model_type={model_type!r}; "
            f"supported: {list(spec.architectures)} (all supported architectures: {supported_architectures()})"
        )
    return spec


def hf_config_to_lm_config(hf_config: Mapping[str, Any], **overrides: Any) -> LMConfig:
    """Converts an HF `config.json` dict to an LMConfig; `overrides` (e.g. attention_impl='cudnn') win.

    Its `tokenizer` is "hf": the tokenizer.json beside config.json (`tokenizer.get_tokenizer("hf", folder=path)`).
    Raises ValueError naming the field for an unsupported model_type/architectures or feature (rope scaling,
    biases, an activation Lumen lacks).
    """
    kwargs = _arch_spec(hf_config).config_fn(hf_config)
    kwargs["tokenizer"] = "hf"
    kwargs.update(overrides)
    return LMConfig(**kwargs)


# ----------------------------------------------------------------------------------------------- export config
# LMConfig fields that choose how Lumen runs a model, not what the checkpoint holds: never part of config.json (the
# tokenizer travels as its own tokenizer.json file).
_RUNTIME_FIELDS = ("attention_impl", "scan_layers", "remat", "dtype", "param_dtype", "init_std", "tokenizer")


def default_model_type(cfg: LMConfig) -> str:
    """The HF `model_type` whose features match `cfg` most simply (Gemma-2 > Gemma > Qwen2 > Mistral > Llama)."""
    if cfg.post_norms or cfg.attn_logit_softcap is not None or cfg.query_pre_attn_scalar is not None:
        return "gemma2"
    if cfg.norm_plus_one or cfg.scale_embeddings:
        return "gemma"
    if cfg.qkv_bias:
        return "qwen2"
    return "mistral" if cfg.sliding_window is not None else "llama"


def lm_config_to_hf_config(
    cfg: LMConfig, model_type: str | None = None, *, base: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The `config.json` dict of `cfg` as an HF `model_type` (default: `default_model_type(cfg)`, or `base`'s).

    `base` (the imported checkpoint's own config.json): every field of it is written back unchanged (null stays
    null, fields Lumen does not model such as Qwen2's max_window_layers or initializer_range are carried through)
    as long as it still describes `cfg`; only fields that no longer do (a changed eos_ids, say) are rewritten.
    Raises ValueError naming every LMConfig field that family cannot express (e.g. a final-logit softcap on Llama):
    the dict is converted back with `hf_config_to_lm_config` and must give the same model.
    """
    cfg = LMConfig.from_config(cfg)
    if base is None:
        return _own_hf_config(cfg, model_type)
    if model_type is not None and model_type != base.get("model_type"):
        raise ValueError(f"model_type={model_type!r} but the source config is model_type={base.get('model_type')!r}")
    try:
        hf = _own_hf_config(cfg, base.get("model_type"))
    except ValueError as e:
        raise ValueError(
            f"the model cannot be written as the source's model_type={base.get('model_type')!r}: {e}"
        ) from None
    merged = {**hf, **base}  # the original wins wherever it still gives the same model
    if not _loses(cfg, merged):
        return merged
    # The model changed: take Lumen's value of every field the two disagree on, then give each back to the original
    # wherever the model does not need the change (so unmodelled fields such as max_window_layers stay).
    changed = [k for k in hf if k in base and base[k] != hf[k]]
    merged.update({k: hf[k] for k in changed})
    lost = _lost_fields(cfg, merged)
    if lost:
        raise ValueError(
            f"cannot write model.{', model.'.join(lost)} into the base config of model_type={hf['model_type']!r}"
        )
    for k in changed:
        trial = {**merged, k: base[k]}
        if not _loses(cfg, trial):
            merged = trial
    return merged


def _loses(cfg: LMConfig, hf: Mapping[str, Any]) -> bool:
    """Whether `hf` fails to describe `cfg` (or does not convert at all)."""
    try:
        return bool(_lost_fields(cfg, hf))
    except ValueError:
        return True


def _lost_fields(cfg: LMConfig, hf: Mapping[str, Any]) -> list[str]:
    """LMConfig fields whose value `hf` (a config.json dict) does not reproduce."""
    back = hf_config_to_lm_config(hf, **{f: getattr(cfg, f) for f in _RUNTIME_FIELDS})
    fields = [f.name for f in dataclasses.fields(LMConfig) if f.name != "query_pre_attn_scalar"]
    lost = [f for f in fields if getattr(back, f) != getattr(cfg, f)]
    return lost + (["query_pre_attn_scalar"] if back.sm_scale != cfg.sm_scale else [])


def _own_hf_config(cfg: LMConfig, model_type: str | None) -> dict[str, Any]:
    """The config.json dict Lumen writes from `cfg` alone; ValueError naming what the family cannot express."""
    model_type = default_model_type(cfg) if model_type is None else model_type
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model_type={model_type!r}: exportable are {sorted(ARCHITECTURES)}")
    spec = ARCHITECTURES[model_type]
    eos = list(cfg.eos_ids)
    hf: dict[str, Any] = dict(
        architectures=[spec.architectures[0]],
        model_type=model_type,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        intermediate_size=cfg.d_ff,
        max_position_embeddings=cfg.max_seq_len,
        rope_parameters={"rope_theta": cfg.rope_theta, "rope_type": "default"},
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=cfg.bos_id,
        eos_token_id=(eos[0] if len(eos) == 1 else eos) if eos else None,
        pad_token_id=cfg.pad_id,
        dtype=cfg.param_dtype,
    )
    hf.update(spec.to_hf_config(cfg))
    lost = _lost_fields(cfg, hf)
    if lost:
        raise ValueError(
            f"model_type={model_type!r} cannot express "
            + ", ".join(f"model.{f}={getattr(cfg, f)!r}" for f in lost)
            + f"; exportable families: {sorted(ARCHITECTURES)}"
        )
    return hf


def _gemma2_query_scalar(cfg: LMConfig) -> int | float:
    """query_pre_attn_scalar as transformers' Gemma2Config validates it: an int (a float only if fractional)."""
    value = float(cfg.query_pre_attn_scalar or cfg.head_dim)
    return int(value) if value.is_integer() else value
