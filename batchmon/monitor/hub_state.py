"""The hub's pure state: hub input records in, immutable Snapshots out. No threads, no sockets, no clocks.

Live monitoring and replay feed the very same records through ``HubState.ingest``, so a recording replays to
exactly what the monitor showed. A record is one dict (batchmon.records: its shape and
constructors). ``ingest`` never raises: anything malformed becomes a counted Warning.

A run that ends (its agent said bye, or went away without one) leaves the live agents for the box's ended runs:
the last ENDED_LIMIT, newest first, each with its final summary (snapshot.RunEnd) and, after an out-of-memory
error, its post-mortem (batchmon.postmortem), until a ``clear_ended`` record clears them (a replay's carries
``before``: only the runs ended by then).

Over 400 lines: ingest, an agent's life (hello, steps, events, its end) and the snapshot's cached views are one
state machine over the same per-agent records; the rules of a run's end and of its OOM report are in run_ends.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

from batchmon import protocol
from batchmon.postmortem import OomReport
from batchmon.records import LOCAL
from batchmon.monitor import run_ends
from batchmon.monitor.step_history import StepHistory, summary_key
from batchmon.probes import host as host_probe
from batchmon.probes import nvml as nvml_probe
from batchmon.probes.host import HostSample
from batchmon.probes.nvml import NvmlSample
from batchmon.protocol import Bye, Event, Hello, ProtocolError, Step
from batchmon.snapshot import ENDED, ENDED_LIMIT, OOM, RUNNING, AgentView, RunEnd, Snapshot, Warning

HISTORY_LIMIT = 2000  # steps kept per agent (the agent sends >= 1000 on connect)
EVENTS_LIMIT = 200  # events kept per agent
WARNINGS_LIMIT = 100  # distinct warnings kept per source; more fold into one
AGENTS_LIMIT = 1024  # agents kept per source (a flood of fake keys must not grow memory forever)


def _short(text: Any, limit: int = 200) -> str:
    s = str(text).replace("\n", " ")
    return s if len(s) <= limit else s[: limit - 1] + "…"


PREDICT_EVERY_S = 1.0  # refit an agent at most this often (snapshot time, plus half an interval), unless its batch
# sizes change
PREDICT_STEADY_S = 120.0  # ... and, while no memory figure the model reads changed, at most this often (what moves
# meanwhile: the basis' step range and the step-time line, neither shown live; 16 steady jobs refitted every 5 s were
# ~half of the hub thread's work beside them, bench/ab_monitor.py --gpu-agents; every 30 s still ~0.9 ms a second of
# the hub thread beside 16 fast jobs, ~1.5 ms a refit for the same answer: bench/hub_state_steady.py, 30 -> 120 s took
# the snapshots 1.93 -> 0.80 ms/s on the dev box)
PREDICT_GROWTH_S = 5.0  # ... and, while its summary only grew by steps like those it held (fit.only_grew: a job's
# first ~65 windows, ~a minute beside a monitor at >= 1 s, when the summary is still the whole history), at most this
# often: each window changed the figures, and 16 fast jobs were all refitted every second of their first minute
# (the H200's fast16 rounds: the hub thread 0.64 s in the first 30 s round, 0.20 s in the later ones)
RECENT_FITS = 4  # fits kept per agent for figures that come back within PREDICT_STEADY_S (see _predict)



@dataclass(frozen=True)
class _RecentFit:
    """A fit of an agent's summary: what it read (fit_figures), when, and what it answered."""

    figures: tuple
    setup: tuple  # (device total, optimizer): the prediction key's part a fit depends on
    time: float
    sizes: frozenset
    prediction: Any
    model: Any


@dataclass
class _Agent:
    key: str
    source: str
    hello: Hello | None = None
    history: StepHistory = field(default_factory=lambda: StepHistory(HISTORY_LIMIT))
    events: deque = field(default_factory=lambda: deque(maxlen=EVENTS_LIMIT))
    events_added: int = 0  # events ever appended: changes exactly when ``events`` does
    events_tuple: tuple = ()  # ``events`` as a tuple, as of events_tuple_at events added
    events_tuple_at: int = 0
    connected: bool = True
    detached: bool = False
    invalid_lines: int = 0
    decode_memo: dict = field(default_factory=dict)  # protocol.decode_object's memo of this agent's messages
    burst_left: int | None = None  # lines of the history burst its hello announced still to come (None: not said)
    view: AgentView | None = None  # the last snapshot's view of this agent, reused while nothing changed
    view_key: tuple | None = None
    prediction_key: tuple | None = None
    prediction: Any = None
    model: Any = None  # the MemoryModel behind ``prediction``
    prediction_time: float | None = None  # snapshot time of the last fit
    prediction_sizes: frozenset = frozenset()  # batch sizes that fit saw
    prediction_figures: tuple | None = None  # the memory figures of the summary that fit read (fit_figures)
    prediction_checked: float | None = None  # snapshot time its figures were last found unchanged (or fitted)
    recent_fits: list = field(default_factory=list)  # _RecentFit, the latest first (at most RECENT_FITS)
    figures_memo: dict = field(default_factory=dict)  # fit_figures' per-step figures, kept between snapshots
    peak: int | None = None  # the highest allocator peak (or measured total off CUDA) of its steps
    ended: RunEnd | None = None  # set when the run ended (then it lives in _Source.ended)
    oom_event: Any = None  # its last oom Event
    oom: OomReport | None = None  # that event's post-mortem
    oom_waiting: bool = False  # the post-mortem still waits for NVML's first sample after the error
    returncode: int | None = None  # its exit status, when its launcher said it before the run's end was seen


@dataclass
class _Source:
    """Everything one host contributes: its probes, its agents, its warnings."""

    name: str
    nvml: NvmlSample | None = None
    host: HostSample | None = None
    agents: dict[str, _Agent] = field(default_factory=dict)
    warnings: dict[tuple[str, str], list] = field(default_factory=dict)  # (source, category) -> [count, detail]
    link: dict[str, Any] | None = None  # remote sources: the last link record's data (connected / lost)
    ever_connected: bool = False
    ended: deque = field(default_factory=lambda: deque(maxlen=ENDED_LIMIT))  # ended _Agents, oldest first
    oom_waiting: list = field(default_factory=list)  # _Agents whose post-mortem waits for an NVML sample


class HubState:
    """Merges probe samples and agent messages; builds immutable Snapshots on demand."""

    def __init__(self, *, history_limit: int = HISTORY_LIMIT, events_limit: int = EVENTS_LIMIT) -> None:
        self.history_limit = history_limit
        self.events_limit = events_limit
        self._sources: dict[str, _Source] = {LOCAL: _Source(LOCAL)}
        self.records = 0  # records ingested (for tests and status lines)
        self.meta: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------ ingest

    def ingest(self, record: Any) -> None:
        """Apply one hub input record. Never raises; a malformed record becomes a counted Warning."""
        self.records += 1
        try:
            self._ingest(record)
        except Exception as exc:  # noqa: BLE001 - by contract nothing escapes; the cause is shown as a warning
            src = record.get("source") if isinstance(record, dict) else None
            self.warn(src if isinstance(src, str) else LOCAL, "hub", "record rejected", f"{type(exc).__name__}: {exc}")

    def _ingest(self, record: Any) -> None:
        if not isinstance(record, dict):
            self.warn(LOCAL, "recording", "bad record", f"expected an object, got {type(record).__name__}")
            return
        kind = record.get("kind")
        source_name = record.get("source", LOCAL)
        if not isinstance(source_name, str) or not source_name:
            source_name = LOCAL
        if kind == "meta":
            self.meta = dict(record)
            return
        if kind == "tick":
            return
        if kind == "clear_ended":  # the user cleared the ended runs (`x`): every box's
            self._clear_ended(record.get("before"))
            return
        src = self._source(source_name)
        data = record.get("data")
        if kind == "nvml":
            try:
                sample = record.get("sample")  # the hub's own probe object, when nothing records (see Hub)
                if type(sample) is not NvmlSample:
                    sample = nvml_probe.sample_from_dict(data)
            except Exception as exc:  # noqa: BLE001
                self.warn(source_name, "nvml", "bad NVML sample", f"{type(exc).__name__}: {exc}")
            else:
                self._warn_lost_gpus(src, sample)
                src.nvml = sample
                if src.oom_waiting:
                    self._oom_device_figures(src, sample)
        elif kind == "host":
            try:
                sample = record.get("sample")
                src.host = sample if type(sample) is HostSample else host_probe.sample_from_dict(data)
            except Exception as exc:  # noqa: BLE001
                self.warn(source_name, "host", "bad host sample", f"{type(exc).__name__}: {exc}")
        elif kind == "link":
            self._link(src, data)
        elif kind == "warning":
            d = data if isinstance(data, dict) else {}
            detail = d.get("detail")
            self.warn(source_name, _short(d.get("source", "hub"), 64), _short(d.get("message", data), 300),
                      None if detail is None else _short(detail))
        elif kind == "agent_exit":
            self._exit(src, record.get("key"), data)
        elif kind in ("agent", "agent_eof", "agent_gone"):
            key = record.get("key")
            if not isinstance(key, str) or not key:
                self.warn(source_name, "recording", "agent record without key", None)
                return
            if kind != "agent":  # only for an agent still running: a run that said bye has already ended
                running = src.agents.get(key)
                if running is not None and kind == "agent_eof":
                    running.connected = False
                elif running is not None:
                    if running.hello is None:
                        src.agents.pop(key, None)
                    else:
                        why = data.get("why") if isinstance(data, dict) else None
                        how, text = run_ends.GONE_TEXT.get(why, run_ends.GONE_TEXT[None])
                        self._end(src, running, how, text, _time(record.get("t")))
                return
            agent = self._agent(src, key)
            if agent is None:
                return
            self._agent_message(src, agent, data, record.get("error"), _time(record.get("t")))
        # unknown kinds: ignored, like unknown protocol types (forward compatibility)

    def _warn_lost_gpus(self, src: _Source, sample: NvmlSample) -> None:
        """A GPU that turns lost is a counted Warning (once per turn, not once per sample): the device row
        says "lost" only while it is on screen, the warning list keeps it and how often it happened."""
        before = {d.index: d.lost for d in src.nvml.devices} if src.nvml is not None else {}
        for dev in sample.devices:
            if dev.lost and not before.get(dev.index, False):
                name = f"GPU {dev.index}" + (f" ({dev.name})" if dev.name else "")
                self.warn(src.name, "nvml", f"{name} lost", _short(dev.error) if dev.error else None)

    def _link(self, src: _Source, data: Any) -> None:
        """A remote connection came up or went down. Up: the new stream resends every agent's hello and
        history, so the old agent list is dropped (agents that ended during the outage do not linger).
        Down: the agents are kept but shown as disconnected."""
        if not isinstance(data, dict) or data.get("state") not in ("connected", "lost"):
            self.warn(LOCAL, src.name, "bad link record", _short(data))  # shown even before the host has data
            return
        src.link = dict(data)
        if data["state"] == "connected":
            src.ever_connected = True
            src.agents.clear()
        else:
            for agent in src.agents.values():
                agent.connected = False

    def link_warnings(self) -> tuple[Warning, ...]:
        """One Warning per remote source whose connection is down: "connection lost, retrying in Ns"."""
        out = []
        for name, src in self._sources.items():
            if name == LOCAL or src.link is None or src.link.get("state") != "lost":
                continue
            retry = src.link.get("retry_in")
            what = "connection lost" if src.ever_connected else "cannot connect"
            text = what if not isinstance(retry, (int, float)) else f"{what}, retrying in {retry:g}s"
            detail = src.link.get("message")
            if detail:
                text += f" ({_short(detail)})"
            out.append(Warning(source=name, message=text))
        return tuple(out)

    def add_source(self, name: str) -> None:
        """Reserve a remote source's place, so remote hosts are shown in the order given (not of first data)."""
        self._source(name)

    def _source(self, name: str) -> _Source:
        src = self._sources.get(name)
        if src is None:
            src = self._sources[name] = _Source(name)
        return src

    def _agent(self, src: _Source, key: str) -> _Agent | None:
        agent = src.agents.get(key)
        if agent is None:
            if len(src.agents) >= AGENTS_LIMIT:
                self.warn(src.name, "hub", "too many agents; ignoring new ones", key)
                return None
            agent = src.agents[key] = _Agent(key, src.name)
            agent.history = StepHistory(self.history_limit)
            agent.events = deque(maxlen=self.events_limit)
        return agent

    def _agent_message(self, src: _Source, agent: _Agent, data: Any, error: Any, t: float) -> None:
        agent.connected = True
        if agent.burst_left:
            agent.burst_left -= 1  # counted before decoding: an invalid line of the burst is still one of it
        if data is None:
            self._invalid(src, agent, error or "line is not JSON")
            return
        try:
            msg = protocol.decode_object(data, agent.decode_memo)
        except ProtocolError as exc:
            self._invalid(src, agent, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - a parser bug must not take the monitor down
            self._invalid(src, agent, f"{type(exc).__name__}: {exc}")
            return
        if isinstance(msg, Hello):
            agent.hello = msg
            agent.detached = False
            agent.burst_left = msg.history
        elif isinstance(msg, Step):
            last = agent.history.last
            # A reconnect resends the agent's history: keep each step once.
            if last is not None and msg.step <= last.step and msg.time <= last.time:
                return
            agent.history.append(msg)
            peak = msg.peak_allocated if msg.peak_allocated is not None else sum(msg.components.values())
            agent.peak = peak if agent.peak is None else max(agent.peak, peak)
        elif isinstance(msg, Event):
            agent.events.append(msg)
            agent.events_added += 1
            if msg.kind == "oom":
                self._oom(src, agent, msg)
        elif isinstance(msg, Bye):
            agent.detached = True
            if agent.hello is not None:
                how, text = run_ends.bye_text(msg)
                self._end(src, agent, how, text, msg.time if msg.time is not None else t, bye=msg)
        # None: a valid object of an unknown type, ignored by design

    # ------------------------------------------------------------------------------------------ ended runs

    def _end(self, src: _Source, agent: _Agent, how: str, text: str, t: float, bye: Bye | None = None) -> None:
        """The run ended: it leaves the live agents for the box's ended runs, with its final summary."""
        agent.ended = run_ends.run_end(agent.history.last, agent.oom_event, agent.oom, agent.peak, how, text, t, bye)
        if agent.returncode is not None:
            agent.ended = run_ends.with_returncode(agent.ended, agent.returncode)
        if src.agents.get(agent.key) is agent:
            del src.agents[agent.key]
        for old in [a for a in src.ended if a.key == agent.key and a.hello == agent.hello]:
            src.ended.remove(old)  # the same run again (a remote box's stream resent it): kept once
        src.ended.append(agent)

    def _clear_ended(self, before: Any) -> None:
        """Forget the ended runs; with ``before`` (a replay's `x`: the recorded time shown when it was pressed),
        only those that had ended by then, so a run that ends after that moment still shows its end."""
        if not isinstance(before, (int, float)) or isinstance(before, bool) or before != before:
            before = None
        for each in self._sources.values():
            if before is None:
                each.ended.clear()
                continue
            kept = [a for a in each.ended if a.ended is not None and a.ended.time > before]
            each.ended.clear()
            each.ended.extend(kept)

    def _exit(self, src: _Source, key: Any, data: Any) -> None:
        """The launcher's exit status for a process: the run's summary says it (the latest run of that key)."""
        code = data.get("returncode") if isinstance(data, dict) else None
        if not isinstance(key, str) or not isinstance(code, int) or isinstance(code, bool) or not -256 < code < 256:
            self.warn(src.name, "recording", "bad agent_exit record", _short(data))
            return
        running = src.agents.get(key)
        if running is not None:
            running.returncode = code  # its end (EOF, gone) comes next
            return
        ended = next((a for a in reversed(src.ended) if a.key == key), None)
        if ended is not None and ended.ended is not None and ended.ended.exit_code is None \
                and ended.ended.signal is None:
            ended.ended = run_ends.with_returncode(ended.ended, code)

    def _oom(self, src: _Source, agent: _Agent, event: Event) -> None:
        """An out-of-memory error: its post-mortem now, completed by NVML's next sample of the device."""
        agent.oom_event = event
        again = run_ends.same_oom_again(agent.oom, event)
        if again is not None:
            agent.oom = again  # an OOM-catching loop: the advice of a moment ago
            return
        agent.oom = self._oom_report(src, agent, event)
        if not agent.oom_waiting:
            agent.oom_waiting = True
            src.oom_waiting.append(agent)

    def _oom_report(self, src: _Source, agent: _Agent, event: Event, device_used: int | None = None,
                    device_free: int | None = None) -> OomReport | None:
        try:
            return run_ends.report(event, agent.hello, agent.history, agent.model, src.nvml, device_used, device_free)
        except Exception as exc:  # noqa: BLE001 - a post-mortem bug costs the post-mortem, never the monitor
            self.warn(src.name, "post-mortem", "OOM post-mortem failed", f"{type(exc).__name__}: {_short(exc)}")
            return None

    def _oom_device_figures(self, src: _Source, sample: NvmlSample) -> None:
        """NVML's first sample after an OOM: the process's figure and the device's free bytes at that moment."""
        for agent in list(src.oom_waiting):
            event = agent.oom_event
            if event is None or agent.hello is None or not sample.available:
                continue
            if event.time is not None and sample.time < event.time:
                continue  # taken before the error
            src.oom_waiting.remove(agent)
            agent.oom_waiting = False
            figures = run_ends.process_figures(agent.hello, sample)
            if figures is not None:  # else the process was already gone from the device
                report = self._oom_report(src, agent, event, *figures)
                if report is not None:
                    agent.oom = report

    def _invalid(self, src: _Source, agent: _Agent, reason: str) -> None:
        agent.invalid_lines += 1
        self.warn(src.name, f"agent {agent.key}", "invalid lines dropped", _short(reason))

    def warn(self, source: str, origin: str, category: str, detail: str | None) -> None:
        """Count one occurrence of a problem; the snapshot shows each (origin, category) once with its count."""
        src = self._source(source)
        key = (origin, category)
        entry = src.warnings.get(key)
        if entry is None:
            if len(src.warnings) >= WARNINGS_LIMIT:
                key = ("hub", "more distinct warnings than shown")
                entry = src.warnings.setdefault(key, [0, None])
            else:
                entry = src.warnings[key] = [0, None]
        entry[0] += 1
        if detail is not None:
            entry[1] = detail

    # ------------------------------------------------------------------------------------------ queries

    def agent_pids(self, source: str = LOCAL) -> list[int]:
        """Pids of the agents of one source that said hello (for the host probe)."""
        src = self._sources.get(source)
        return [] if src is None else [a.hello.pid for a in src.agents.values() if a.hello is not None]

    def history_received(self, key: str, source: str = LOCAL) -> bool | None:
        """Whether an agent's announced history burst has all arrived: None when it said hello without
        announcing one (an older agent: wait for quiet instead), False before its hello."""
        src = self._sources.get(source)
        agent = src.agents.get(key) if src else None
        if agent is None and src is not None and any(a.key == key for a in src.ended):
            return True  # it said bye: nothing follows
        if agent is None or agent.hello is None:
            return False
        return None if agent.burst_left is None else agent.burst_left <= 0

    def agent_keys(self, source: str = LOCAL) -> list[str]:
        src = self._sources.get(source)
        return [] if src is None else list(src.agents)

    # ------------------------------------------------------------------------------------------ snapshot

    def snapshot(self, now: float, interval: float = 1.0, *, kind: str = "live") -> Snapshot:
        """An immutable view of the state now: tuples only, nothing the state will mutate later."""
        # A remote snapshot's ``source`` is the host as given to --host, so every front end can name it.
        remote = tuple(
            self._source_snapshot(src, now, interval, name)
            for name, src in self._sources.items()
            if name != LOCAL and (src.nvml is not None or src.host is not None or src.agents)
        )
        local = self._source_snapshot(self._sources[LOCAL], now, interval, kind)
        links = self.link_warnings()
        if links:
            local = replace(local, warnings=local.warnings + links)
        return replace(local, remote=remote) if remote else local

    def _source_snapshot(self, src: _Source, now: float, interval: float, kind: str) -> Snapshot:
        nvml = src.nvml or NvmlSample(available=False, error="no NVML sample yet", driver=None, time=now)
        host = src.host or HostSample(hostname=src.name if src.name != LOCAL else "", memory_total=None,
                                      memory_used=None, processes={}, time=now)
        agents = [a for a in src.agents.values() if a.hello is not None]
        base = Snapshot(time=now, host=host, nvml=nvml, agents=(), interval=interval, source=kind)
        views = [self._view(src, a, base) for a in agents]
        views.sort(key=lambda v: (v.hello.host, v.job, v.hello.rank, v.hello.pid, v.key))
        ended = [self._view(src, a, base) for a in reversed(src.ended)]  # newest first
        ended.sort(key=lambda v: -v.ended.time if v.ended is not None else 0.0)
        views += ended
        warnings = tuple(
            Warning(source=origin, message=f"{category}: {detail}" if detail else category, count=count)
            for (origin, category), (count, detail) in src.warnings.items()
        )
        return replace(base, agents=tuple(views), warnings=warnings)

    def _view(self, src: _Source, agent: _Agent, base: Snapshot) -> AgentView:
        """An agent's AgentView, reused from the previous snapshot while nothing it shows has changed.

        64 agents at 10 steps/s and 4 snapshots a second: building every view (and copying every history) for
        every snapshot was most of the hub's work; now an unchanged agent costs a tuple comparison."""
        history = agent.history
        if agent.events_tuple_at != agent.events_added:
            agent.events_tuple, agent.events_tuple_at = tuple(agent.events), agent.events_added
        view = agent.view
        assert agent.hello is not None  # only agents that said hello are shown
        end = agent.ended
        state = RUNNING if end is None else OOM if end.how == "oom" else ENDED
        if view is None or view.hello is not agent.hello or agent.view_key != (history.appended, agent.events_added):
            view = AgentView(key=agent.key, source=agent.source, hello=agent.hello, last_step=history.last,
                             history=history.window(), events=agent.events_tuple, connected=agent.connected,
                             detached=agent.detached, invalid_lines=agent.invalid_lines, state=state, ended=end,
                             oom=agent.oom, phases=history.phases(), prediction=agent.prediction, model=agent.model)
            # (the last prediction: while _predict below keeps it, no second AgentView is made for it)
        elif ((view.connected, view.detached, view.invalid_lines, view.state) != (agent.connected, agent.detached,
                                                                                  agent.invalid_lines, state)
              or view.ended is not end or view.oom is not agent.oom):
            view = replace(view, connected=agent.connected, detached=agent.detached,
                           invalid_lines=agent.invalid_lines, state=state, ended=end, oom=agent.oom)
        prediction = self._predict(src, agent, view, base)
        if prediction is not view.prediction:
            view = replace(view, prediction=prediction, model=agent.model)
        agent.view, agent.view_key = view, (history.appended, agent.events_added)
        return view

    def _predict(self, src: _Source, agent: _Agent, view: AgentView, base: Snapshot) -> Any:
        """The memory model's prediction for one agent.

        Fitting costs time linear in the steps it reads, and a hub with 64 agents at 10 steps/s builds 4
        snapshots a second: refitting every agent's whole history each time fell behind (bench/load.py). So an
        agent is refitted at most every PREDICT_EVERY_S of snapshot time, at once when a new batch size or a new
        device size appears, and on a bounded summary of its history (step_history.model_steps, kept up to date on every
        append by StepHistory). In steady training the summary's memory figures stay the same step after step and a
        refit gives the same answer (a fit and a prediction cost ~1.7 ms: a sixth of the monitor's CPU beside one
        job at one refit a second), so while they are unchanged it is refitted only every PREDICT_STEADY_S (its
        basis names the step range it read, its step-time line the step times)."""
        history = agent.history
        last = history.last
        if last is None:
            return None
        device = base.device_of(view)
        device_total = device.memory.total if device is not None and device.memory is not None else None
        key = (len(history), last.step, last.time, device_total, view.hello.optimizer)
        if agent.prediction_key == key:
            return agent.prediction
        same_setup = agent.prediction_key is not None and agent.prediction_key[3:] == key[3:]
        # fitted, or its figures found unchanged, within PREDICT_EVERY_S: at --interval 0.25 comparing 64 agents'
        # summaries every snapshot was a good part of a tick (the latency's tail waits on it)
        # (half an interval of slack: snapshots come about an interval apart, so at --interval 1 the one a second
        # later is 0.999 or 1.001 s on, and a bare "< 1 s" checked at nearly every snapshot; now every second one)
        checked = agent.prediction_checked if agent.prediction_checked is not None else agent.prediction_time
        recent = checked is not None and 0 <= base.time - checked < PREDICT_EVERY_S + base.interval / 2
        if same_setup and recent and last.batch_size in agent.prediction_sizes:
            return agent.prediction
        summary = history.window().model_steps()
        from batchmon.memory_model.fit import fit_figures, only_grew  # (imported when first needed, as below)

        # read through the steps the summary's KeptSteps share their fields with (summary_key): the same figures,
        # and fit_figures' memo then knows every step of a steady summary (a new KeptStep each window missed it)
        figures = fit_figures(summary_key(summary), agent.figures_memo)
        if same_setup and agent.prediction is not None and last.batch_size in agent.prediction_sizes \
                and agent.prediction_time is not None and 0 <= base.time - agent.prediction_time < PREDICT_GROWTH_S \
                and only_grew(agent.prediction_figures, figures):
            agent.prediction_key, agent.prediction_checked = key, base.time  # (the fit's figures kept: growth
            return agent.prediction  # is measured from them)
        steady = agent.prediction_time is not None and 0 <= base.time - agent.prediction_time < PREDICT_STEADY_S
        if same_setup and steady and figures == agent.prediction_figures and last.batch_size in agent.prediction_sizes:
            agent.prediction_key, agent.prediction_checked = key, base.time
            return agent.prediction
        # The same figures as a fit made within PREDICT_STEADY_S: its answer, as for figures that did not change.
        # A real fast agent's summary moves back and forth between two: its sampled steps' forward own peak is
        # one of two values, and the summary's recent steps hold the larger at some seconds and not at others
        # (bench/results/fast16_rec_h200_run1: 16 jobs refitted 81 times in 60 s, mostly to the same answer).
        setup = key[3:]
        for fit in agent.recent_fits:
            if (fit.setup == setup and 0 <= base.time - fit.time < PREDICT_STEADY_S and fit.figures == figures
                    and last.batch_size in fit.sizes):
                agent.prediction_key, agent.prediction_checked = key, base.time
                agent.prediction_time, agent.prediction_figures, agent.prediction_sizes = fit.time, figures, fit.sizes
                agent.prediction, agent.model = fit.prediction, fit.model
                return agent.prediction
        agent.prediction_key, agent.prediction_time, agent.prediction_figures = key, base.time, figures
        agent.prediction_checked = base.time
        agent.prediction_sizes = history.batch_sizes()
        before = agent.model
        agent.prediction = agent.model = None
        try:
            from batchmon import memory_model

            model = memory_model.fit(summary, optimizer=view.hello.optimizer)
            if model is not None:
                # a steady refit is the model before with a later basis: its largest-batch searches are that
                # model's (MemoryModel.share_searches; ~0.9 of a refit's ~1.9 ms beside 16 fast jobs)
                model.share_searches(before)
                agent.prediction = model.predict(memory_model.WhatIf(), device_total=device_total)
                agent.model = model
        except Exception as exc:  # noqa: BLE001 - a model bug costs the prediction, never the monitor
            self.warn(src.name, "memory model", "prediction failed", f"{type(exc).__name__}: {_short(exc)}")
        fits = [f for f in agent.recent_fits if f.figures != figures][:RECENT_FITS - 1]
        agent.recent_fits = [_RecentFit(figures, setup, base.time, agent.prediction_sizes, agent.prediction,
                                        agent.model), *fits]
        return agent.prediction



def _time(value: Any) -> float:
    """A record's time (its ``t``), 0.0 when it has none that makes sense."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value else 0.0
