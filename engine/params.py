"""Parameters: their specs (parsed from `params.*` config tables), and the validation and
normalisation of request values. Values are bound, never pasted into SQL."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.config import Reader

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
Scalar = int | float | str | bool


PARAM_TYPES = ("int", "float", "string", "enum", "bool")
INT_MIN, INT_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class ParamSpec:
    name: str
    type: str
    is_list: bool = False
    max_items: int = 50
    required: bool = True
    default: Any = None
    min: float | None = None
    max: float | None = None
    max_length: int = 200
    pattern: str | None = None
    values: tuple[str, ...] = ()
    ignore_case: bool = False
    unordered: bool = False



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
        if not INT_MIN <= value <= INT_MAX:  # DuckDB binds 64 bits (found by the fuzzer)
            raise ParamError(name, f"expected a 64-bit integer, got {text!r}")
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
            raise ParamError(name, f"expected a string matching the pattern {spec.pattern}, "
                                   f"got {text!r}")
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
    items = [part for text in raw for part in text.split(",")]
    if "" in items:  # `a,,b`, `a,` or a bare `name=`: no value a client meant to send
        raise ParamError(spec.name, "expected a comma-separated list with no empty item")
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


def parse_param(r: Reader, name: str) -> ParamSpec:
    p = r.sub(name)
    ptype = p.get("type", str)
    if ptype not in PARAM_TYPES:
        raise p.fail("type", f"must be one of {', '.join(PARAM_TYPES)}, got {ptype!r}")
    values = tuple(p.get("values", list, [] if ptype != "enum" else ...))
    if ptype == "enum" and (not values or not all(isinstance(v, str) for v in values)):
        raise p.fail("values", "an enum needs a non-empty list of strings")
    pattern = p.get("pattern", str, None)
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise p.fail("pattern", f"invalid regular expression: {exc}") from None
    has_default = "default" in p.table
    default = p.get("default", (int, float, str, bool, list), None)
    spec = ParamSpec(
        name=name,
        type=ptype,
        is_list=p.get("list", bool, False),
        max_items=p.get("max_items", int, 50),
        required=p.get("required", bool, not has_default),
        default=default,
        min=p.get("min", (int, float), None),
        max=p.get("max", (int, float), None),
        max_length=p.get("max_length", int, 200),
        pattern=pattern,
        values=values,
        ignore_case=p.get("ignore_case", bool, False),
        unordered=p.get("unordered", bool, False),
    )
    p.finish()
    if spec.ignore_case and ptype not in ("enum", "string"):
        raise p.fail("ignore_case", "applies to enum and string parameters only")
    if spec.unordered and not spec.is_list:
        raise p.fail("unordered", "applies to list parameters only")
    if spec.ignore_case and ptype == "enum" and len({v.lower() for v in values}) != len(values):
        raise p.fail("values", "values differ only in case, so ignore_case is ambiguous")
    if spec.required and has_default:
        raise p.fail("default", "a required parameter cannot have a default")
    if has_default:
        raw = default if isinstance(default, list) else [default]
        try:
            parse_value(spec, [str(v).lower() if isinstance(v, bool) else str(v) for v in raw])
        except ParamError as exc:
            raise p.fail("default", exc.message) from None
    return spec
