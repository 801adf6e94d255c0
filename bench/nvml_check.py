#!/usr/bin/env python3
"""Check the NVML probe on a real GPU against nvidia-smi, with a torch process holding 10 GiB on cuda:0.

Writes under $OUT (default ./out):
  nvml_h200_recording.json  the raw NVML readings of the run (test fixture: tests/fixtures/)
  nvml_check.json           the figures: NVML and nvidia-smi used/total MiB, differences, the child's bytes
  nvml_check_once.txt/.json what batchmon.monitor.render makes of the last recorded sample
  batchmon_once.txt/.json   the real `python -m batchmon --once [--json]` run while the child holds its memory
Exit 0 when every check passes (or when there is no NVML here: nothing to check), else 1.

    OUT=out python3 bench/nvml_check.py
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from nvml_common import (GiB, MiB, SMI_QUERY, Child, import_batchmon, nvidia_smi, out_dir, pynvml_version,
                         write_json)

SAMPLES = 5
CHILD_BYTES = 10 * GiB
CONTEXT_LIMIT = 2 * GiB  # CUDA context + allocator rounding we accept on top of the tensor


def run_cli(out: Path, pid: int) -> dict[str, Any]:
    """The real `batchmon --once` and `--once --json` while the child holds its memory: saved, and checked for it."""
    report: dict[str, Any] = {}
    for name, extra in (("batchmon_once.txt", []), ("batchmon_once.json", ["--json"])):
        try:
            done = subprocess.run([sys.executable, "-m", "batchmon", "--once", *extra], capture_output=True,
                                  text=True, timeout=60)
        except (subprocess.SubprocessError, OSError) as exc:
            report[name] = {"error": str(exc)}
            continue
        (out / name).write_text(done.stdout + done.stderr, encoding="utf-8")
        entry: dict[str, Any] = {"rc": done.returncode}
        if extra:
            try:
                doc = json.loads(done.stdout)
                procs = [p for d in doc["devices"] for p in d["processes"] if p["pid"] == pid]
                entry["process"] = procs[0] if procs else None
            except (ValueError, KeyError, TypeError) as exc:
                entry["error"] = f"not the expected JSON: {exc}"
        else:
            entry["shows_pid"] = f"pid {pid} " in done.stdout
        report[name] = entry
    return report


def main() -> int:
    out = out_dir()
    import_batchmon()
    from batchmon.probes.nvml import NvmlProbe, sample_to_dict

    first = NvmlProbe().sample()
    if not first.available:
        print(f"NVML unavailable: {first.error}; nothing to check on this machine.")
        write_json(out / "nvml_check.json", {"available": False, "error": first.error})
        return 0

    import pynvml
    from batchmon.probes.host import HostProbe
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # nvml_recording: test/bench tooling
    from nvml_recording import RecordingBackend

    child = Child(CHILD_BYTES)
    try:
        if child.error:
            print(child.error)
            write_json(out / "nvml_check.json", {"available": True, "error": child.error})
            return 1
        rec = RecordingBackend(pynvml, meta={
            "source": f"bench/nvml_check.py on {socket.gethostname()}: a torch process (pid {child.pid}) holds a "
                      f"{CHILD_BYTES // GiB} GiB tensor on cuda:0",
            "child_pid": child.pid,
            "child_bytes": CHILD_BYTES,
            "pynvml": pynvml_version(),
        })
        probe = NvmlProbe(backend=rec)
        rounds = []
        for _ in range(SAMPLES):
            before = nvidia_smi()
            sample = probe.sample()
            after = nvidia_smi()
            rounds.append((before, sample, after))
            time.sleep(0.2)
        rec.meta["driver"] = rounds[-1][1].driver
        rec.save(out / "nvml_h200_recording.json")

        # v1 next to v2, outside the recording: which one nvidia-smi agrees with is worth knowing
        raw: dict[int, dict[str, Any]] = {}
        for dev in rounds[-1][1].devices:
            raw[dev.index] = entry = {}
            try:
                h = pynvml.nvmlDeviceGetHandleByIndex(dev.index)
                v1 = pynvml.nvmlDeviceGetMemoryInfo(h)
                entry.update(v1_total=v1.total, v1_used=v1.used, v1_free=v1.free)
                v2 = pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2)
                entry.update(v2_total=v2.total, v2_used=v2.used, v2_reserved=v2.reserved, v2_free=v2.free)
            except Exception as exc:
                entry["error"] = f"{type(exc).__name__}: {exc}"

        figures = []
        ok = True
        for k, (before, sample, after) in enumerate(rounds):
            for dev in sample.devices:
                if dev.memory is None:
                    ok = False
                    figures.append({"sample": k, "index": dev.index, "error": "no memory reading", "lost": dev.lost})
                    continue
                used_mib, total_mib = dev.memory.used / MiB, dev.memory.total / MiB
                smi = [s[dev.index] for s in (before, after) if s and dev.index in s]
                if not smi:
                    figures.append({"sample": k, "index": dev.index, "nvml_used_mib": used_mib, "nvml_total_mib": total_mib,
                                    "smi": None})
                    continue
                d_used = min((used_mib - s["used_mib"] for s in smi), key=abs)
                d_total = min((total_mib - s["total_mib"] for s in smi), key=abs)
                agree = abs(d_used) <= 1 and abs(d_total) <= 1
                ok = ok and agree
                figures.append({"sample": k, "index": dev.index, "nvml_used_mib": round(used_mib, 3),
                                "nvml_total_mib": round(total_mib, 3), "nvml_reserved_mib":
                                None if dev.memory.reserved is None else round(dev.memory.reserved / MiB, 3),
                                "smi_before": before.get(dev.index) if before else None,
                                "smi_after": after.get(dev.index) if after else None,
                                "diff_used_mib": round(d_used, 3), "diff_total_mib": round(d_total, 3),
                                "within_1_mib": agree})

        last = rounds[-1][1]
        found = [(dev.index, p) for dev in last.devices for p in dev.processes if p.pid == child.pid]
        matched_by = "pid" if found else None
        if not found:  # NVML reports host pids; in a container ours differ. The one ~10 GiB process is ours.
            found = [(dev.index, p) for dev in last.devices for p in dev.processes
                     if p.used is not None and CHILD_BYTES <= p.used <= CHILD_BYTES + CONTEXT_LIMIT]
            matched_by = "size (NVML pid differs: another pid namespace)" if len(found) == 1 else None
            found = found if len(found) == 1 else []
        child_used = found[0][1].used if found else None
        child_ok = child_used is not None and CHILD_BYTES <= child_used <= CHILD_BYTES + CONTEXT_LIMIT
        ok = ok and child_ok
        result = {
            "available": True,
            "driver": last.driver,
            "smi_command": " ".join(SMI_QUERY),
            "samples": SAMPLES,
            "devices": figures,
            "raw_memory_v1_v2": raw,
            "child": {"pid": child.pid, "nvml_pid": found[0][1].pid if found else None, "matched_by": matched_by,
                      "tensor_bytes": CHILD_BYTES, "torch_reserved": child.reserved,
                      "nvml_device": found[0][0] if found else None, "nvml_used": child_used,
                      "nvml_used_gib": None if child_used is None else round(child_used / GiB, 4),
                      "context_and_rounding_mib": None if child_used is None
                      else round((child_used - CHILD_BYTES) / MiB, 1),
                      "ok": child_ok},
            "all_processes": {dev.index: [{"pid": p.pid, "used": p.used, "kind": p.kind} for p in dev.processes]
                              for dev in last.devices},
            "ok": ok,
        }
        result["cli"] = cli = run_cli(out, found[0][1].pid if found else child.pid)
        cli_proc = cli.get("batchmon_once.json", {}).get("process")
        result["cli_ok"] = cli_ok = bool(cli_proc) and cli_proc.get("used") is not None \
            and CHILD_BYTES <= cli_proc["used"] <= CHILD_BYTES + CONTEXT_LIMIT \
            and bool(cli.get("batchmon_once.txt", {}).get("shows_pid"))
        result["ok"] = ok = ok and cli_ok
        write_json(out / "nvml_check.json", result)

        # what --once renders from this very sample
        from batchmon.monitor.render import format_table, snapshot_to_json
        from batchmon.snapshot import Snapshot

        pids = [p.pid for dev in last.devices for p in dev.processes]
        snap = Snapshot(time=last.time, host=HostProbe().sample(pids), nvml=last)
        table = format_table(snap)
        (out / "nvml_check_once.txt").write_text(table + "\n", encoding="utf-8")
        write_json(out / "nvml_check_once.json", snapshot_to_json(snap))
        write_json(out / "nvml_check_sample.json", sample_to_dict(last))

        print(table)
        print()
        for f in figures[-len(last.devices):]:
            if "diff_used_mib" in f:
                print(f"GPU{f['index']}: NVML used {f['nvml_used_mib']:.1f} MiB / total {f['nvml_total_mib']:.1f} MiB; "
                      f"nvidia-smi {f['smi_after'] or f['smi_before']}; diff used {f['diff_used_mib']:+.3f} MiB, "
                      f"total {f['diff_total_mib']:+.3f} MiB -> {'OK' if f['within_1_mib'] else 'MISMATCH'}")
        for index, r in raw.items():
            smi = (rounds[-1][2] or {}).get(index)
            if smi and "v1_used" in r:
                print(f"GPU{index} raw: v1 used {r['v1_used'] / MiB:.1f} MiB total {r['v1_total'] / MiB:.1f} MiB; "
                      f"v2 used {r.get('v2_used', 0) / MiB:.1f} reserved {r.get('v2_reserved', 0) / MiB:.1f} "
                      f"total {r.get('v2_total', 0) / MiB:.1f} MiB; nvidia-smi used {smi['used_mib']} "
                      f"total {smi['total_mib']} MiB")
        if found:
            print(f"matched by {matched_by}: NVML pid {found[0][1].pid}")
            print(f"child pid {child.pid}: NVML {child_used} bytes = {child_used / GiB:.3f} GiB "
                  f"({(child_used - CHILD_BYTES) / MiB:.0f} MiB over the tensor) -> {'OK' if child_ok else 'UNEXPECTED'}"
                  if child_used is not None else f"child pid {child.pid}: NVML gives no per-process bytes")
        else:
            print(f"child pid {child.pid} is not in NVML's process lists (another pid namespace?); "
                  f"processes seen: {result['all_processes']}")
        print(f"`batchmon --once` / `--once --json` show the process: {'yes' if cli_ok else 'NO'} ({cli})")
        print(f"{'PASS' if ok else 'FAIL'}; files in {out}")
        return 0 if ok else 1
    finally:
        child.stop()


if __name__ == "__main__":
    sys.exit(main())
