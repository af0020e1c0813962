"""
Sizes and rates as people write them: ``4K``, ``64KiB``, ``16M``, ``1G`` or bytes.

Suffixes are binary, as in QEMU and qemu-img: ``K``, ``KB`` and ``KiB`` all
mean 1024. Rates take the same forms, optionally ending in ``/s``.
Pure functions, no I/O.
"""

from __future__ import annotations

import re

from .errors import ArgumentError

__all__ = ["parse_size", "parse_rate", "format_size", "format_rate", "format_latency"]

_MULT = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40,
         "P": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)
_BYTES_RE = re.compile(r"^\s*(\d+)\s*B?\s*$", re.IGNORECASE)

SIZE_FORMS = "bytes, or a number with K, M, G, T (or KiB, MiB, ...), e.g. 4K, 64KiB, 16M, 1G"


def parse_size(value: int | str, *, name: str = "size") -> int:
    """Return ``value`` in bytes.

    :raise ArgumentError: naming ``name`` when the value is negative, not a
        whole number of bytes, or not a size at all.
    """
    if isinstance(value, bool):
        raise ArgumentError(name, f"expected a size ({SIZE_FORMS}), got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ArgumentError(name, f"must be >= 0, got {value}")
        return value
    if not isinstance(value, str):
        raise ArgumentError(name, f"expected a size ({SIZE_FORMS}), got {value!r}")
    text = value.strip()
    if text.startswith("-"):
        raise ArgumentError(name, f"must be >= 0, got {value!r}")
    m = _BYTES_RE.match(text)
    if m:
        return int(m.group(1))
    m = _SIZE_RE.match(text)
    if not m or (not m.group(2) and "." in m.group(1)):
        raise ArgumentError(name, f"expected a size ({SIZE_FORMS}), got {value!r}")
    number, unit = m.group(1), m.group(2).upper()
    # Decimal sizes ("1.5M") are exact in integers: scale before dividing.
    whole, _, frac = number.partition(".")
    scaled = int(whole + frac) * _MULT[unit]
    quotient, rest = divmod(scaled, 10 ** len(frac))
    if rest:
        raise ArgumentError(name, f"{value!r} is not a whole number of bytes")
    return quotient


def parse_rate(value: int | str, *, name: str = "speed") -> int:
    """Return a rate in bytes per second; accepts sizes with an optional ``/s``."""
    text = value
    if isinstance(value, str):
        text = value.strip()
        if text.lower().endswith("/s"):
            text = text[:-2]
    try:
        return parse_size(text, name=name)
    except ArgumentError as exc:
        if "expected a size" in str(exc):
            raise ArgumentError(name, f"expected a rate (bytes per second: {SIZE_FORMS}, "
                                      f"optionally ending in /s), got {value!r}") from None
        raise


def format_size(n: float) -> str:
    """``67108864`` -> ``'64 MiB'``; whole units print without decimals."""
    if n < 0:
        return "-" + format_size(-n)
    for unit, mult in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= mult:
            q = n / mult
            return f"{q:.0f} {unit}" if q == int(q) else f"{q:.1f} {unit}"
    return f"{n:.0f} B"


def format_rate(bps: float) -> str:
    return format_size(bps) + "/s"


def format_latency(us: float) -> str:
    """``'50 ms'``, ``'850 µs'``: the unit a person would type, 3 significant digits."""
    if us >= 1000:
        return f"{us / 1000:.3g} ms"
    return f"{us:.3g} µs"
