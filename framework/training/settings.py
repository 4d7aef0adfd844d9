"""Typed training settings: an experiment's `train`, `mesh` and `seed` parsed once into frozen objects.

An experiment parses its ConfigDict at its boundary (`RunSettings.from_config(config)`) and hands the result down to
`loop.train`; nothing below reads the ConfigDict. `TrainSettings` and `MeshSettings` are read-only mappings too, so
code that takes "a mapping of train settings" (the optimiser, a per-label override merge) works on them unchanged.

A key the config does not set is absent from the mapping (`"lr" in settings` is False, `settings.get("lr")` is None),
as it was in the ConfigDict: the optimiser still names a missing key when it needs one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator, Mapping
from typing import Any

import ml_collections

from framework import config as config_lib

_UNSET = None  # a field left at None was not in the config


class _FieldMapping(Mapping[str, Any]):
    """Read-only mapping over a frozen dataclass's set fields, plus `extra` (keys the loop does not read)."""

    def _set_items(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("extra", "_present")}
        out = {k: v for k, v in out.items() if v is not _UNSET or k in self._present}
        return out | dict(self.extra)

    def __getitem__(self, key: str) -> Any:
        items = self._set_items()
        if key not in items:
            raise KeyError(key)
        return items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._set_items())

    def __len__(self) -> int:
        return len(self._set_items())


def _split(cls, section: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[tuple[str, Any], ...], frozenset[str]]:
    """(fields of `cls` present in `section`, the other keys as pairs, the names present)."""
    d = dict(section.items())
    names = {f.name for f in dataclasses.fields(cls)} - {"extra", "_present"}
    known = {k: v for k, v in d.items() if k in names}
    extra = tuple(sorted((k, _freeze(v)) for k, v in d.items() if k not in names))
    return known, extra, frozenset(known)


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, (Mapping, ml_collections.ConfigDict)):
        return tuple(sorted((k, _freeze(v)) for k, v in dict(value).items()))
    return value


@dataclasses.dataclass(frozen=True)
class TrainSettings(_FieldMapping):
    """The generic loop's `train` section: steps, batch, optimiser and schedule, logging, checkpoints, NaN policy.

    `steps` and `batch_size` are required; every other field is None when the config leaves it out (the optimiser
    needs lr, warmup_steps, min_lr_ratio, weight_decay, b1, b2, grad_clip unless the task brings its own). Keys the
    loop does not read (an experiment's `seq_len`, say) are kept in `extra` and readable like the fields.
    """

    steps: int
    batch_size: int
    lr: float | None = None
    warmup_steps: int | None = None
    min_lr_ratio: float | None = None
    weight_decay: float | None = None
    b1: float | None = None
    b2: float | None = None
    grad_clip: float | None = None
    log_every: int | None = None
    eval_every: int = 0
    stop_when: str = ""
    frozen: tuple[str, ...] = ()
    checkpoint_every: int | None = None
    keep_checkpoints: int | None = None
    keep_checkpoint_every: int = 0
    async_checkpoint: bool = True
    nonfinite: str = "stop"
    peak_flops: float | None = None
    progress: bool = True
    extra: tuple[tuple[str, Any], ...] = ()
    _present: frozenset[str] = dataclasses.field(default=frozenset(), repr=False, compare=False)

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | TrainSettings) -> TrainSettings:
        """Parses a `train` section; missing `steps`/`batch_size` or a wrong-typed field is a ConfigError."""
        if isinstance(section, TrainSettings):
            return section
        known, extra, present = _split(cls, section)
        for key in ("steps", "batch_size"):
            config_lib.require(key in known and known[key] is not None, f"train.{key}", "is required")
        for key in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints", "warmup_steps"):
            value = known.get(key)
            if value is not None and (isinstance(value, bool) or int(value) != value):
                raise config_lib.ConfigError(f"config key 'train.{key}': expected an integer, got {value!r}")
        if "frozen" in known:
            known["frozen"] = tuple(known["frozen"] or ())
        for key in ("eval_every", "keep_checkpoint_every"):
            if known.get(key) is None:
                known.pop(key, None)
        if known.get("stop_when") is None:
            known.pop("stop_when", None)
        return cls(**known, extra=extra, _present=present)

    def replace(self, **changes) -> TrainSettings:
        """A copy with some fields (or extra keys) changed."""
        extra = dict(self.extra)
        fields = {f.name for f in dataclasses.fields(self)}
        for k in [k for k in changes if k not in fields]:
            extra[k] = _freeze(changes.pop(k))
        return dataclasses.replace(
            self, **changes, extra=tuple(sorted(extra.items())), _present=self._present | frozenset(changes)
        )


@dataclasses.dataclass(frozen=True)
class MeshSettings(_FieldMapping):
    """Device mesh axis sizes (one may be -1: fill the remaining devices) and the logical-axis rules table."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: tuple[tuple[str, str], ...] | None = None
    extra: tuple[tuple[str, Any], ...] = ()
    _present: frozenset[str] = dataclasses.field(default=frozenset(), repr=False, compare=False)

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | MeshSettings | None) -> MeshSettings:
        """Parses a `mesh` section (None: data parallel over every device, the default rules)."""
        if isinstance(section, MeshSettings):
            return section
        known, extra, present = _split(cls, section or {})
        if extra:
            raise config_lib.ConfigError(
                f"unknown config key(s) {['mesh.' + k for k, _ in extra]}; known keys here: "
                "['mesh.data', 'mesh.fsdp', 'mesh.tensor', 'mesh.rules']"
            )
        if known.get("rules") is not None:
            known["rules"] = tuple(dict(known["rules"]).items())
        return cls(**known, _present=present | {"data", "fsdp", "tensor"})

    def _set_items(self) -> dict[str, Any]:
        out = super()._set_items()
        if self.rules is not None:
            out["rules"] = dict(self.rules)
        return out


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What `loop.train` reads of an experiment's config: seed, `train`, `mesh`, and the record of the whole config.

    `config_json` is written to the workdir as config.json and `digest` tells a resumed run whether its checkpoints
    were trained under the same config (`train.steps` left out: extending a run is not a different run).
    """

    seed: int
    train: TrainSettings
    mesh: MeshSettings
    config_json: str
    digest: str

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict | RunSettings) -> RunSettings:
        """Parses an experiment config once: its `seed`, `train` and `mesh` sections (others stay with the experiment)."""
        if isinstance(config, RunSettings):
            return config
        config_lib.require("train" in config, "train", "the config has no train section")
        return cls(
            seed=int(config.get("seed", 0) or 0),
            train=TrainSettings.from_config(config["train"]),
            mesh=MeshSettings.from_config(config.get("mesh")),
            config_json=config_lib.to_json(config),
            digest=config_digest(config),
        )

    def replace_train(self, **changes) -> RunSettings:
        """A copy whose train settings have `changes` (the digest and the recorded config follow them)."""
        train = self.train.replace(**changes)
        record = json.loads(self.config_json)
        record.setdefault("train", {}).update({k: list(v) if isinstance(v, tuple) else v for k, v in changes.items()})
        return dataclasses.replace(
            self, train=train, config_json=json.dumps(record, indent=2, sort_keys=True), digest=_digest(record)
        )


def config_digest(config: ml_collections.ConfigDict) -> str:
    """A short hash of the config, excluding `train.steps` (extending a run is not a different run).

    An empty `train.frozen` is left out too, so configs from before that key existed keep their digest.
    """
    return _digest(config.to_dict())


def _digest(d: dict) -> str:
    d = json.loads(json.dumps(d, default=str))
    d.get("train", {}).pop("steps", None)
    if not d.get("train", {}).get("frozen", True):
        d["train"].pop("frozen")
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]
