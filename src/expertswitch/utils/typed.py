"""Typed settings from YAML or JSON: a value checked (and, for numbers written as strings,
converted) against its dataclass field's type hint, with an error that names the setting."""

from __future__ import annotations

import math
from typing import get_args, get_origin

from expertswitch.errors import ConfigError


def coerce(value, hint, name: str):
    """A YAML value checked against its field's type. Numbers written as strings are read as
    numbers: PyYAML reads `1e-3` (no dot) as the string '1e-3'."""
    args = get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        rest = [a for a in args if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else hint
    origin = get_origin(hint)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        (item,) = get_args(hint)
        return [coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if hint in (int, float):
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
        if isinstance(number, bool) or not isinstance(number, (int, float)) \
                or not math.isfinite(number):  # fmt: skip
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if hint is int:
            if number != int(number):
                raise ConfigError(f"{name} must be a whole number, got {value!r}")
            return int(number)
        return float(number)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    return value
