"""Config validation: unknown keys, wrong types and bad combinations fail before anything is compiled.

Every error names the dotted key (`train.steps`), the value found, and what was expected.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import ml_collections


class ConfigError(ValueError):
    """A config is invalid; the message names the key."""


def check_against(config: Mapping[str, Any], reference: Mapping[str, Any], prefix: str = "") -> None:
    """Raises ConfigError if `config` has a key `reference` lacks, lacks one it has, or a value of another type.

    `reference` is the experiment's default config: it defines the schema. None values in the reference (optional
    fields) accept None or any value; ints are accepted where floats are expected.
    """
    extra = sorted(set(config) - set(reference))
    if extra:
        raise ConfigError(
            f"unknown config key(s) {[prefix + k for k in extra]}; "
            f"known keys here: {sorted(prefix + k for k in reference)}"
        )
    missing = sorted(set(reference) - set(config))
    if missing:
        raise ConfigError(f"missing config key(s) {[prefix + k for k in missing]}")
    for key, ref in reference.items():
        value, name = config[key], prefix + key
        if isinstance(ref, Mapping) or isinstance(ref, ml_collections.ConfigDict):
            if not (isinstance(value, Mapping) or isinstance(value, ml_collections.ConfigDict)):
                raise ConfigError(f"config key {name!r} must be a section (ConfigDict), got {value!r}")
            check_against(value, ref, name + ".")
        elif ref is None or value is None:
            continue
        elif isinstance(ref, bool) or isinstance(value, bool):
            if not (isinstance(ref, bool) and isinstance(value, bool)):
                raise ConfigError(f"config key {name!r} must be of type {type(ref).__name__}, got {value!r}")
        elif isinstance(ref, float) and isinstance(value, int):
            continue
        elif isinstance(ref, (tuple, list)) and isinstance(value, (tuple, list)):
            continue
        elif not isinstance(value, type(ref)):
            raise ConfigError(
                f"config key {name!r} must be of type {type(ref).__name__}, got {type(value).__name__} {value!r}"
            )


def known_fields(cls: type, config: Mapping[str, Any], what: str) -> dict[str, Any]:
    """`config` (a ConfigDict or mapping) as a dict of dataclass `cls`'s fields; a key `cls` lacks is a ValueError
    naming it, `what` ("model", "vision") saying which config it is."""
    d = dict(config.items()) if hasattr(config, "items") else dict(config)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {what} config keys {unknown}; known keys: {sorted(known)}")
    return d


def require(cond: bool, key: str, message: str) -> None:
    """Raises ConfigError `config key <key>: <message>` unless `cond`."""
    if not cond:
        raise ConfigError(f"config key {key!r}: {message}")


def to_json(config: ml_collections.ConfigDict) -> str:
    """The config as indented JSON (placeholders written as null)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)
