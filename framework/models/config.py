"""The decoder LM's hyper-parameters (`LMConfig`) and their validation; re-exported by `framework.models.lm`.

Kept apart from the modules so that configs, loaders and tools can build and check a model config without Flax.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from framework import config as config_lib
from framework.models import attention as attn_lib
from framework.tasks import tokenizer as tokenizer_lib

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
MLP_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
}


# The experiment-config key (beside LMConfig's fields in `config.model`) naming a local HF checkpoint folder.
HF_PATH_KEY = "hf_path"


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Hyper-parameters of the decoder LM (hashable: usable as a static jit argument)."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    final_logit_softcap: float | None = None
    # Model-family features (HF import: Qwen2, Mistral, Gemma, Gemma-2); the defaults are plain Llama.
    qkv_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    sliding_window: int | None = None  # query sees its `sliding_window` most recent keys, itself included (Mistral)
    sliding_window_layers: tuple[int, ...] | None = None  # layers that use the window; None = all (Gemma-2: even)
    attn_logit_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma-2)
    query_pre_attn_scalar: float | None = None  # scores scaled by this**-0.5 instead of head_dim**-0.5 (Gemma-2)
    mlp_activation: str = "silu"  # gated MLP activation: "silu" (SwiGLU), "gelu_tanh" (GeGLU, Gemma) or "gelu"
    norm_plus_one: bool = False  # RMSNorm multiplies by (1 + scale), scale initialised at 0 (Gemma)
    scale_embeddings: bool = False  # embeddings times sqrt(d_model), rounded to the compute dtype (Gemma)
    post_norms: bool = False  # RMSNorm on the attention and MLP outputs before the residual add (Gemma-2)
    # A depthwise causal convolution of this many taps (the token and the taps - 1 before it, within its sequence)
    # added to each block's normalised input before attention: a key or query then carries the last few tokens, so a
    # multi-token name is matched in one head (H3/Based short convs, Canon layers). 0 = none (every HF family).
    short_conv: int = 0
    attention_impl: str = "xla"
    scan_layers: bool = True
    remat: str = "none"
    dtype: str = "float32"
    param_dtype: str = "float32"
    # Special ids exactly as the checkpoint has them: None / () where it has no such token (Llama has no pad, Qwen2
    # no BOS). Padding is carried by masks and lengths; `pad_id` is never invented.
    bos_id: int | None = 1
    eos_ids: tuple[int, ...] = (2,)
    pad_id: int | None = 0
    init_std: float = 0.02
    # The tokenizer the model reads: "arith" (the arithmetic characters), "text" (printable text), "hf" (the
    # tokenizer.json of the imported checkpoint's folder) or a path to one; built by `tasks.tokenizer.tokenizer_for`.
    tokenizer: str = "arith"

    def __post_init__(self):
        object.__setattr__(self, "eos_ids", tuple(int(e) for e in self.eos_ids))
        if self.sliding_window_layers is not None:
            object.__setattr__(self, "sliding_window_layers", tuple(int(l) for l in self.sliding_window_layers))
        self.validate()

    def validate(self) -> None:
        """Raises ValueError naming the field for any inconsistent setting."""
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "max_seq_len"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"model.head_dim must be even for RoPE, got {self.head_dim}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"model.{name} must be one of {sorted(_DTYPES)}, got {getattr(self, name)!r}")
        if self.attention_impl not in attn_lib.available_impls():
            raise ValueError(f"model.attention_impl {self.attention_impl!r} is not one of {attn_lib.available_impls()}")
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(
                f"model.mlp_activation must be one of {sorted(MLP_ACTIVATIONS)}, got {self.mlp_activation!r}"
            )
        for name in ("final_logit_softcap", "attn_logit_softcap", "query_pre_attn_scalar"):
            value = getattr(self, name)
            if value is not None and not float(value) > 0:
                raise ValueError(f"model.{name} must be None or > 0, got {value!r}")
        if self.sliding_window is not None and (
            isinstance(self.sliding_window, bool)
            or int(self.sliding_window) != self.sliding_window
            or self.sliding_window < 1
        ):
            raise ValueError(f"model.sliding_window must be None or an int >= 1, got {self.sliding_window!r}")
        if self.sliding_window_layers is not None:
            if self.sliding_window is None:
                raise ValueError(
                    f"model.sliding_window_layers={self.sliding_window_layers} needs model.sliding_window to be set"
                )
            bad = [l for l in self.sliding_window_layers if not 0 <= l < self.n_layers]
            if bad or len(set(self.sliding_window_layers)) != len(self.sliding_window_layers):
                raise ValueError(
                    f"model.sliding_window_layers={self.sliding_window_layers} must be distinct layer indices in "
                    f"[0, model.n_layers={self.n_layers})"
                )
        taps = self.short_conv
        if isinstance(taps, bool) or not isinstance(taps, (int, np.integer)) or taps < 0 or taps == 1:
            raise ValueError(f"model.short_conv must be 0 (none) or an int >= 2 (taps), got {self.short_conv!r}")
        if self.attention_impl == "cudnn" and self.attn_logit_softcap is not None:
            raise ValueError(
                f"model.attention_impl='cudnn' has no attention-logit softcap (model.attn_logit_softcap="
                f"{self.attn_logit_softcap}); use 'pallas' or 'xla'"
            )
        for name in ("bos_id", "pad_id"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
                raise ValueError(f"model.{name} must be None or an int token id, got {value!r}")
        ids = [i for i in (self.bos_id, self.pad_id, *self.eos_ids) if i is not None]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"special token ids {bad} are outside [0, model.vocab_size={self.vocab_size})")
        self._validate_tokenizer()

    def _validate_tokenizer(self) -> None:
        """A known tokenizer name (or a path, not opened here); a character tokenizer's special ids are the model's."""
        try:
            tokenizer_lib.check_tokenizer_name(self.tokenizer)
        except ValueError as e:
            raise ValueError(f"model.{e}") from None
        tok = tokenizer_lib.BUILTIN.get(self.tokenizer)
        if tok is None:
            return
        specials = [tok.pad_id, tok.bos_id, tok.eos_id]
        if max(specials) >= self.vocab_size:
            raise ValueError(
                f"model.tokenizer={self.tokenizer!r} has special ids {specials}, outside [0, model.vocab_size="
                f"{self.vocab_size})"
            )
        tokenizer_lib.check_special_ids(self, tok)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | LMConfig) -> LMConfig:
        """Builds an LMConfig from a ConfigDict/dict (e.g. `config.model`), ignoring no key silently.

        A `hf_path` key (an experiment config's imported checkpoint) must be None here: an experiment that takes an
        imported model reads it with `framework.models.hf.model_from_config` instead.
        """
        if isinstance(config, LMConfig):
            return config
        d = dict(config.items()) if hasattr(config, "items") else dict(config)
        hf_path = d.pop(HF_PATH_KEY, None)
        if hf_path is not None:
            raise ValueError(
                f"model.{HF_PATH_KEY}={hf_path!r} names an imported checkpoint, but this code path builds the model from "
                "the config's fields: load it with framework.models.hf.model_from_config (or unset model.hf_path)"
            )
        d = config_lib.known_fields(cls, d, "model")
        for key in ("eos_ids", "sliding_window_layers"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def params_dtype(self):
        return _DTYPES[self.param_dtype]

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """Each layer's sliding window (None = full causal attention)."""
        if self.sliding_window is None:
            return (None,) * self.n_layers
        local = set(range(self.n_layers) if self.sliding_window_layers is None else self.sliding_window_layers)
        return tuple(self.sliding_window if l in local else None for l in range(self.n_layers))

    @property
    def sm_scale(self) -> float:
        """Attention score scale: query_pre_attn_scalar**-0.5 when set, else head_dim**-0.5."""
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5
