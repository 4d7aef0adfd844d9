"""Import and export Hugging Face safetensors checkpoints (Llama, Mistral, Qwen2, Gemma, Gemma-2) for `lm`.

Glossary: L layers, D model, H heads, K kv-heads, Dh head dim, F mlp, V vocab.

  cfg, params = load_hf_checkpoint("path/to/hf_folder")     # config.json + model.safetensors[.index.json]
  logits_BTV = lm.apply(params, tokens_BT, cfg)
  save_hf_checkpoint(params, cfg, "out_folder")              # config.json + model.safetensors, transformers-loadable
  tokenizer = load_hf_tokenizer("path/to/hf_folder")         # a `tokenizers.Tokenizer` from tokenizer.json

Tensors are mapped by a declarative table per `model_type` (`ARCHITECTURES`): each row names an HF tensor
pattern (`{i}` = layer index), the Lumen param path, the HF shape it must have and the transform into Lumen's
layout (every transform is "maybe transpose, then reshape", so export inverts it exactly). Per-layer tensors are
stacked on axis 0. Tensors are streamed one at a time with `safetensors.safe_open` (numpy; never pickle, never
torch). Missing, unexpected and mis-shaped tensors are reported together in one ValueError. A family is a config
converter (HF config.json <-> LMConfig fields) plus its rows.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import re
import struct
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open

from framework.models.lm import LMConfig

Params = dict[str, Any]
Transform = Callable[[np.ndarray, LMConfig], np.ndarray]
ShapeFn = Callable[[LMConfig], tuple[int, ...]]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"


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
        pad_id=0 if pad is None else int(pad),
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


def _gemma_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """GemmaConfig: GeGLU, RMSNorm (1 + w), embeddings times sqrt(d_model), tied by default."""
    _check_false(hf, "attention_bias")
    act = _activation(hf, ("hidden_act", "hidden_activation"), "gelu_pytorch_tanh", _GELU)
    return {
        **_common_config(hf, tie_default=True),
        "mlp_activation": act,
        "norm_plus_one": True,
        "scale_embeddings": True,
    }


def _gemma2_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Gemma2Config: Gemma plus sandwich norms, both softcaps, query_pre_attn_scalar, alternating local layers."""
    _check_false(hf, "attention_bias")
    if hf.get("use_bidirectional_attention"):
        raise ValueError("unsupported HF config field use_bidirectional_attention=True: Lumen LMs are causal")
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

    Raises ValueError naming the field for an unsupported model_type/architectures or feature (rope scaling,
    biases, an activation Lumen lacks).
    """
    kwargs = _arch_spec(hf_config).config_fn(hf_config)
    kwargs.update(overrides)
    return LMConfig(**kwargs)


# ----------------------------------------------------------------------------------------------- reading
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


@functools.lru_cache(maxsize=4)
def _safetensors_header(file: pathlib.Path) -> tuple[int, dict[str, Any]]:
    """(data start offset, header dict) of a safetensors file."""
    with open(file, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        return 8 + header_len, json.loads(f.read(header_len))


def _read_raw_bf16(file: pathlib.Path, name: str) -> np.ndarray:
    """Reads one BF16 tensor from the safetensors layout (safe_open's numpy backend cannot) as float32."""
    data_start, header = _safetensors_header(file)
    begin, end = header[name]["data_offsets"]
    with open(file, "rb") as f:
        f.seek(data_start + begin)
        raw = np.frombuffer(f.read(end - begin), dtype="<u2")
    # bf16 is the top half of an fp32: widening is exact.
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(header[name]["shape"])


def _get_tensor(handle, file: pathlib.Path, name: str) -> np.ndarray:
    if handle.get_slice(name).get_dtype() == "BF16":
        return _read_raw_bf16(file, name)
    return handle.get_tensor(name)


def _checkpoint_files(path: pathlib.Path) -> list[pathlib.Path]:
    if (path / INDEX_FILE).exists():
        weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    if (path / SINGLE_FILE).exists():
        return [path / SINGLE_FILE]
    found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    raise FileNotFoundError(
        f"no {SINGLE_FILE} or {INDEX_FILE} in {path} (found {found}); pickle checkpoints "
        "(pytorch_model.bin) are not loaded: convert them to safetensors first"
    )


def _set_path(tree: Params, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def load_hf_checkpoint(
    path: str | pathlib.Path, *, param_dtype: str = "float32", **config_overrides: Any
) -> tuple[LMConfig, Params]:
    """Loads a local HF folder (config.json + safetensors) as `(LMConfig, params)` for `framework.models.lm`.

    Args:
      path: folder with config.json and model.safetensors or model.safetensors.index.json + shards.
      param_dtype: dtype of the returned params ("float32", "bfloat16" or "float16"), whatever the file holds.
      **config_overrides: LMConfig fields to set on top of the converted HF config (e.g. scan_layers=False).

    Returns:
      The LMConfig and a nested dict of jax arrays in `lm.init`'s layout (layers stacked on axis 0).

    Raises:
      ValueError: unsupported config field, or (all at once) missing / unexpected / mis-shaped tensors.
      FileNotFoundError: no config.json, no safetensors, or a shard named by the index is absent.
    """
    path = pathlib.Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no config.json in HF checkpoint folder {path}")
    hf_config = json.loads((path / "config.json").read_text())
    spec = _arch_spec(hf_config)
    cfg = hf_config_to_lm_config(hf_config, param_dtype=param_dtype, **config_overrides)
    rules = [r for r in spec.rules if r.when(cfg)]
    state = _Collected()
    for file in _checkpoint_files(path):
        if not file.exists():
            raise FileNotFoundError(f"shard {file.name} listed in {INDEX_FILE} does not exist in {path}")
        _collect_file(file, spec, rules, cfg, _NP_DTYPES[param_dtype], state)

    L = cfg.n_layers
    expected = [r.hf.replace("{i}", str(i)) for r in rules for i in (range(L) if r.per_layer else [0])]
    missing = [n for n in expected if n not in state.seen]
    problems = []
    if state.tied_lm_head is not None and spec.tied_alias[1] in state.seen and not state.misshaped:
        embed_path = next(r.path for r in rules if r.hf == spec.tied_alias[1])
        embed = state.buffers[embed_path].astype(np.float32)
        head = state.tied_lm_head.astype(_NP_DTYPES[param_dtype]).astype(np.float32)
        if head.shape != embed.shape or not np.array_equal(head, embed):
            problems.append(f"{spec.tied_alias[0]} differs from {spec.tied_alias[1]} although tie_word_embeddings=True")
    for title, names in (("missing", missing), ("unexpected", state.unexpected), ("mis-shaped", state.misshaped)):
        if names:
            problems.append(f"{len(names)} {title} tensor(s):\n    " + "\n    ".join(names))
    if problems:
        raise ValueError(
            f"HF checkpoint {path} does not match model_type={hf_config['model_type']!r} "
            f"({L} layers):\n  " + "\n  ".join(problems)
        )

    params: Params = {}
    for p, value in state.buffers.items():
        _set_path(params, p, jnp.asarray(value))
    return cfg, params


@dataclasses.dataclass
class _Collected:
    """What the tensor stream has produced so far (filled shard by shard)."""

    buffers: dict[tuple[str, ...], np.ndarray] = dataclasses.field(default_factory=dict)
    seen: set[str] = dataclasses.field(default_factory=set)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    misshaped: list[str] = dataclasses.field(default_factory=list)
    tied_lm_head: np.ndarray | None = None  # an lm_head saved although tied: must equal the embedding


def _collect_file(
    file: pathlib.Path, spec: ArchSpec, rules: list[Rule], cfg: LMConfig, out_dtype, state: _Collected
) -> None:
    """Streams one safetensors file through the mapping table into `state` (one tensor in memory at a time)."""
    matchers = [(r, r.regex()) for r in rules]
    ignore = [re.compile(p) for p in spec.ignore]
    L = cfg.n_layers
    with safe_open(str(file), framework="numpy") as handle:
        for name in handle.keys():
            if any(p.match(name) for p in ignore):
                continue
            if spec.tied_alias and cfg.tie_embeddings and name == spec.tied_alias[0]:
                state.tied_lm_head = _get_tensor(handle, file, name)
                continue
            match = next(((r, m) for r, rx in matchers if (m := rx.match(name))), None)
            if match is None:
                state.unexpected.append(name)
                continue
            rule, m = match
            layer = int(m.group(1)) if rule.per_layer else None
            if layer is not None and layer >= L:
                state.unexpected.append(f"{name} (layer {layer} >= num_hidden_layers={L})")
                continue
            if name in state.seen:
                state.unexpected.append(f"{name} (duplicate)")
                continue
            shape, want = tuple(handle.get_slice(name).get_shape()), rule.hf_shape(cfg)
            if shape != want:
                state.misshaped.append(f"{name}: shape {list(shape)}, expected {list(want)}")
                state.seen.add(name)  # present, so not "missing" too
                continue
            state.seen.add(name)
            value = rule.transform(_get_tensor(handle, file, name).astype(np.float32), cfg).astype(out_dtype)
            if layer is None:
                state.buffers[rule.path] = value
            else:
                if rule.path not in state.buffers:
                    state.buffers[rule.path] = np.empty((L, *value.shape), out_dtype)
                state.buffers[rule.path][layer] = value


# ----------------------------------------------------------------------------------------------- export
# LMConfig fields that choose how Lumen runs a model, not what the checkpoint holds: never part of config.json.
_RUNTIME_FIELDS = ("attention_impl", "scan_layers", "remat", "dtype", "param_dtype", "init_std")
_ST_DTYPES = {
    np.dtype(np.float32): "F32",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.float16): "F16",
}


def default_model_type(cfg: LMConfig) -> str:
    """The HF `model_type` whose features match `cfg` most simply (Gemma-2 > Gemma > Qwen2 > Mistral > Llama)."""
    if cfg.post_norms or cfg.attn_logit_softcap is not None or cfg.query_pre_attn_scalar is not None:
        return "gemma2"
    if cfg.norm_plus_one or cfg.scale_embeddings:
        return "gemma"
    if cfg.qkv_bias:
        return "qwen2"
    return "mistral" if cfg.sliding_window is not None else "llama"


def lm_config_to_hf_config(cfg: LMConfig, model_type: str | None = None) -> dict[str, Any]:
    """The `config.json` dict of `cfg` as an HF `model_type` (default: `default_model_type(cfg)`).

    Raises ValueError naming every LMConfig field that family cannot express (e.g. a final-logit softcap on Llama):
    the dict is converted back with `hf_config_to_lm_config` and must give the same model.
    """
    cfg = LMConfig.from_config(cfg)
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
    back = hf_config_to_lm_config(hf, **{f: getattr(cfg, f) for f in _RUNTIME_FIELDS})
    fields = [f.name for f in dataclasses.fields(LMConfig) if f.name != "query_pre_attn_scalar"]
    lost = [f for f in fields if getattr(back, f) != getattr(cfg, f)]
    lost += ["query_pre_attn_scalar"] if back.sm_scale != cfg.sm_scale else []
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


def _flat(tree: Params, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, (*prefix, k)))
        else:
            out[(*prefix, k)] = v
    return out


def _stacked(params: Params, cfg: LMConfig) -> Params:
    """Params in the stacked layout (`lm.unstack_layers` output is restacked)."""
    if "layers" in params or "layer_0" not in params:
        return params
    per_layer = [params[f"layer_{l}"] for l in range(cfg.n_layers)]
    out = {k: v for k, v in params.items() if not k.startswith("layer_")}
    out["layers"] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *per_layer)
    return out


def _write_safetensors(file: pathlib.Path, tensors: dict[str, np.ndarray]) -> None:
    """Writes the safetensors layout (8-byte header length, JSON header, raw little-endian data); bf16 included."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, x in tensors.items():
        header[name] = {
            "dtype": _ST_DTYPES[x.dtype],
            "shape": list(x.shape),
            "data_offsets": [offset, offset + x.nbytes],
        }
        offset += x.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for x in tensors.values():
            f.write(np.ascontiguousarray(x).tobytes())


def save_hf_checkpoint(
    params: Params,
    cfg: LMConfig | Mapping[str, Any],
    path: str | pathlib.Path,
    *,
    model_type: str | None = None,
    max_shard_bytes: int | None = None,
) -> pathlib.Path:
    """Writes `params` as an HF folder (config.json + model.safetensors) that transformers and `load_hf_checkpoint`
    load: the exact inverse of the import (load(save(params)) is bitwise equal).

    Args:
      params: `lm.init` layout (stacked or `lm.unstack_layers`), float32/bfloat16/float16 leaves; quantised or
        LoRA weights must be merged/dequantised first.
      cfg: the model's LMConfig.
      path: output folder (created; existing files of the same names are overwritten).
      model_type: HF family to write ("llama", "mistral", "qwen2", "gemma", "gemma2"); default from the config.
      max_shard_bytes: split into model-0000i-of-0000n.safetensors + index above this size (default: one file).

    Raises:
      ValueError: a config field the family cannot express, a param not in its table, or a mis-shaped / non-float
        leaf (named).
    """
    cfg = LMConfig.from_config(cfg)
    hf_config = lm_config_to_hf_config(cfg, model_type)
    spec = ARCHITECTURES[hf_config["model_type"]]
    rules = [r for r in spec.rules if r.when(cfg)]
    flat = _flat(_stacked(params, cfg))
    problems = []
    for p, leaf in flat.items():
        if hasattr(leaf, "matmul"):
            problems.append(f"{'/'.join(p)} is a {type(leaf).__name__}: merge adapters / dequantise before export")
    extra = sorted("/".join(p) for p in set(flat) - {r.path for r in rules})
    missing = sorted("/".join(r.path) for r in rules if r.path not in flat)
    for title, names in (("unexpected", extra), ("missing", missing)):
        if names:
            problems.append(f"{len(names)} {title} param(s) for model_type={hf_config['model_type']!r}: {names}")
    tensors: dict[str, np.ndarray] = {}
    for r in rules:
        if r.path not in flat or hasattr(flat[r.path], "matmul"):
            continue
        value = np.asarray(jax.device_get(flat[r.path]))
        lumen_shape = r.transform(np.empty(r.hf_shape(cfg), np.float32), cfg).shape
        want = (cfg.n_layers, *lumen_shape) if r.per_layer else lumen_shape
        if value.shape != tuple(want) or value.dtype not in _ST_DTYPES:
            problems.append(f"{'/'.join(r.path)}: {value.dtype}{list(value.shape)}, expected a float {list(want)}")
            continue
        for l in range(cfg.n_layers) if r.per_layer else [None]:
            name = r.hf if l is None else r.hf.replace("{i}", str(l))
            tensors[name] = r.to_hf(value if l is None else value[l], cfg)
    if problems:
        raise ValueError("cannot export params as an HF checkpoint:\n  " + "\n  ".join(problems))

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtypes = {str(x.dtype) for x in tensors.values()}
    hf_config["dtype"] = dtypes.pop() if len(dtypes) == 1 else "float32"
    (path / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    shards: list[dict[str, np.ndarray]] = [{}]
    for name, x in tensors.items():
        if max_shard_bytes and shards[-1] and sum(t.nbytes for t in shards[-1].values()) + x.nbytes > max_shard_bytes:
            shards.append({})
        shards[-1][name] = x
    if len(shards) == 1:
        _write_safetensors(path / SINGLE_FILE, shards[0])
        return path
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(path / file, shard)
        weight_map.update({name: file for name in shard})
    index = {"metadata": {"total_size": sum(x.nbytes for x in tensors.values())}, "weight_map": weight_map}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return path


# ----------------------------------------------------------------------------------------------- tokenizer
def load_hf_tokenizer(path: str | pathlib.Path, *, vocab_size: int | None = None):
    """The folder's `tokenizer.json` as a `tokenizers.Tokenizer` (the fast-tokenizer format; no transformers).

    `vocab_size` (e.g. `cfg.vocab_size`): raise if the tokenizer can emit ids the model has no embedding for.
    Raises FileNotFoundError when the folder has no tokenizer.json (a sentencepiece `tokenizer.model` must be
    converted first, e.g. with transformers' `AutoTokenizer(...).save_pretrained`).
    """
    from tokenizers import Tokenizer

    path = pathlib.Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() or not path.name.endswith(".json") else path
    if not file.exists():
        found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        raise FileNotFoundError(
            f"no {TOKENIZER_FILE} in {path} (found {found}); only the `tokenizers` JSON format is loaded: convert "
            "a sentencepiece tokenizer.model with transformers' AutoTokenizer(...).save_pretrained first"
        )
    tokenizer = Tokenizer.from_file(str(file))
    if vocab_size is not None and tokenizer.get_vocab_size() > vocab_size:
        raise ValueError(
            f"{file} has {tokenizer.get_vocab_size()} tokens, more than the model's vocab_size={vocab_size}"
        )
    return tokenizer
