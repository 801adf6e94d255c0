"""bench/predict_zoo.py's offline half (no torch, no GPU): refit the current memory model on a results file's
recorded observations (``--reevaluate``), merge the results of several device calls (``--merge``), and write
the README table (``--markdown``). Split from predict_zoo.py so that file stays a runner."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # batchmon from the checkout

from batchmon.memory_model import SavedSplit, WhatIf, fit  # noqa: E402

GIB = 2**30


def exact_boundary(trials: list[dict[str, Any]]) -> int | None:
    """The largest batch that ran below the smallest that ran out of memory (None without a failing trial)."""
    fails = [t["batch"] for t in trials if not t["ok"]]
    if not fails:
        return None
    ok = [t["batch"] for t in trials if t["ok"] and t["batch"] < min(fails)]
    return max(ok, default=0)


def step_peaks_only_max(steps: list[Any], optimizer: str | None, amp: bool, device_total: int) -> int | None:
    """The largest batch fitted on the same steps without their own phase or segment peaks (one line through the
    steps' peaks, as before issue 13's fix), for comparison (the zoo run and its reevaluation)."""
    model = fit([replace(s, phase_own_peaks=None, segment_peaks=None) for s in steps], optimizer=optimizer, amp=amp)
    return model.max_batch(device_total) if model is not None else None


def per_phase_max(steps: list[Any], optimizer: str | None, amp: bool, device_total: int) -> int | None:
    """The largest batch fitted on the same steps per phase, without their segment peaks (the backward not
    split at the output's gradient, as before), for comparison. None when the steps carry no segment peaks."""
    if not any(getattr(s, "segment_peaks", None) for s in steps):
        return None
    model = fit([replace(s, segment_peaks=None) for s in steps], optimizer=optimizer, amp=amp)
    return model.max_batch(device_total) if model is not None else None


def fit_label(model: Any, basis: Any) -> str:
    """How the peak was fitted, for the tables: per segment / per phase (and what decides), or one line."""
    if not model.phase_lines:
        return "one line"
    if model.per_segment:
        return f"per segment ({basis.deciding_segment} decides)"
    return f"per phase ({basis.deciding_phase} decides)"


def _split_of(r: dict[str, Any], splits: dict[str, Any] | None) -> tuple[SavedSplit | None, str]:
    """The split a result's what-ifs are derived from, and where it comes from: one given for the architecture
    (``--splits``: e.g. measured on the CPU by bench/zoo_split_cpu.py, a projection), else the one the agent
    carried in the recorded steps (a run since the agent measures it), else the bench's own older measure (run 5
    and before: no AMP bytes, so AMP falls back to its rule)."""
    if splits and r["arch"] in splits:
        return SavedSplit.from_wire(splits[r["arch"]]), "given (--splits)"
    carried = next((s.get("saved_split") for s in reversed(r["observed_steps"]) if s.get("saved_split")), None)
    if carried:
        return SavedSplit.from_wire(carried), "the agent's (recorded steps)"
    old = r.get("saved_split") or r.get("bench_saved_split")
    if old and "saved_amp" in old:
        return SavedSplit(**old), "the bench's older measure"
    return None, "none"


def with_inactive_split(steps: list[Any], r: dict[str, Any]) -> list[Any]:
    """The recorded steps carrying the allocator's inactive-split peak the bench read after each of them
    (``observed_allocator``), as an agent that reports ``Step.inactive_split`` sends it: the memory model's
    second bound of the fragmentation at the limit (MemoryModel.frag_share). Steps as recorded where the run
    has no allocator readings."""
    from batchmon.protocol import with_added

    readings = r.get("observed_allocator") or []
    if len(readings) != len(steps):
        return steps
    out = []
    for step, reading in zip(steps, readings):
        value = reading.get("inactive_split_peak") if isinstance(reading, dict) else None
        if isinstance(value, int) and getattr(step, "inactive_split", None) is None:
            step = with_added(step, inactive_split=value)
        out.append(step)
    return out


def reevaluate(doc: dict[str, Any], splits: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Refit the current memory model on each architecture's recorded observation (no GPU) and compare its
    largest batch, plain and per what-if, with the real one the run measured. Results recorded before the
    observation was kept (no ``observed_steps``) are listed with ``skipped``. What-ifs: ``predicted`` is what a
    user gets from the recorded steps as they are, ``derived`` what the split (``_split_of``) gives, ``rule``
    the documented rules without any split."""
    from batchmon.protocol import Step, with_saved_split

    rows: list[dict[str, Any]] = []
    for r in doc.get("results", []):
        if "observed_steps" not in r:
            rows.append({"arch": r["arch"], "skipped": "no recorded observation (an older run)"})
            continue
        steps = with_inactive_split([Step.from_dict(d) for d in r["observed_steps"]], r)
        split, source = _split_of(r, splits)
        model = fit(steps, optimizer=r.get("optimizer"), amp=bool(r.get("amp")))
        derived_model = fit(steps, optimizer=r.get("optimizer"), amp=bool(r.get("amp")), saved_split=split) \
            if split is not None else None
        rule_model = fit([with_saved_split(s, None) for s in steps], optimizer=r.get("optimizer"),
                         amp=bool(r.get("amp")))
        if model is None:
            rows.append({"arch": r["arch"], "skipped": "no usable step"})
            continue
        device_total = doc["emulated_device_memory"] + model.context
        real = exact_boundary(r.get("trials", [])) or r["real_max_batch"]
        p = model.predict(device_total=device_total)
        pred = p.max_batch or 0
        row: dict[str, Any] = {"arch": r["arch"], "predicted": pred, "recorded": r["predicted_max_batch"],
                               "split_source": source,
                               "real": real, "ratio": pred / real if real else None, "what_ifs": [],
                               "fit": fit_label(model, p.basis_fields),
                               "step_peaks_only": step_peaks_only_max(steps, r.get("optimizer"), bool(r.get("amp")),
                                                                      device_total),
                               "per_phase": per_phase_max(steps, r.get("optimizer"), bool(r.get("amp")),
                                                          device_total),
                               "overhead": _overhead(model, r, real, doc["emulated_device_memory"])}
        for w in r.get("what_ifs", []):
            if "spec" not in w or not w.get("real_max_batch"):
                continue
            spec = WhatIf(amp=w["spec"]["amp"], checkpointing=w["spec"]["checkpointing"],
                          checkpoint_layers=w["spec"]["checkpoint_layers"])
            wpred = model.max_batch(device_total, spec) or 0
            wreal = exact_boundary(w.get("trial_log", [])) or w["real_max_batch"]
            derived = derived_model.max_batch(device_total, spec) if derived_model is not None else None
            row["what_ifs"].append({"what_if": w["what_if"], "predicted": wpred, "recorded": w["predicted_max_batch"],
                                    "real": wreal, "ratio": wpred / wreal, "derived": derived,
                                    "rule": rule_model.max_batch(device_total, spec) if rule_model else None,
                                    "peaks": _whatif_peaks(derived_model or model, spec, w, device_total)})
        rows.append(row)
    return rows


def _whatif_peaks(model: Any, spec: Any, w: dict[str, Any], device_total: int) -> list[tuple[int, int, int]]:
    """(batch, predicted peak, measured peak) at each batch the what-if ran at for real."""
    out = []
    for t in w.get("trial_log", []):
        if t["ok"] and t.get("peak_allocated"):
            p = model.predict(replace(spec, batch_size=t["batch"]), device_total=device_total)
            out.append((t["batch"], p.peak_allocated, t["peak_allocated"]))
    return out


def _overhead(model: Any, r: dict[str, Any], real: int, cap: int) -> dict[str, Any]:
    """What the margin must cover, for deriving it: the model's cache + margin at the real largest batch against
    what the allocator really held above its peak there (reserved - peak, from a clean allocator) and its
    inactive split bytes (free space inside live segments, which a retry cannot release); and what the run had
    to spare (the cap - the measured peak)."""
    at = next((t for t in r.get("trials", []) if t["ok"] and t["batch"] == real), None)
    central = model.predict(WhatIf(batch_size=real), device_total=cap + model.context)
    cache = central.components["cache"]  # the allocator's cache the model predicts there (on this device)
    out: dict[str, Any] = {"model_cache": cache, "model_margin": central.margin,
                           "model_overhead": cache + central.margin}
    if at and at.get("peak_allocated") is not None:
        out["spare_at_real"] = cap - at["peak_allocated"]
        if at.get("reserved") is not None:
            out["real_cache_at_real"] = at["reserved"] - at["peak_allocated"]
        out["inactive_split_at_real"] = at.get("inactive_split_peak")
    observed = [a.get("inactive_split_peak") for a in r.get("observed_allocator") or [] if a]
    out["observed_inactive_split"] = max((v for v in observed if v is not None), default=None)
    return out


def merge(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """One results document from several device calls: the first's header, every call's results in order,
    ``runs`` naming each call's architectures and seconds. Refuses calls on another device or emulation."""
    first = docs[0]
    for d in docs[1:]:
        if (d["device"], d["emulated_device_memory"]) != (first["device"], first["emulated_device_memory"]):
            raise SystemExit("predict_zoo: --merge needs results from the same device and emulated size")
    merged = {k: v for k, v in first.items() if k not in ("results", "seconds", "runs")}
    merged["runs"] = [{"archs": [r["arch"] for r in d["results"]], "seconds": d.get("seconds")} for d in docs]
    merged["seconds"] = round(sum(d.get("seconds") or 0 for d in docs), 1)
    merged["results"] = [r for d in docs for r in d["results"]]
    merged["note"] = f"{len(docs)} device calls of bench/predict_zoo.py --arch ..., same code, same emulated device"
    return merged


def reevaluation_text(rows: list[dict[str, Any]]) -> tuple[str, bool]:
    """The re-evaluation as a table, and whether every prediction is at or below the real largest batch."""
    lines = ["| arch | predicted now (recorded) | real | pred/real | peak fitted | per phase (backward not split) | "
             "one line through the steps' peaks |", "|---|---:|---:|---:|---|---:|---:|"]
    safe = True
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['arch']} | {row['skipped']} | | | | | |")
            continue
        for name, x in [(row["arch"], row), *((f"{row['arch']}: {w['what_if']}", w) for w in row["what_ifs"])]:
            above = x["real"] is not None and x["predicted"] > x["real"]
            safe = safe and not above
            ratio = "-" if x["ratio"] is None else f"{x['ratio']:.3f}"
            derived = x.get("derived")
            note = "" if derived is None else f"; derived from the split ({row['split_source']}): {derived}" + (
                " **above real**" if x["real"] is not None and derived > x["real"] else "")
            if x is not row:
                safe = safe and (derived is None or derived <= x["real"])
                note += f"; rule: {x.get('rule')}"
                errors = [100 * (p / m - 1) for _, p, m in x.get("peaks", [])]
                if errors:
                    note += f"; peak error {min(errors):+.2f}..{max(errors):+.2f}%"
            fitted, single = (row["fit"], row["step_peaks_only"]) if x is row else ("", "")
            phase = ("-" if row["per_phase"] is None else row["per_phase"]) if x is row else ""
            lines.append(f"| {name} | {x['predicted']} ({x['recorded']}) | {x['real']} | "
                         f"{ratio}{' **above**' if above else ''}{note} | {fitted} | {phase} | {single} |")
    mib = 2**20

    def m(v: Any) -> str:
        return "-" if v is None else f"{v / mib:.0f}"

    lines += ["", "margin: what the model keeps above the peak at the real largest batch vs what the allocator held "
                  "(MiB)", "", "| arch | model cache | model margin | model total | real reserved - peak | "
                  "inactive split there | spare below the cap | inactive split observed |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        o = row.get("overhead")
        if o:
            lines.append(f"| {row['arch']} | {m(o['model_cache'])} | {m(o['model_margin'])} | "
                         f"{m(o['model_overhead'])} | {m(o.get('real_cache_at_real'))} | "
                         f"{m(o.get('inactive_split_at_real'))} | {m(o.get('spare_at_real'))} | "
                         f"{m(o.get('observed_inactive_split'))} |")
    return "\n".join(lines) + "\n", safe


# ----------------------------------------------------------------------------------------------- report


def _fitted(r: dict[str, Any]) -> str:
    """The README table's 'peak fitted' cell of a zoo result."""
    if r.get("deciding_segment"):
        return f"per segment, {r['deciding_segment']} decides"
    if r.get("deciding_phase"):
        return f"per phase, {r['deciding_phase']} decides"
    return "one line"


def markdown(doc: dict[str, Any]) -> str:
    """The README table: one row per architecture, then one per what-if."""
    lines = [f"Device: {doc['device']}, emulated {doc['emulated_device_memory'] / GIB:.0f} GiB "
             f"({doc['emulation']}); torch {doc['torch']}; {doc['seconds']} s.", "",
             "| arch | observed | peak error mean % | worst % | predicted largest batch | real | pred/real | "
             "OOM at prediction | conservative | peak fitted |", "|---|---|---:|---:|---:|---:|---:|---|---|---|"]

    def f(x: float | None, spec: str = ".2f") -> str:
        return "-" if x is None else format(x, spec)

    for r in doc["results"]:
        if r.get("skipped") or r.get("error"):
            lines.append(f"| {r['arch']} | {r.get('skipped') or r.get('error')} | | | | | | | | |")
            continue
        oom = {True: "no", False: "**yes**", None: "-"}[r.get("ok_at_predicted")]
        lines.append(f"| {r['arch']} | {', '.join(map(str, r['observed']))} | {f(r['mean_error_pct'])} | "
                     f"{f(r['worst_error_pct'])} | {r['predicted_max_batch']} | {r['real_max_batch']}"
                     f"{'' if r.get('exact', True) else ' (±1%)'} | {f(r['max_batch_ratio'], '.3f')} | {oom} | "
                     f"{'yes' if r.get('conservative') else 'no'} | "
                     f"{_fitted(r)} |")
    whatifs = [(r["arch"], w) for r in doc["results"] for w in r.get("what_ifs", []) if "skipped" not in w]
    if whatifs:
        lines += ["", "| what-if (from the observed run) | predicted largest batch | from | real | pred/real | "
                      "OOM at prediction | the rule's (no split) | step time vs plain |",
                  "|---|---:|---|---:|---:|---|---:|---:|"]
        for arch, w in whatifs:
            oom = {True: "no", False: "**yes**", None: "-"}[w.get("ok_at_predicted")]
            factor = (w.get("timing") or {}).get("factor")
            if "predicted_max_batch_rule" in w:  # since the agent measures the split
                source = "the agent's split" if w.get("derived") else "rule"
                rule = w.get("predicted_max_batch_rule")
            else:  # older runs: the rule predicted, the bench's split a side figure
                source, rule = "rule", w.get("predicted_max_batch")
            above = w.get("real_max_batch") is not None and (w.get("predicted_max_batch") or 0) > w["real_max_batch"]
            lines.append(f"| {arch}: {w['what_if']} | {w['predicted_max_batch']}{' **above real**' if above else ''} | "
                         f"{source} | {w['real_max_batch']} | {f(w.get('ratio'), '.3f')} | {oom} | "
                         f"{'-' if rule is None else rule} | {f(factor, '.2f')} |")
    return "\n".join(lines) + "\n"
