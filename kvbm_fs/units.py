"""Byte sizes as people write them in URLs and config files."""

from __future__ import annotations

import re

from .errors import CapacityError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: str | int | float, what: str = "size") -> int:
    """'8GiB', '100GB', '512MiB', '4096' or an int -> bytes."""
    if isinstance(value, bool):
        raise CapacityError(f"{what} must be a size, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise CapacityError(f"{what} must not be negative, got {value!r}")
        return int(value)
    m = _RE.match(str(value))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise CapacityError(f"{what} {value!r} is not a size like '8GiB', '100GB' or '4096'")
    return int(float(m.group(1)) * _UNITS[unit])


def fmt_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)
