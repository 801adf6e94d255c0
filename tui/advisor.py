"""The fit advisor in the monitor (issue 16 point 3): type a target batch (``b``), see the ways to fit it.

``advisor_lines`` is the pure view: the ranked advice of ``batchmon.memory_model.advise`` for a target batch
as Rich lines (cheapest first; the ones that fall short after, marked). ``AdvisorPrompt`` is the batch prompt
with that list under its input, re-ranked as the user types; Enter applies the typed batch as the job's what-if
batch, as the plain prompt did, so ``b`` still sets the what-if batch and now also answers "how do I fit it".
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Input, Static

from batchmon import memory_model
from batchmon.memory_model import Advice, MemoryModel, advise
from batchmon.snapshot import AgentView
from batchmon.tui.fmt import fmt_bytes
from batchmon.tui.palette import ACCENT, BAD, DIM, OK
from batchmon.tui.predict import fit_steps
from batchmon.tui.screens import BatchPrompt
from batchmon.tui.views import JobView

#: rows listed (the ranking's head; the rest add nothing a user acts on)
MAX_ROWS = 10


@dataclass(frozen=True)
class AdvisorInput:
    """What the advisor needs of a job: its fitted model, its device's size, the GPUs the job has."""

    model: MemoryModel | None
    device_total: int | None
    gpus: int = 1
    observed_batch: int | None = None


def advisor_input(job: JobView) -> AdvisorInput:
    """The job's lead rank's model (the hub's own, else fitted here from its steps) and device."""
    lead = job.lead
    dev = job.devices.get(lead.key)
    total = dev.memory.total if dev is not None and dev.memory is not None else None
    return AdvisorInput(_model(lead), total, max(1, lead.hello.world_size), job.observed_batch)


def _model(agent: AgentView) -> MemoryModel | None:
    if agent.model is not None:
        return agent.model
    try:
        return memory_model.fit(fit_steps(agent), optimizer=agent.hello.optimizer)
    except Exception:  # noqa: BLE001 - a model bug costs the advice, never the monitor
        return None


def _factor(a: Advice) -> str:
    return f"step time ×{a.step_time_factor:.2f}"


def advisor_lines(inp: AdvisorInput, target: int | None, width: int = 92) -> list[Text]:
    """The advisor's lines for ``target`` (None: no target typed yet: ranked by largest batch per cost)."""
    if inp.model is None:
        return [Text("No memory model yet: the advice needs a few measured steps.", style=DIM)]
    if not inp.device_total:
        return [Text("No device size known (a CPU run, or no NVML): nothing to fit against.", style=DIM)]
    try:
        advice = advise(inp.model, capacity=inp.device_total, target_batch=target, gpus=inp.gpus)
    except ValueError as exc:
        return [Text(str(exc), style=BAD)]
    where = f"{fmt_bytes(inp.device_total)}" + (f", {inp.gpus} GPUs" if inp.gpus > 1 else "")
    if target is None:
        head = Text(f"Largest batch per cost on {where} (type a target batch):", style="bold")
    else:
        head = Text(f"Ways to fit batch {target} on {where}, cheapest first:", style="bold")
    lines = [head]
    label_w = max(20, min(width - 34, max((len(a.what_if) for a in advice[:MAX_ROWS]), default=20)))
    short_shown = False
    for a in advice[:MAX_ROWS]:
        if target is not None and not a.fits_target and not short_shown:
            short_shown = True
            lines.append(Text(f"Not enough for {target} (the closest):", style=DIM))
        mark, style = ("✓", OK) if a.fits_target else ("✗", BAD) if a.fits_target is False else ("·", ACCENT)
        label = a.what_if if len(a.what_if) <= label_w else a.what_if[:label_w - 1] + "…"
        batch = "?" if a.max_batch is None else str(a.max_batch)
        row = Text()
        row.append(f" {mark} ", style=style)
        row.append(f"{label:<{label_w}}")
        row.append(f"  largest {batch:>7}", style="bold" if a.fits_target else "")
        row.append(f"  {_factor(a)}", style=DIM)
        lines.append(row)
    if not advice:
        lines.append(Text("Nothing grows with the batch: any batch fits as far as the model knows.", style=DIM))
    else:
        best = advice[0]
        lines.append(Text(""))
        lines.append(Text(f"{best.what_if}: {best.factor_basis}", style=DIM))
        lines.append(Text("Largest batches are the prediction's conservative side (band + measured margin).",
                          style=DIM))
    return lines


def _joined(lines: list[Text]) -> Text:
    out = Text()
    for i, line in enumerate(lines):
        if i:
            out.append("\n")
        out.append_text(line)
    return out


class AdvisorPrompt(BatchPrompt):
    """The what-if batch prompt with the fit advisor under it, re-ranked for the batch being typed."""

    DEFAULT_CSS = """
    #advisor-box {
        width: 100;
        max-width: 100%;
        height: auto;
        max-height: 90%;
        border: round $bm-accent;
        background: $bm-surface;
        padding: 1 2;
    }
    #advice { height: auto; }
    """

    def __init__(self, current: int | None, inp: AdvisorInput) -> None:
        super().__init__(current)
        self.advisor = inp
        self.shown_target: int | None = None

    @classmethod
    def for_job(cls, job: JobView, current: int | None) -> "AdvisorPrompt":
        return cls(current, advisor_input(job))

    def compose(self) -> ComposeResult:
        with Vertical(id="advisor-box"):
            yield Static(Text("Target batch size: the ways to fit it below (Enter applies it as the what-if, "
                              "escape cancels)"), id="batch-label")
            yield Input(value=str(self.current or ""), placeholder="e.g. 128", type="integer",
                        id="batch-input", select_on_focus=True)
            yield Static("", id="batch-error")
            yield Static(self._advice_text(self.current), id="advice")

    def _advice_text(self, target: int | None) -> Text:
        self.shown_target = target
        return _joined(advisor_lines(self.advisor, target))

    def on_input_changed(self, event: Input.Changed) -> None:
        try:
            target: int | None = int(event.value.strip())
        except ValueError:
            target = None
        if target is not None and (target < 1 or target > (1 << 30)):
            target = None
        if target != self.shown_target:
            self.query_one("#advice", Static).update(self._advice_text(target))
