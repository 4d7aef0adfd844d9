"""Import Hugging Face safetensors checkpoints (Llama family) into Lumen's `framework.models.lm` params.

Glossary: L layers, D model, H heads, K kv-heads, Dh head dim, F mlp, V vocab.

  cfg, params = load_hf_checkpoint("path/to/hf_folder")     # config.json + model.safetensors[.index.json]
  logits_BTV = lm.apply(params, tokens_BT, cfg)

Tensors are mapped by a declarative table per `model_type` (`ARCHITECTURES`): each row names an HF tensor
pattern (`{i}` = layer index), the Lumen param path, the HF shape it must have and the transform into Lumen's
layout. Per-layer tensors are stacked on axis 0. Tensors are streamed one at a time with `safetensors.safe_open`
(numpy; never pickle, never torch). Missing, unexpected and mis-shaped tensors are reported together in one
ValueError. To add Qwen2/Mistral/Gemma: write its config converter and rows, and add an `ArchSpec` entry.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import re
import struct
from typing import Any, Callable, Mapping

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

    return fn


def split_heads_in(w: np.ndarray, cfg: LMConfig) -> np.ndarray:
    """o_proj [D, H*Dh] -> [H, Dh, D]."""
    return w.T.reshape(cfg.n_heads, cfg.head_dim, cfg.d_model)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One row of a name-mapping table: HF tensor name pattern -> Lumen param path."""

    hf: str  # e.g. "model.layers.{i}.mlp.up_proj.weight"; "{i}" marks a stacked layer index
    path: tuple[str, ...]  # Lumen param path, e.g. ("layers", "mlp", "up_proj", "kernel")
    hf_shape: ShapeFn  # shape the HF tensor must have (per layer)
    transform: Transform = identity
    when: Callable[[LMConfig], bool] = lambda cfg: True  # row applies only if True (e.g. untied lm_head)

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf

    def regex(self) -> re.Pattern:
        return re.compile("^" + re.escape(self.hf).replace(re.escape("{i}"), r"(\d+)") + "$")


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """Everything needed to import one HF `model_type`."""

    architectures: tuple[str, ...]  # accepted `config.json["architectures"]` entries
    config_fn: Callable[[Mapping[str, Any]], dict[str, Any]]  # HF config -> LMConfig kwargs (raises if unsupported)
    rules: tuple[Rule, ...]
    ignore: tuple[str, ...] = ()  # regexes of HF tensors that are dropped on purpose
    tied_alias: tuple[str, str] | None = None  # (lm_head name, embedding name) when tie is allowed


# ----------------------------------------------------------------------------------------------- Llama
_LLAMA_SUPPORTED_ROPE = ("default",)


def _llama_rope_theta(hf: Mapping[str, Any]) -> float:
    """rope_theta from a transformers<5 (`rope_theta`, `rope_scaling`) or >=5 (`rope_parameters`) config."""
    scaling = hf.get("rope_scaling")
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in _LLAMA_SUPPORTED_ROPE:
            raise ValueError(
                f"unsupported HF config field rope_scaling={scaling!r}: rope type {kind!r} is not "
                f"implemented (supported: {list(_LLAMA_SUPPORTED_ROPE)} / no rope_scaling)"
            )
    params = hf.get("rope_parameters")
    theta = hf.get("rope_theta")
    if params:
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in _LLAMA_SUPPORTED_ROPE:
            raise ValueError(
                f"unsupported HF config field rope_parameters.rope_type={kind!r} (supported: "
                f"{list(_LLAMA_SUPPORTED_ROPE)}); rope_parameters={params!r}"
            )
        theta = params.get("rope_theta", theta)
    return float(10000.0 if theta is None else theta)


def _llama_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Maps a LlamaConfig dict to LMConfig kwargs; raises ValueError naming any unsupported field."""
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field, False):
            raise ValueError(f"unsupported HF config field {field}={hf[field]!r}: Lumen projections have no bias")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported HF config field hidden_act={act!r}: only 'silu' (SwiGLU) is implemented")
    rope_theta = _llama_rope_theta(hf)
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    absent = [k for k in required if hf.get(k) is None]
    if absent:
        raise ValueError(f"HF config is missing required fields {absent}")
    n_heads = int(hf["num_attention_heads"])
    eos = hf.get("eos_token_id")
    eos_ids = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    bos = hf.get("bos_token_id")
    pad = hf.get("pad_token_id")
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
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_id=None if bos is None else int(bos),
        eos_ids=eos_ids,
        pad_id=0 if pad is None else int(pad),
    )


def _layer_rules(prefix: str) -> tuple[Rule, ...]:
    """Rows shared by Llama-style decoders (`{prefix}.layers.{i}....`)."""
    p = f"{prefix}.layers.{{i}}"
    return (
        Rule(f"{p}.input_layernorm.weight", ("layers", "attn_norm", "scale"), lambda c: (c.d_model,)),
        Rule(
            f"{p}.self_attn.q_proj.weight",
            ("layers", "attn", "q_proj", "kernel"),
            lambda c: (c.n_heads * c.head_dim, c.d_model),
            split_heads_out("n_heads"),
        ),
        Rule(
            f"{p}.self_attn.k_proj.weight",
            ("layers", "attn", "k_proj", "kernel"),
            lambda c: (c.n_kv_heads * c.head_dim, c.d_model),
            split_heads_out("n_kv_heads"),
        ),
        Rule(
            f"{p}.self_attn.v_proj.weight",
            ("layers", "attn", "v_proj", "kernel"),
            lambda c: (c.n_kv_heads * c.head_dim, c.d_model),
            split_heads_out("n_kv_heads"),
        ),
        Rule(
            f"{p}.self_attn.o_proj.weight",
            ("layers", "attn", "o_proj", "kernel"),
            lambda c: (c.d_model, c.n_heads * c.head_dim),
            split_heads_in,
        ),
        Rule(f"{p}.post_attention_layernorm.weight", ("layers", "mlp_norm", "scale"), lambda c: (c.d_model,)),
        Rule(
            f"{p}.mlp.gate_proj.weight",
            ("layers", "mlp", "gate_proj", "kernel"),
            lambda c: (c.d_ff, c.d_model),
            transpose,
        ),
        Rule(
            f"{p}.mlp.up_proj.weight", ("layers", "mlp", "up_proj", "kernel"), lambda c: (c.d_ff, c.d_model), transpose
        ),
        Rule(
            f"{p}.mlp.down_proj.weight",
            ("layers", "mlp", "down_proj", "kernel"),
            lambda c: (c.d_model, c.d_ff),
            transpose,
        ),
    )


LLAMA_RULES: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", ("embed", "embedding"), lambda c: (c.vocab_size, c.d_model)),
    *_layer_rules("model"),
    Rule("model.norm.weight", ("final_norm", "scale"), lambda c: (c.d_model,)),
    Rule(
        "lm_head.weight",
        ("lm_head", "kernel"),
        lambda c: (c.vocab_size, c.d_model),
        transpose,
        when=lambda c: not c.tie_embeddings,
    ),
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(
        architectures=("LlamaForCausalLM",),
        config_fn=_llama_config,
        rules=LLAMA_RULES,
        ignore=(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$",),  # buffer saved by old versions
        tied_alias=("lm_head.weight", "model.embed_tokens.weight"),
    ),
}


def _arch_spec(hf_config: Mapping[str, Any]) -> ArchSpec:
    model_type = hf_config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"unsupported HF config field model_type={model_type!r}; supported: {sorted(ARCHITECTURES)}")
    spec = ARCHITECTURES[model_type]
    bad = [a for a in hf_config.get("architectures") or [] if a not in spec.architectures]
    if bad:
        raise ValueError(
            f"unsupported HF config field architectures={bad!r} for model_type={model_type!r}; "
            f"supported: {list(spec.architectures)}"
        )
    return spec


def hf_config_to_lm_config(hf_config: Mapping[str, Any], **overrides: Any) -> LMConfig:
    """Converts an HF `config.json` dict to an LMConfig; `overrides` (e.g. attention_impl='cudnn') win.

    Raises ValueError naming the field for an unsupported model_type/architectures or feature (rope scaling,
    biases, non-SiLU activation).
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
