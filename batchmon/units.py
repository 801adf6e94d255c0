"""Human sizes and counts: parse "125M", "1.3B", "141GiB", "80GB"; format bytes; clean outside text to draw.

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


_BYTE_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")


def format_bytes(n: int | float | None, precision: int = 1, *, missing: str = "-") -> str:
    """Binary units, as nvidia-smi and PyTorch print them: 512 B, 1.5 KiB, 10.5 GiB; negative sizes keep their
    sign; ``missing`` for None. The unit is the one whose rounded figure stays under 1024 (1023.99 KiB is
    '1.0 MiB', not '1024.0 KiB'). The one byte formatter: the calculator, the tables and the UI all use it."""
    if n is None:
        return missing
    sign = "-" if n < 0 else ""
    value = float(abs(n))
    if value < 1024:
        return f"{sign}{int(value)} B"
    for unit in _BYTE_UNITS:
        value /= 1024
        if round(value, precision) < 1024 or unit == _BYTE_UNITS[-1]:
            return f"{sign}{value:.{precision}f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def fmt_bytes(n: int | float | None, precision: int = 1) -> str:
    """format_bytes as the monitor's tables and panels show it: 'n/a' for a figure nobody reported."""
    return format_bytes(n, precision, missing="n/a")


def unit_of(n: int | float) -> tuple[str, int]:
    """The binary unit format_bytes would pick for n, and its size in bytes."""
    value, size = abs(float(n)), 1
    if value < 1024:
        return "B", 1
    for unit in _BYTE_UNITS:
        size *= 1024
        if round(value / size, 1) < 1024 or unit == _BYTE_UNITS[-1]:
            return unit, size
    raise AssertionError("unreachable")  # pragma: no cover


def fmt_used_total(used: int | None, total: int | None, precision: int = 1) -> str:
    """'10.5/139.8 GiB': both figures in the total's unit, so they compare at a glance."""
    if total is None:
        return f"{fmt_bytes(used, precision)}/n/a"
    unit, size = unit_of(total)
    if unit == "B":
        return f"{'?' if used is None else int(used)}/{int(total)} B"
    shown = "?" if used is None else f"{used / size:.{precision}f}"
    return f"{shown}/{total / size:.{precision}f} {unit}"


def fmt_short_bytes(n: int | float | None) -> str:
    """Axis-label bytes, at most 5 characters: '140G', '512M', '12K'."""
    if n is None:
        return "?"
    value = float(n)
    for unit in ("", "K", "M", "G", "T", "P"):
        if abs(value) < 1024 or unit == "P":
            if unit == "":
                return f"{int(value)}"
            return f"{value:.0f}{unit}" if abs(value) >= 10 else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.0f}P"  # pragma: no cover


def clean_text(text: object) -> str:
    """One printable line of a string from outside (an agent's argv, a GPU name, another user's command line,
    a recording): control characters, terminal escapes among them, become spaces, so nothing anyone sends can
    move the cursor, set the window title or clear the screen. Every front end draws through it."""
    s = str(text)
    return s if s.isprintable() else "".join(ch if ch.isprintable() else " " for ch in s)


def format_count(n: int) -> str:
    """1_300_000_000 -> '1.3B', 125_000_000 -> '125M', 4096 -> '4096'."""
    for suffix, factor in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if abs(n) >= factor:
            return f"{n / factor:.4g}{suffix}"
    return str(n)
