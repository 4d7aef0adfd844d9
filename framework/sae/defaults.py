"""SAE configs: the defaults of every architecture, their validation, and the typed `SAEConfig` (imports only
ml_collections).

An experiment's `sae` section is a `ConfigDict` (`default_config(arch)` gives every key with the architecture's
defaults); `parse(section)` validates it once and returns the frozen `SAEConfig` that training, metrics and reports
read. Keys:

  arch                 relu | topk | batchtopk | jumprelu | gated
  d_in, n_latents      input width and dictionary size
  d_out                output width of a transcoder (None: an SAE, d_out = d_in)
  hookpoint            LM hookpoint read (None: whatever the activations are); out_hookpoint: what a transcoder
                       reconstructs (None: an SAE reconstructs its input)
  k                    active latents per token (topk, batchtopk; per token on average for batchtopk)
  l1_coeff             ReLU/Gated: weight of sum_i f_i * ||d_i|| (decoder-norm-weighted L1)
  l0_coeff             JumpReLU: weight of the (straight-through) L0 penalty
  jumprelu_bandwidth   JumpReLU: width of the rectangle kernel of the threshold's pseudo-gradient
  jumprelu_init_threshold  JumpReLU: initial threshold (stored as fp32 log_threshold)
  threshold_momentum   BatchTopK: EMA momentum of the inference threshold
  b_dec_init           zeros | mean | geometric_median (of a sample of the inputs)
  tied_init            encoder initialised as the decoder's transpose
  decoder_init_norm    norm of the initial decoder rows
  normalize_decoder    renormalise decoder rows to unit norm after every step
  rank_by_decoder_norm TopK/BatchTopK/AuxK rank latents by pre-activation x decoder-row norm (the norm of their
                       contribution; SAELens' rescale_acts_by_decoder_norm); no effect with normalize_decoder
  aux_k, aux_k_coeff   AuxK: reconstruct the residual from the top aux_k dead latents (0: off; capped at L)
  aux_k_dead_scale     AuxK loss weighted by min(n_dead / aux_k, 1) (EleutherAI sae, SAELens); off: full weight
                       whenever any latent is dead (OpenAI's paper)
  dead_window          a latent is dead after this many training tokens without firing (AuxK trains those; a short
                       window flags merely rare latents, and AuxK then pushes them to death: keep it >> 1/density)
  normalize_inputs     scale inputs to mean squared norm d_in while training (folded back into the weights)
  lr, b1, b2, grad_clip, lr_warmup_steps, lr_decay (none|linear|cosine), lr_decay_frac (last fraction of steps)
  sparsity_warmup_steps   sparsity coefficient ramps linearly from 0 over these steps
  steps_per_call       training steps fused into one compiled call (lax.scan)
  log_every            steps between history records
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
from ml_collections import config_dict

ARCHS = ("relu", "topk", "batchtopk", "jumprelu", "gated")
B_DEC_INITS = ("zeros", "mean", "geometric_median")
LR_DECAYS = ("none", "linear", "cosine")

_COMMON = dict(
    arch="topk",
    d_in=64,
    n_latents=512,
    d_out=None,
    hookpoint=None,
    out_hookpoint=None,
    k=None,
    l1_coeff=None,
    l0_coeff=None,
    jumprelu_bandwidth=None,
    jumprelu_init_threshold=None,
    threshold_momentum=None,
    b_dec_init="geometric_median",
    tied_init=True,
    decoder_init_norm=1.0,
    normalize_decoder=True,
    rank_by_decoder_norm=False,
    aux_k=0,
    aux_k_coeff=1.0 / 32,
    aux_k_dead_scale=False,
    dead_window=100_000,
    normalize_inputs=True,
    lr=3e-4,
    b1=0.9,
    b2=0.999,
    grad_clip=1.0,
    lr_warmup_steps=0,
    lr_decay="linear",
    lr_decay_frac=0.2,
    sparsity_warmup_steps=0,
    steps_per_call=50,
    log_every=100,
)

# Types of the keys that may be None (unset).
_TYPES = dict(
    d_out=int,
    hookpoint=str,
    out_hookpoint=str,
    k=int,
    l1_coeff=float,
    l0_coeff=float,
    jumprelu_bandwidth=float,
    jumprelu_init_threshold=float,
    threshold_momentum=float,
)

_ARCH_DEFAULTS = {
    # Anthropic (April 2024 update): unconstrained decoder, L1 weighted by decoder row norms, small initial decoder.
    "relu": dict(
        l1_coeff=3.0,
        normalize_decoder=False,
        decoder_init_norm=0.1,
        lr=1e-3,
        sparsity_warmup_steps=200,
    ),
    "topk": dict(k=16, aux_k=64, lr=1e-3),
    "batchtopk": dict(k=16, aux_k=64, lr=1e-3, threshold_momentum=0.99),
    # Gemma Scope style: thresholds exp(log_threshold), L0 penalty through a rectangle-kernel pseudo-gradient.
    "jumprelu": dict(
        l0_coeff=1.0,
        jumprelu_bandwidth=0.05,
        jumprelu_init_threshold=0.5,
        lr=1e-3,
        sparsity_warmup_steps=200,
    ),
    "gated": dict(l1_coeff=4.0, lr=1e-3, sparsity_warmup_steps=200, normalize_decoder=True),
}


def default_config(arch: str = "topk", **overrides) -> ml_collections.ConfigDict:
    """Every SAE config key with the defaults of `arch`; `overrides` replace keys (unknown keys are an error)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown SAE architecture {arch!r}; expected one of {ARCHS}")
    cfg = dict(_COMMON, arch=arch)
    cfg.update(_ARCH_DEFAULTS[arch])
    unknown = sorted(set(overrides) - set(cfg))
    if unknown:
        raise ValueError(f"unknown SAE config key(s) {unknown}; known keys: {sorted(cfg)}")
    cfg.update(overrides)
    # An unset key is a typed placeholder, so `--config.sae.d_out=64` can set it from the command line (a plain None
    # field has no type and ml_collections refuses to override it).
    cfg = {k: config_dict.placeholder(_TYPES[k]) if v is None and k in _TYPES else v for k, v in cfg.items()}
    return ml_collections.ConfigDict(cfg)


def validate(cfg) -> None:
    """Raises ValueError naming the key, the value and what was expected, for any bad SAE config. Compiles nothing."""
    known = set(_COMMON)
    missing = sorted(known - set(cfg.keys()))
    unknown = sorted(set(cfg.keys()) - known)
    if unknown:
        raise ValueError(f"unknown SAE config key(s) {unknown}; known keys: {sorted(known)}")
    if missing:
        raise ValueError(f"SAE config lacks key(s) {missing}; start from framework.sae.default_config(arch)")
    if cfg.arch not in ARCHS:
        raise ValueError(f"unknown SAE architecture sae.arch={cfg.arch!r}; expected one of {ARCHS}")

    def positive_int(key, allow_none=False):
        v = cfg[key]
        if v is None and allow_none:
            return
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"sae.{key} = {v!r}; expected a positive int")

    for key in ("d_in", "n_latents", "dead_window", "steps_per_call", "log_every"):
        positive_int(key)
    positive_int("d_out", allow_none=True)
    if cfg.arch in ("topk", "batchtopk"):
        positive_int("k")
        if cfg.k > cfg.n_latents:
            raise ValueError(f"sae.k = {cfg.k} exceeds sae.n_latents = {cfg.n_latents}")
    if cfg.arch in ("relu", "gated") and not (cfg.l1_coeff is not None and cfg.l1_coeff >= 0):
        raise ValueError(f"sae.l1_coeff = {cfg.l1_coeff!r}; expected a float >= 0 for arch {cfg.arch!r}")
    if cfg.arch == "jumprelu":
        for key in ("l0_coeff", "jumprelu_bandwidth", "jumprelu_init_threshold"):
            if cfg[key] is None or cfg[key] < 0 or (key != "l0_coeff" and cfg[key] == 0):
                raise ValueError(f"sae.{key} = {cfg[key]!r}; expected a positive float for arch 'jumprelu'")
    if cfg.arch == "batchtopk" and not (cfg.threshold_momentum is not None and 0 <= cfg.threshold_momentum < 1):
        raise ValueError(f"sae.threshold_momentum = {cfg.threshold_momentum!r}; expected a float in [0, 1)")
    if cfg.b_dec_init not in B_DEC_INITS:
        raise ValueError(f"sae.b_dec_init = {cfg.b_dec_init!r}; expected one of {B_DEC_INITS}")
    if cfg.lr_decay not in LR_DECAYS:
        raise ValueError(f"sae.lr_decay = {cfg.lr_decay!r}; expected one of {LR_DECAYS}")
    if isinstance(cfg.aux_k, bool) or not isinstance(cfg.aux_k, int) or cfg.aux_k < 0:
        raise ValueError(f"sae.aux_k = {cfg.aux_k!r}; expected an int >= 0 (0: off; capped at n_latents)")
    for key in ("lr", "decoder_init_norm"):
        if not cfg[key] > 0:
            raise ValueError(f"sae.{key} = {cfg[key]!r}; expected a positive float")
    for key in ("lr_warmup_steps", "sparsity_warmup_steps"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 0:
            raise ValueError(f"sae.{key} = {cfg[key]!r}; expected an int >= 0")
    if not 0 <= cfg.lr_decay_frac <= 1:
        raise ValueError(f"sae.lr_decay_frac = {cfg.lr_decay_frac!r}; expected a float in [0, 1]")
    if cfg.out_hookpoint is not None and cfg.d_out is None:
        raise ValueError(f"sae.out_hookpoint = {cfg.out_hookpoint!r} (a transcoder) needs sae.d_out")


@dataclasses.dataclass(frozen=True)
class SAEConfig:
    """A validated SAE config (the keys in this module's docstring), read by attribute or by key."""

    arch: str
    d_in: int
    n_latents: int
    d_out: int | None
    hookpoint: str | None
    out_hookpoint: str | None
    k: int | None
    l1_coeff: float | None
    l0_coeff: float | None
    jumprelu_bandwidth: float | None
    jumprelu_init_threshold: float | None
    threshold_momentum: float | None
    b_dec_init: str
    tied_init: bool
    decoder_init_norm: float
    normalize_decoder: bool
    rank_by_decoder_norm: bool
    aux_k: int
    aux_k_coeff: float
    aux_k_dead_scale: bool
    dead_window: int
    normalize_inputs: bool
    lr: float
    b1: float
    b2: float
    grad_clip: float
    lr_warmup_steps: int
    lr_decay: str
    lr_decay_frac: float
    sparsity_warmup_steps: int
    steps_per_call: int
    log_every: int

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def keys(self):
        return [f.name for f in dataclasses.fields(self)]

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> SAEConfig:
        """A copy with `changes`, validated again."""
        return parse(dataclasses.replace(self, **changes))


def parse(cfg) -> SAEConfig:
    """Validates an SAE config (ConfigDict, mapping or SAEConfig) and returns it as a frozen `SAEConfig`."""
    validate(cfg)
    if isinstance(cfg, SAEConfig):
        return cfg
    return SAEConfig(**{k: cfg[k] for k in _COMMON})


def is_transcoder(cfg) -> bool:
    """True when the SAE reconstructs something other than its input (d_out set or an out_hookpoint)."""
    return cfg.d_out is not None or cfg.out_hookpoint is not None


def d_out(cfg) -> int:
    """Width of the reconstruction."""
    return cfg.d_in if cfg.d_out is None else cfg.d_out
