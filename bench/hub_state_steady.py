"""The hub state's steady cost beside 16 fast jobs: ingest per agent message and snapshot per tick (issue 14.3).

tests/fixtures/fast16_h200_50s_growth.jsonl.gz is 16 real H200 jobs' first 50 s, when every summary is still the
whole history (the refit rule's growth phase); the H200's measured rounds come later. This loops each agent's live
messages (step numbers and times moved on, as bench/load.py --recorded does) for S seconds, with the recording's
NVML and host samples and a tick a second, through HubState, and times the last 40 s (best of 3).

    TREE=/path/to/checkout python3 bench/hub_state_steady.py [S] [--prof]    # TREE: which batchmon (an A/B)
"""

from __future__ import annotations

import cProfile
import gzip
import json
import os
import pstats
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "..", "tests", "fixtures", "fast16_h200_50s_growth.jsonl.gz")
MEASURED_S = 40
sys.path.insert(0, os.environ.get("TREE") or os.path.join(HERE, ".."))

from batchmon.monitor.hub_state import HubState  # noqa: E402

sys.path.insert(0, HERE)
from load import agents_of_records as load_agents  # noqa: E402  (bench/load.py: a recording's agents)


def stream(seconds: float) -> tuple[float, list[tuple[float, dict[str, Any]]]]:
    """(start time, [(time, record)]) of the looped recording."""
    with gzip.open(FIXTURE, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    agents = load_agents(records)
    nvml = [r for r in records if r["kind"] == "nvml"]
    host = [r for r in records if r["kind"] == "host"]
    t0 = min(live[0]["time"] for _, _, live in agents)
    out: list[tuple[float, dict[str, Any]]] = []

    def agent(t: float, key: str, data: dict) -> None:
        out.append((t, {"t": t, "kind": "agent", "source": "local", "key": key, "data": data}))

    for hello, burst, live in agents:
        key = f"vm:{hello['pid']}"
        agent(t0 - 1, key, hello)
        for m in burst:
            agent(t0 - 0.5, key, m)
        first, span = live[0]["time"], live[-1]["time"] - live[0]["time"] + 0.2
        steps = live[-1]["step"] - live[0]["step"] + int(live[-1].get("steps") or 1)
        loop = 0
        while True:
            for m in live:
                t = m["time"] - first + t0 + loop * span
                if t > t0 + seconds:
                    break
                agent(t, key, dict(m, time=t, step=m["step"] + loop * steps))
            else:
                loop += 1
                continue
            break
    for k in range(int(seconds)):
        t = t0 + k + 1
        n = nvml[k % len(nvml)]
        out.append((t - 0.01, dict(n, t=t - 0.01, data=dict(n["data"], time=t - 0.01))))
        out.append((t - 0.005, dict(host[k % len(host)], t=t - 0.005)))
        out.append((t, {"t": t, "kind": "tick", "source": "local"}))
    out.sort(key=lambda x: x[0])
    return t0, out


def run(t0: float, seconds: float, records: list, profile: cProfile.Profile | None = None) -> dict[str, float]:
    state = HubState()
    ingest = snap = 0.0
    snaps = msgs = 0
    clock = time.perf_counter
    for t, rec in records:
        measured = t >= t0 + seconds - MEASURED_S
        if rec["kind"] == "tick":
            if measured and profile is not None:
                profile.enable()
            a = clock()
            state.snapshot(t, 1.0)
            b = clock()
            if profile is not None:
                profile.disable()
            if measured:
                snap, snaps = snap + b - a, snaps + 1
        else:
            a = clock()
            state.ingest(rec)
            b = clock()
            if measured and rec["kind"] == "agent":
                ingest, msgs = ingest + b - a, msgs + 1
    return {"snapshot_ms_per_s": snap / MEASURED_S * 1e3, "snapshot_us": snap / max(snaps, 1) * 1e6,
            "ingest_ms_per_s": ingest / MEASURED_S * 1e3, "messages_per_s": msgs / MEASURED_S,
            "ingest_us": ingest / max(msgs, 1) * 1e6}


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    seconds = float(args[0]) if args else 150.0
    t0, records = stream(seconds)
    best = min((run(t0, seconds, records) for _ in range(3)), key=lambda r: r["snapshot_us"] + r["ingest_us"])
    print("snapshot {snapshot_ms_per_s:.3f} ms/s ({snapshot_us:.0f} us each); agent ingest {ingest_ms_per_s:.3f} ms/s "
          "({messages_per_s:.1f} msgs/s, {ingest_us:.1f} us each)".format(**best))
    if "--prof" in sys.argv:
        prof = cProfile.Profile()
        run(t0, seconds, records, prof)
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
