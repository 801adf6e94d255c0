"""The component table in two columns (four components a side): measured and predicted bytes per component in
six lines, so a short terminal (80×24) shows it where the full table's ten lines do not fit."""

from __future__ import annotations

from typing import Mapping

from rich.text import Text

from batchmon.protocol import ALL_COMPONENTS
from batchmon.tui.bars import COMPONENT_LABELS, COMPONENT_STYLES
from batchmon.tui.fmt import fmt_bytes
from batchmon.tui.palette import DIM

HALF_WIDTH = 34  # "■ " + label 11 + measured 10 + predicted 11
MIN_WIDTH = 2 + 2 * HALF_WIDTH + 3


def compact_table(measured: Mapping[str, int] | None, predicted: Mapping[str, int] | None) -> list[Text]:
    """Header, four lines of two components each, and the totals; predicted figures blank when there are none."""

    def half(name: str) -> Text:
        t = Text().append("■ ", style=COMPONENT_STYLES[name])
        t.append(f"{COMPONENT_LABELS[name]:<11}")
        t.append(f"{fmt_bytes(measured.get(name)) if measured is not None else '':>10}")
        t.append(f"{fmt_bytes(predicted.get(name)) if predicted is not None else '':>11}", style=DIM)
        return t

    head_half = f"{'component':<13}{'measured':>10}{'predicted':>11}"
    lines = [Text().append(f"  {head_half} │ {head_half}", style=f"bold {DIM}")]
    names = list(ALL_COMPONENTS)
    side = (len(names) + 1) // 2
    for i in range(side):
        t = Text("  ").append_text(half(names[i]))
        if i + side < len(names):
            t.append(" │ ", style=DIM).append_text(half(names[i + side]))
        lines.append(t)
    total = Text().append(f"  {'total':<13}", style="bold")
    total.append(f"{fmt_bytes(sum(measured.values())) if measured else '':>10}", style="bold")
    total.append(f"{fmt_bytes(sum(predicted.values())) if predicted else '':>11}", style="bold")
    lines.append(total)
    return lines
