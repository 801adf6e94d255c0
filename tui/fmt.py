"""Small, exact formatters for the UI (human bytes, seconds, batch sizes). Pure functions, no textual."""

from __future__ import annotations

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def _fallback_fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "n/a"
    sign = "-" if n < 0 else ""
    value = float(abs(n))
    unit = 0
    while value >= 1024 and unit < len(_UNITS) - 1:
        value /= 1024
        unit += 1
    if unit == 0:
        return f"{sign}{int(value)} B"
    return f"{sign}{value:.2f} {_UNITS[unit]}" if value < 10 else f"{sign}{value:.1f} {_UNITS[unit]}"


try:  # one formatter for every front end, once batchmon.monitor.render provides it
    from batchmon.monitor.render import fmt_bytes as _shared_fmt_bytes  # type: ignore[attr-defined]
except Exception:  # noqa: BLE001 - missing module or name: use ours
    _shared_fmt_bytes = None


def fmt_bytes(n: int | float | None) -> str:
    """Human bytes in binary units: '1.50 GiB', '512 B'; 'n/a' for unknown."""
    if n is None:
        return "n/a"
    if _shared_fmt_bytes is not None:
        try:
            return str(_shared_fmt_bytes(n))
        except Exception:  # noqa: BLE001 - never let a formatter break a frame
            pass
    return _fallback_fmt_bytes(n)


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


def fmt_seconds(s: float | None) -> str:
    """Step time: '125 ms', '1.25 s', 'n/a'."""
    if s is None:
        return "n/a"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    return f"{s:.2f} s"


def fmt_count(n: int | None) -> str:
    """Compact counts for axes and parameter totals: 2048 -> '2048', 12_600_000 -> '12.6M'."""
    if n is None:
        return "n/a"
    if abs(n) < 10_000:
        return str(n)
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)  # pragma: no cover


def fmt_interval(seconds: float) -> str:
    """Refresh interval: '250 ms', '1 s', '2.5 s'."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:g} s"


def fmt_used_total(used: int | None, total: int | None) -> str:
    """'48.8/140.4 GiB': both in the total's unit, so they compare at a glance."""
    try:
        from batchmon.monitor.render import fmt_used_total as shared

        return str(shared(used, total))
    except Exception:  # noqa: BLE001 - not there yet or failed: plain form
        return f"{fmt_bytes(used)} / {fmt_bytes(total)}"
