"""Import and export Hugging Face safetensors checkpoints (Llama, Mistral, Qwen2, Gemma, Gemma-2) for `lm`.

Glossary: L layers, D model, H heads, K kv-heads, Dh head dim, F mlp, V vocab.

  cfg, params = load_hf_checkpoint("path/to/hf_folder")     # config.json + model.safetensors[.index.json]
  logits_BTV = lm.apply(params, tokens_BT, cfg)
  save_hf_checkpoint(params, cfg, "out_folder")              # config.json + model.safetensors, transformers-loadable
  save_hf_checkpoint(params, cfg, "out_folder", source="path/to/hf_folder")  # + every field/file that came in
  tokenizer = load_hf_tokenizer("path/to/hf_folder")         # a `tokenizers.Tokenizer` from tokenizer.json
  tok = tokenizer.tokenizer_for(cfg, folder="path/to/hf_folder")  # the same as a framework.tasks Tokenizer

Special ids are the checkpoint's own: a null `pad_token_id` (Llama) or `bos_token_id` (Qwen2) stays None in the
LMConfig and null in an export. An export with `source=` (the imported folder, or its config dict) writes that
config.json back field for field, changing only what the model changed, and copies the folder's tokenizer and
generation files. Quantised weights are exported dequantised (`quant.dequantize`: a float checkpoint whose weights
equal the quantised ones, noted in the folder's README.md) and LoRA adapters merged (`peft.merge`).

An imported config's `tokenizer` is "hf": the folder's tokenizer.json, wrapped with the folder's special ids by
`framework.tasks.hf_tokenizer.HFTokenizer` (`framework.tasks.tokenizer.tokenizer_for` builds and checks it).

Experiments take an imported model from their `model` section: `model_from_config(config.model)` (a section with
`hf_path`) -> (LMConfig, params, tokenizer or None), checked beforehand from config.json alone by
`hf_model_config(config.model)`. Their text is a local file: `text_file_ids(file, folder, cfg, key=...)` (the
folder's tokenizer.json, else whitespace-separated token ids) cut into rows by `text_rows(ids, seq_len, cfg.bos_id,
"train" | "eval", key=...)` (every tenth row held out).

The families (name tables and config converters) live in `hf_families` (`ARCHITECTURES`). Tensors are streamed one
at a time with `safetensors.safe_open` (numpy; never pickle, never torch) through the family's table; per-layer
tensors are stacked on axis 0. Missing, unexpected and mis-shaped tensors are reported together in one ValueError.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
import re
import shutil
import struct
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open

from framework.models.hf_families import (  # noqa: F401  (re-exported: hf.<name> is the public surface)
    ARCHITECTURES,
    LLAMA_RULES,
    ArchSpec,
    Rule,
    _arch_spec,
    default_model_type,
    hf_config_to_lm_config,
    lm_config_to_hf_config,
    supported_architectures,
)
from framework.models.lm import LMConfig

Params = dict[str, Any]
log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
# Files of an imported folder that an export with `source=` copies unchanged (tokenizer and generation settings).
SIDE_FILES = ("generation_config.json", TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json")


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


_ST_DTYPES = {
    np.dtype(np.float32): "F32",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.float16): "F16",
}


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
    tokenizer: Any = None,
    source: str | pathlib.Path | Mapping[str, Any] | None = None,
) -> pathlib.Path:
    """Writes `params` as an HF folder (config.json + model.safetensors) that transformers and `load_hf_checkpoint`
    load: the exact inverse of the import (load(save(params)) is bitwise equal).

    Args:
      params: `lm.init` layout (stacked or `lm.unstack_layers`), float32/bfloat16/float16 leaves. LoRA weights are
        merged (`peft.merge`) and quantised weights dequantised (`quant.dequantize`, float32: the checkpoint is a
        float one whose weights equal the quantised model's; README.md in the folder says so).
      cfg: the model's LMConfig.
      path: output folder (created; existing files of the same names are overwritten).
      model_type: HF family to write ("llama", "mistral", "qwen2", "gemma", "gemma2"); default from `source`'s
        config, else from the config.
      max_shard_bytes: split into model-0000i-of-0000n.safetensors + index above this size (default: one file).
      tokenizer: a `tokenizers.Tokenizer` (e.g. from `load_hf_tokenizer`) to write as tokenizer.json alongside.
      source: the imported checkpoint (its folder, or its config.json dict): its config is written back unchanged
        wherever it still describes `cfg` (null stays null, unmodelled fields carried through), and a folder's
        `SIDE_FILES` are copied (its tokenizer.json unless `tokenizer` is given).

    Raises:
      ValueError: a config field the family cannot express, a param not in its table, or a mis-shaped / non-float
        leaf (named).
    """
    cfg = LMConfig.from_config(cfg)
    base, source_dir = _source_config(source)
    hf_config = lm_config_to_hf_config(cfg, model_type, base=base)
    spec = ARCHITECTURES[hf_config["model_type"]]
    rules = [r for r in spec.rules if r.when(cfg)]
    params, note = _float_params(params)
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
    if "torch_dtype" in hf_config:  # transformers < 5 name of the same field
        hf_config["torch_dtype"] = hf_config["dtype"]
    (path / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    if source_dir is not None:
        for name in SIDE_FILES:
            if (source_dir / name).exists() and not (name == TOKENIZER_FILE and tokenizer is not None):
                if (source_dir / name).resolve() != (path / name).resolve():
                    shutil.copyfile(source_dir / name, path / name)
    if tokenizer is not None:
        tokenizer.save(str(path / TOKENIZER_FILE))
    if note:
        (path / "README.md").write_text(note)
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


def _source_config(
    source: str | pathlib.Path | Mapping[str, Any] | None,
) -> tuple[dict[str, Any] | None, pathlib.Path | None]:
    """(the source's config.json dict, its folder) for `save_hf_checkpoint(source=...)`."""
    if source is None:
        return None, None
    if isinstance(source, Mapping):
        return dict(source), None
    folder = pathlib.Path(source)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"save_hf_checkpoint source={str(source)!r} holds no config.json")
    return json.loads((folder / "config.json").read_text()), folder


def _float_params(params: Params) -> tuple[Params, str]:
    """Params with LoRA adapters merged and quantised weights dequantised, and the note saying what was done."""
    from framework.peft import lora
    from framework.quant import qtensor

    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, (lora.LoraWeight, qtensor.QuantizedWeight)))
    merged = any(isinstance(x, lora.LoraWeight) for x in leaves)
    quantised = [x for x in leaves if isinstance(x, qtensor.QuantizedWeight)]
    quantised += [
        x.base for x in leaves if isinstance(x, lora.LoraWeight) and isinstance(x.base, qtensor.QuantizedWeight)
    ]
    if not merged and not quantised:
        return params, ""
    if merged:
        params = lora.merge(params)
    if quantised:
        from framework.quant import methods

        params = methods.dequantize(params)
    lines = ["# Exported by Lumen (`framework.models.hf.save_hf_checkpoint`)", ""]
    if merged:
        lines.append("- LoRA adapters are merged into the base weights (`framework.peft.merge`).")
    if quantised:
        formats = sorted(
            {f"{q.fmt} ({q.bits}-bit" + (f", group {q.group_size})" if q.group_size else ")") for q in quantised}
        )
        lines.append(
            f"- The {', '.join(formats)} quantised weights are stored DEQUANTISED as float32 (`framework.quant."
            "dequantize`): this is a float checkpoint whose weights equal the quantised model's, not a quantised "
            "checkpoint, and it is as large as the float model."
        )
    note = "\n".join(lines) + "\n"
    log.warning("save_hf_checkpoint: %s", " ".join(lines[2:]))
    return params, note


# ----------------------------------------------------------------------------------------------- tokenizer
def load_hf_tokenizer(path: str | pathlib.Path, *, vocab_size: int | None = None):
    """The folder's `tokenizer.json` as a `tokenizers.Tokenizer` (the fast-tokenizer format; no transformers).

    `vocab_size` (e.g. `cfg.vocab_size`): raise if the tokenizer can emit ids the model has no embedding for.
    Raises FileNotFoundError when the folder has no tokenizer.json (a sentencepiece `tokenizer.model` must be
    converted first, e.g. with transformers' `AutoTokenizer(...).save_pretrained`).
    """
    from framework.tasks.hf_tokenizer import read_tokenizer_file

    tokenizer, file = read_tokenizer_file(path)
    if vocab_size is not None and tokenizer.get_vocab_size() > vocab_size:
        raise ValueError(
            f"{file} has {tokenizer.get_vocab_size()} tokens, more than the model's vocab_size={vocab_size}"
        )
    return tokenizer


# ----------------------------------------------------------------------------------------------- experiments
# LMConfig fields an experiment's `model` section may still set for an imported checkpoint (how Lumen runs it);
# every other field comes from the checkpoint's config.json.
RUNTIME_OVERRIDES = ("attention_impl", "scan_layers", "remat", "dtype", "param_dtype")


def model_from_config(model_section: Mapping[str, Any]) -> tuple[LMConfig, Params, Any]:
    """(LMConfig, params, tokenizer or None) of an experiment config's `model` section whose `hf_path` is set.

    The checkpoint folder decides the architecture and special ids; the section's runtime fields
    (`RUNTIME_OVERRIDES`) choose how Lumen runs it. The tokenizer is the folder's tokenizer.json (checked against
    the model's vocabulary and special ids), or None when the folder has none (inputs are then token ids).
    """
    from framework.tasks import tokenizer as tokenizer_lib

    section = dict(model_section.items())
    folder = section.get("hf_path")
    if not folder:
        raise ValueError(f"model.hf_path = {folder!r}; expected a local HF checkpoint folder")
    folder = pathlib.Path(folder)
    if not (folder / "config.json").exists():
        found = sorted(p.name for p in folder.iterdir())[:20] if folder.is_dir() else "no such folder"
        raise ValueError(f"model.hf_path = {str(folder)!r} holds no config.json ({found}); expected an HF folder")
    overrides = {k: section[k] for k in RUNTIME_OVERRIDES if section.get(k) is not None}
    param_dtype = overrides.pop("param_dtype", "float32")
    cfg, params = load_hf_checkpoint(folder, param_dtype=param_dtype, **overrides)
    tok = tokenizer_lib.tokenizer_for(cfg, folder=folder) if (folder / TOKENIZER_FILE).exists() else None
    return cfg, params, tok


def hf_model_config(model_section: Mapping[str, Any]) -> LMConfig:
    """The LMConfig `model_from_config` would return, read from config.json alone (no weights: for validation)."""
    section = dict(model_section.items())
    folder = pathlib.Path(section["hf_path"])
    if not (folder / "config.json").exists():
        raise ValueError(f"model.hf_path = {str(folder)!r} holds no config.json; expected an HF checkpoint folder")
    overrides = {k: section[k] for k in RUNTIME_OVERRIDES if section.get(k) is not None}
    return hf_config_to_lm_config(json.loads((folder / "config.json").read_text()), **overrides)


# ----------------------------------------------------------------------------------------------- text files
EVAL_EVERY = 10  # rows i with i % EVAL_EVERY == EVAL_EVERY - 1 of a text file are its held-out ("eval") split


def text_file_ids(text_file: str | pathlib.Path, folder: str | pathlib.Path, cfg: LMConfig, *, key: str) -> np.ndarray:
    """int32 token ids of a local plain-text file for the imported model in `folder`: the text tokenized by the
    folder's tokenizer.json, or (a folder without one) the file read as whitespace-separated integer token ids.

    `key` names the config field that gave the file (e.g. "harvest.text_file") in every error; ids outside the
    model's vocabulary raise ValueError before they reach a gather.
    """
    from framework.tasks import tokenizer as tokenizer_lib

    text = pathlib.Path(text_file).read_text(encoding="utf-8")
    if (pathlib.Path(folder) / TOKENIZER_FILE).exists():
        ids = tokenizer_lib.tokenizer_for(cfg, folder=folder).encode(text)
    else:
        try:
            ids = np.asarray([int(t) for t in text.split()], np.int64)
        except ValueError as e:
            raise ValueError(
                f"{key} {str(text_file)!r}: the checkpoint {str(folder)!r} has no {TOKENIZER_FILE}, so the file must "
                f"hold whitespace-separated token ids ({e})"
            ) from None
    where = f"{key} {str(text_file)!r}"
    return tokenizer_lib.check_token_ids(ids, cfg.vocab_size, where=where).astype(np.int32)


def text_rows(ids: np.ndarray, seq_len: int, bos_id: int | None, split: str, *, key: str) -> np.ndarray:
    """int32 [R, seq_len] rows of a token stream: the ids in order, cut into rows of `[BOS] + seq_len - 1` ids (just
    `seq_len` ids for a model without BOS); `split` "eval" keeps every EVAL_EVERY-th row, "train" the others.

    Raises ValueError (naming `key`) when the stream has fewer than EVAL_EVERY rows (no held-out row).
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split = {split!r}; expected 'train' or 'eval'")
    bos = [] if bos_id is None else [bos_id]
    body = seq_len - len(bos)
    if body < 1:
        raise ValueError(f"seq_len = {seq_len}: expected at least {len(bos) + 1} (BOS + one token)")
    n_rows = len(ids) // body
    if n_rows < EVAL_EVERY:
        raise ValueError(
            f"{key}: {len(ids)} tokens make {n_rows} rows of {seq_len} tokens, fewer than {EVAL_EVERY} (one held-out "
            "row in ten); give more text or a shorter seq_len"
        )
    rows = np.asarray(ids[: n_rows * body], np.int32).reshape(n_rows, body)
    if bos:
        rows = np.concatenate([np.full((n_rows, 1), bos_id, np.int32), rows], axis=1)
    held_out = np.arange(n_rows) % EVAL_EVERY == EVAL_EVERY - 1
    return rows[held_out if split == "eval" else ~held_out]
