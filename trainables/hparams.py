"""Typed, frozen hyperparameter groups with strict parsing, validation and a stable hash.

After open_lth's `Hparams`: a configuration is a few frozen dataclasses, addressed from the outside by flat
dotted keys (`optim.lr`, `model.depth`). Parsing is strict (unknown keys and wrong types raise with the valid
choices) and the identity of a configuration is a hash of the fields that differ from their defaults, so adding
a field with a default never changes the hash of an existing configuration.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from typing import Any, Mapping

import yaml


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message is one line naming the value and the choices."""


def hp(default: Any, help: str, *, low: float | None = None, high: float | None = None,
       choices: tuple | None = None) -> Any:
    """A hyperparameter field: a default, a help text and its allowed range or choices (checked on creation)."""
    return dataclasses.field(default=default, metadata={"help": help, "low": low, "high": high, "choices": choices})


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Bring a value parsed from YAML, JSON or the command line to the field's type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        elem = typing.get_args(tp)[0]
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} is not a list (expected a list of {_type_name(elem)})")
        return tuple(_coerce(f"{key}[{i}]", v, elem) for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} is not a boolean (expected true or false)")
    if tp is int:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} is not an integer")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}={value!r} is not a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} is not a number")
        return float(value)
    if tp is str:
        if value is None:  # YAML's empty value (`key:`, or an empty MLflow param read back as YAML)
            return ""
        if not isinstance(value, str):
            value = str(value)
        return value
    raise TypeError(f"unsupported hyperparameter type {tp!r} for {key}")


@dataclasses.dataclass(frozen=True)
class Hparams:
    """Base of every hyperparameter group. Subclasses are frozen dataclasses whose fields are made with `hp()`."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _coerce(f.name, getattr(self, f.name), hints[f.name])
            object.__setattr__(self, f.name, value)
            _check_range(f.name, value, f.metadata)
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; override where fields constrain each other."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def field_help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def non_default(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) != f.default}


def _check_range(key: str, value: Any, meta: Mapping[str, Any]) -> None:
    choices, low, high = meta.get("choices"), meta.get("low"), meta.get("high")
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if choices is not None and v not in choices:
            raise ConfigError(f"{key}={v!r} is not one of: {', '.join(map(str, choices))}")
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{key}={v!r} is not a finite number")
        if low is not None and v < low or high is not None and v > high:
            raise ConfigError(f"{key}={v!r} is outside the allowed range [{low}, {high}]")


def build_group(cls: type[Hparams], prefix: str, values: Mapping[str, Any]) -> Hparams:
    """Build `cls` from {field: value}, rejecting unknown fields with the list of valid ones."""
    valid = cls.field_names()
    for name in values:
        if name not in valid:
            raise ConfigError(f"unknown config key {prefix + name!r}; valid keys: "
                              + ", ".join(prefix + v for v in valid))
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(prefix + name, v, hints[name]) for name, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        msg = str(e)
        named = any(msg.startswith(n + "=") or msg.startswith(n + "[") for n in valid)
        raise ConfigError(prefix + msg if named else msg) from None


def fold_indexed(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Fold element-wise keys `a.b.<i>` into a list under `a.b` (how search spaces set one exit's weight)."""
    out: dict[str, Any] = {}
    indexed: dict[str, dict[int, Any]] = {}
    for key, value in flat.items():
        head, _, last = key.rpartition(".")
        if head and last.isdigit() and head.count(".") >= 1:
            indexed.setdefault(head, {})[int(last)] = value
        else:
            out[key] = value
    for key, items in indexed.items():
        if key in out:
            raise ConfigError(f"{key} is given both whole and element-wise")
        if sorted(items) != list(range(len(items))):
            raise ConfigError(f"{key} has element indices {sorted(items)}; expected 0..{len(items) - 1}")
        out[key] = [items[i] for i in range(len(items))]
    return out


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=list)


def stable_hash(obj: Any, length: int = 12) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]
