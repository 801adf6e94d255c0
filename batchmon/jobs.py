"""Ranks of one distributed job, grouped (by snapshot.job_key), and how unevenly their memory is spread.

Every front end groups the same way (TUI panels, `--once` text and JSON), so this lives beside the Snapshot and
not in any of them. Pure functions of AgentView objects: no torch, no textual.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from batchmon.protocol import COMPONENTS, Step
from batchmon.snapshot import AgentView, job_key
from batchmon.units import fmt_bytes


@dataclass(frozen=True)
class Job:
    key: str
    ranks: tuple[AgentView, ...]  # by rank, then pid

    @property
    def lead(self) -> AgentView:
        return self.ranks[0]

    @property
    def world_size(self) -> int:
        return max(a.hello.world_size for a in self.ranks)

    def imbalance(self) -> "Imbalance | None":
        return imbalance(self.ranks)


def group_jobs(agents: Iterable[AgentView]) -> list[Job]:
    """Agents grouped into jobs, ranks ordered by rank then pid, jobs in the order their first agent came."""
    groups: dict[str, list[AgentView]] = {}
    for agent in agents:
        groups.setdefault(job_key(agent), []).append(agent)
    return [Job(key, tuple(sorted(ranks, key=lambda a: (a.hello.rank, a.hello.pid))))
            for key, ranks in groups.items()]


def run_order(job: Job) -> tuple[bool, float]:
    """Running jobs first, then the ended ones newest first (a sort key's first terms)."""
    end = max((a.ended.time for a in job.ranks if a.ended is not None), default=None)
    return (end is not None, -(end or 0.0))


def rank_total(step: Step) -> int:
    """One rank's measured bytes: the six agent components (their sum is the step's peak allocated on CUDA)."""
    return sum(int(step.components.get(name) or 0) for name in COMPONENTS)


@dataclass(frozen=True)
class Imbalance:
    """The spread of memory between the ranks of one job at their last steps."""

    ranks: int  # ranks with a step
    heaviest_rank: int
    heaviest_bytes: int
    lightest_rank: int
    lightest_bytes: int
    # heaviest minus lightest rank, per component, signed (a rank can be heavier overall yet lighter in one
    # component), largest difference first, zero differences left out
    by_component: dict[str, int] = field(default_factory=dict)

    @property
    def spread(self) -> int:
        return self.heaviest_bytes - self.lightest_bytes

    @property
    def spread_pct(self) -> float:
        """Spread as a percentage of the heaviest rank (0 when every rank is empty)."""
        return 100.0 * self.spread / self.heaviest_bytes if self.heaviest_bytes else 0.0

    def to_dict(self) -> dict[str, object]:
        return {"ranks": self.ranks, "heaviest_rank": self.heaviest_rank, "heaviest_bytes": self.heaviest_bytes,
                "lightest_rank": self.lightest_rank, "lightest_bytes": self.lightest_bytes, "spread": self.spread,
                "spread_pct": round(self.spread_pct, 2), "by_component": dict(self.by_component)}


def imbalance(ranks: Iterable[AgentView]) -> Imbalance | None:
    """None unless at least two ranks have reported a step."""
    stepped = [a for a in ranks if a.last_step is not None]
    if len(stepped) < 2:
        return None
    totals = [(rank_total(a.last_step), a.hello.rank) for a in stepped]  # type: ignore[arg-type]
    heavy = max(totals, key=lambda t: (t[0], -t[1]))
    light = min(totals, key=lambda t: (t[0], t[1]))
    by_rank = {a.hello.rank: a.last_step.components for a in stepped}  # type: ignore[union-attr]
    diffs = {name: int(by_rank[heavy[1]].get(name) or 0) - int(by_rank[light[1]].get(name) or 0)
             for name in COMPONENTS}
    ordered = dict(sorted(((n, d) for n, d in diffs.items() if d), key=lambda kv: -abs(kv[1])))
    return Imbalance(len(stepped), heavy[1], heavy[0], light[1], light[0], ordered)


def imbalance_text(found: Imbalance) -> str:
    """"imbalance 1.2 MiB (0.1%), rank 1 over rank 0: activations +32.0 MiB, other -31.8 MiB": the heaviest
    rank over the lightest, and the two components that differ most between them (--once and the TUI)."""
    parts = ", ".join(f"{name} {'+' if b > 0 else '-'}{fmt_bytes(abs(b))}"
                      for name, b in list(found.by_component.items())[:2])
    text = f"imbalance {fmt_bytes(found.spread)} ({found.spread_pct:.1f}%)"
    if found.spread:
        text += f", rank {found.heaviest_rank} over rank {found.lightest_rank}"
    return text + (f": {parts}" if parts else "")
