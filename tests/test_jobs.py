"""batchmon.jobs: which agents are ranks of one job, and the imbalance between them."""

from __future__ import annotations

from typing import Any

from batchmon.jobs import group_jobs, imbalance, imbalance_text, job_key, rank_total
from batchmon.protocol import COMPONENTS, Hello, ModelInfo, Step
from batchmon.snapshot import AgentView


def agent(pid: int, *, rank: int = 0, world: int = 1, job: str | None = None, source: str = "local",
          argv: tuple[str, ...] = ("train.py",), comps: dict[str, int] | None = None) -> AgentView:
    h = Hello(pid=pid, host="box", argv=argv, python="3.12", torch="2.11", device=f"cuda:{rank}", nvml_uuid=None,
              rank=rank, local_rank=rank, world_size=world, model=ModelInfo("Net", 10, 40), optimizer="AdamW",
              job=job)
    step = None
    if comps is not None:
        full = {name: comps.get(name, 0) for name in COMPONENTS}
        step = Step(step=5, time=1.0, step_seconds=0.1, batch_size=8, components=full)
    return AgentView(key=f"box:{pid}", source=source, hello=h, last_step=step)


def test_single_processes_with_the_same_command_stay_separate_jobs() -> None:
    jobs = group_jobs([agent(10), agent(11)])
    assert [len(j.ranks) for j in jobs] == [1, 1]
    assert job_key(agent(10)) != job_key(agent(11))


def test_ranks_sharing_a_job_id_group_and_sort_by_rank() -> None:
    a1 = agent(21, rank=1, world=2, job="127.0.0.1:29500 run-a")
    a0 = agent(20, rank=0, world=2, job="127.0.0.1:29500 run-a")
    other = agent(30, rank=0, world=2, job="127.0.0.1:29611 run-b")
    jobs = group_jobs([a1, other, a0])
    assert [[a.hello.rank for a in j.ranks] for j in jobs] == [[0, 1], [0]]
    assert jobs[0].ranks[0].hello.pid == 20 and jobs[0].world_size == 2


def test_without_a_job_id_ranks_group_by_command_and_world_size() -> None:
    same = [agent(40, rank=0, world=2, argv=("ddp.py", "--x")), agent(41, rank=1, world=2, argv=("ddp.py", "--x"))]
    assert len(group_jobs(same)) == 1
    assert len(group_jobs([*same, agent(42, rank=0, world=2, argv=("ddp.py", "--y"))])) == 2


def test_same_job_id_on_two_sources_is_two_jobs() -> None:
    jobs = group_jobs([agent(1, world=2, job="j"), agent(1, world=2, job="j", source="gpu2")])
    assert len(jobs) == 2


def test_imbalance_names_the_heaviest_rank_and_the_components_that_differ() -> None:
    base: dict[str, Any] = {"parameters": 1000, "gradients": 1000, "optimizer": 2000, "activations": 500,
                            "batch": 50, "other": 10}
    heavy = {**base, "activations": 900, "batch": 90}
    r0 = agent(1, rank=0, world=3, job="j", comps=base)
    r1 = agent(2, rank=1, world=3, job="j", comps=heavy)
    r2 = agent(3, rank=2, world=3, job="j", comps=base)
    found = imbalance([r0, r1, r2])
    assert found is not None and found.ranks == 3
    assert (found.heaviest_rank, found.lightest_rank) == (1, 0)
    assert found.heaviest_bytes == rank_total(r1.last_step) == sum(heavy.values())
    assert found.spread == 440 and list(found.by_component) == ["activations", "batch"]
    assert found.by_component == {"activations": 400, "batch": 40}
    assert abs(found.spread_pct - 100 * 440 / sum(heavy.values())) < 1e-9
    text = imbalance_text(found)
    assert text.startswith("imbalance 440 B") and "rank 1 over rank 0: " in text and "activations +400 B" in text


def test_imbalance_needs_two_ranks_with_steps_and_even_ranks_spread_nothing() -> None:
    comps = {"parameters": 10, "activations": 5}
    assert imbalance([agent(1, world=2, job="j", comps=comps), agent(2, rank=1, world=2, job="j")]) is None
    even = imbalance([agent(1, world=2, job="j", comps=comps), agent(2, rank=1, world=2, job="j", comps=comps)])
    assert even is not None and even.spread == 0 and even.by_component == {} and even.spread_pct == 0.0
    assert imbalance_text(even) == "imbalance 0 B (0.0%)"


def test_a_component_the_heaviest_rank_has_less_of_shows_negative() -> None:
    r0 = agent(1, world=2, job="j", comps={"activations": 100, "other": 300})
    r1 = agent(2, rank=1, world=2, job="j", comps={"activations": 400, "other": 50})
    found = imbalance([r0, r1])
    assert found is not None and found.heaviest_rank == 1 and found.spread == 50
    assert found.by_component == {"activations": 300, "other": -250}
    assert imbalance_text(found).endswith(": activations +300 B, other -250 B")
