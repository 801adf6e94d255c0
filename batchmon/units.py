"""Human sizes and counts: parse "125M", "1.3B", "141GiB", "80GB"; format bytes for tables.

Counts use decimal suffixes (K=1e3, M=1e6, B/G=1e9, T=1e12), as model sizes are quoted ("1.3B parameters").
Byte sizes accept both decimal (KB, MB, GB, TB = powers of 1000, as GPU vendors quote them: "80GB") and binary
(KiB, MiB, GiB, TiB = powers of 1024, what nvidia-smi and PyTorch print). Results are exact integers: the
number is parsed as a Decimal, so "1.3B" is 1_300_000_000, never 1_299_999_999.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_COUNT_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
_BYTE_SUFFIX = {
    "": 1, "B": 1,
    "K": 1024, "KB": 1000, "KIB": 1024,
    "M": 1024**2, "MB": 1000**2, "MIB": 1024**2,
    "G": 1024**3, "GB": 1000**3, "GIB": 1024**3,
    "T": 1024**4, "TB": 1000**4, "TIB": 1024**4,
}
_NUMBER = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE]([+-]?[0-9]{1,3}))?\s*([A-Za-z]*)\s*$")


def _parse(text: str, table: dict[str, int], what: str, examples: str) -> int:
    m = _NUMBER.match(text) if isinstance(text, str) else None
    if not m:
        raise ValueError(f"not a {what}: {text!r} (examples: {examples})")
    digits, exponent, suffix = m.groups()
    factor = table.get(suffix.upper())
    if factor is None:
        raise ValueError(f"unknown unit {suffix!r} in {text!r} (examples: {examples})")
    try:
        value = Decimal(digits) * factor
        if exponent:
            value = value.scaleb(int(exponent))
    except InvalidOperation:  # pragma: no cover - the regex only lets numbers through
        raise ValueError(f"not a {what}: {text!r}") from None
    if value != value.to_integral_value():
        raise ValueError(f"{text!r} is not a whole number of {'bytes' if what == 'size' else 'units'}")
    return int(value)


def parse_count(text: str) -> int:
    """'125M' -> 125_000_000, '1.3B' -> 1_300_000_000, '7e9' -> 7_000_000_000, '4096' -> 4096."""
    return _parse(text, _COUNT_SUFFIX, "count", "125M, 1.3B, 7e9, 4096")


def parse_size(text: str) -> int:
    """'141GiB' -> 141*1024**3, '80GB' -> 80*1000**3, '512M' -> 512 MiB (bare K/M/G/T are binary), '1024' bytes."""
    return _parse(text, _BYTE_SUFFIX, "size", "141GiB, 80GB, 512MiB")


def format_bytes(n: int | float | None, *, precision: int = 1) -> str:
    """Binary units, as nvidia-smi and PyTorch print them: 1536 -> '1.5 KiB'. None -> '-'."""
    if n is None:
        return "-"
    sign = "-" if n < 0 else ""
    value = float(abs(n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            if unit == "B":
                return f"{sign}{int(value)} B"
            return f"{sign}{value:.{precision}f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def format_count(n: int) -> str:
    """1_300_000_000 -> '1.3B', 125_000_000 -> '125M', 4096 -> '4096'."""
    for suffix, factor in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if abs(n) >= factor:
            return f"{n / factor:.4g}{suffix}"
    return str(n)
