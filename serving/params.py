"""Parameter validation and normalisation. Values are bound, never pasted into SQL."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from serving.endpoints import ParamSpec

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
Scalar = int | float | str | bool


class ParamError(ValueError):
    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name
        self.message = message


def _scalar(spec: ParamSpec, text: str) -> Scalar:
    name, t = spec.name, spec.type
    if t == "int":
        try:
            value: int | float = int(text.strip())
        except ValueError:
            raise ParamError(name, f"expected an integer, got {text!r}") from None
    elif t == "float":
        try:
            value = float(text.strip())
        except ValueError:
            raise ParamError(name, f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise ParamError(name, f"expected a finite number, got {text!r}")
    elif t == "bool":
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ParamError(name, f"expected true or false, got {text!r}")
    elif t == "enum":
        if spec.ignore_case:
            for v in spec.values:
                if v.lower() == text.lower():
                    return v
        if text not in spec.values:
            raise ParamError(name, f"expected one of {', '.join(spec.values)}, got {text!r}")
        return text
    else:
        if spec.ignore_case:
            text = text.lower()
        if len(text) > spec.max_length:
            raise ParamError(name, f"expected at most {spec.max_length} characters")
        if spec.pattern is not None and not re.fullmatch(spec.pattern, text):
            raise ParamError(name, f"expected a string matching {spec.pattern!r}, got {text!r}")
        return text
    if spec.min is not None and value < spec.min:
        raise ParamError(name, f"expected a value >= {spec.min}, got {value}")
    if spec.max is not None and value > spec.max:
        raise ParamError(name, f"expected a value <= {spec.max}, got {value}")
    return value


def parse_value(spec: ParamSpec, raw: Sequence[str]) -> Scalar | list[Scalar]:
    """Parse the raw strings given for one parameter (repeated keys, or one comma list)."""
    if not spec.is_list:
        if len(raw) != 1:
            raise ParamError(spec.name, "expected a single value, got several")
        return _scalar(spec, raw[0])
    items = [part for text in raw for part in text.split(",") if part != ""]
    if len(items) > spec.max_items:
        raise ParamError(spec.name, f"expected at most {spec.max_items} items")
    values = [_scalar(spec, item) for item in items]
    if spec.unordered:
        values = sorted(set(values))
    return values


def default_value(spec: ParamSpec) -> Any:
    """What an absent optional parameter binds."""
    d = spec.default
    if d is None:
        return [] if spec.is_list else None
    if isinstance(d, list):
        return sorted(set(d)) if spec.unordered else list(d)
    return d


def bind_params(
    specs: Mapping[str, ParamSpec],
    path_values: Mapping[str, str],
    query: Mapping[str, Sequence[str]],
) -> dict[str, Any]:
    """Validate everything a request gave against the specs; return the values to bind."""
    for name in query:
        if name not in specs or name in path_values:
            raise ParamError(name, "unknown parameter")
    bound: dict[str, Any] = {}
    for name, spec in specs.items():
        raw: Sequence[str] | None
        raw = [path_values[name]] if name in path_values else query.get(name)
        if not raw:
            if spec.required:
                raise ParamError(name, f"required parameter ({spec.type}) is missing")
            bound[name] = default_value(spec)
            continue
        bound[name] = parse_value(spec, raw)
    return bound


def cache_key(bound: Mapping[str, Any]) -> tuple[Any, ...]:
    """Hashable normalised form of bound values (spec order, so spelling does not matter)."""
    return tuple(tuple(v) if isinstance(v, list) else v for v in bound.values())
