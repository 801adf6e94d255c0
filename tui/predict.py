"""The UI's view of the memory model: predict what-ifs and chart points, never raise.

A snapshot from the hub carries the model the hub fitted for its own prediction (AgentView.model): the UI asks
that one, so the TUI agrees with `--once` and a refresh fits nothing. Without one (views built elsewhere) it
fits, once per new step, the history's bounded summary that the hub's StepWindow carries (first step, highest
peak per batch size, last steps), or a hand-built view's few steps as they are. Predictions are cached per
model and what-if, so a refresh with nothing new costs nothing.
"""

from __future__ import annotations

from collections import OrderedDict
from itertools import islice
from typing import Any

from batchmon import memory_model
from batchmon.memory_model import Prediction, WhatIf
from batchmon.protocol import Step, step_components
from batchmon.snapshot import AgentView


def measured_components(step: Step) -> dict[str, int]:
    """The last step's eight components, as --once and the exporter give them (protocol.step_components: cache
    at the step's peak, so the eight sum to the device figure), a missing figure as 0."""
    return {name: value or 0 for name, value in step_components(step).items()}


_TOTALS: dict[int, tuple[Step, int]] = {}
_TOTALS_MAX = 4096  # 16 jobs x ~70 fitted steps a refresh, new ones each second; each entry keeps its step alive


def measured_total(step: Step) -> int:
    """The eight components' sum, kept per step (steps never change): each refresh asks it again for every step
    the model was fitted on, for every job's chart points (16 jobs: ~1000 a second, the same steps mostly)."""
    hit = _TOTALS.get(id(step))
    if hit is not None and hit[0] is step:
        return hit[1]
    total = sum(measured_components(step).values())
    if len(_TOTALS) >= _TOTALS_MAX:  # bounded: it holds the steps it names (their ids stay theirs meanwhile);
        for key in list(islice(_TOTALS, _TOTALS_MAX // 4)):  # the oldest quarter goes, not the steps in use now
            del _TOTALS[key]
    _TOTALS[id(step)] = (step, total)
    return total


def fit_steps(agent: AgentView) -> list[Step]:
    """The steps the model is fitted on: the history's bounded summary (the hub's StepWindow carries it), else
    the steps of a view built by hand (a test's few steps: the summary of a short history is all of it)."""
    history = agent.history
    if not history:
        return [agent.last_step] if agent.last_step is not None else []
    summary = getattr(history, "model_steps", None)
    return summary() if callable(summary) else list(history)


class Predictor:
    """The hub's fitted model where the snapshot carries one, else one fit per (agent key, last step), cached;
    answers predictions without raising."""

    def __init__(self, max_models: int = 64) -> None:
        self._models: OrderedDict[tuple[str, int, int], Any] = OrderedDict()
        # agent key -> (its current model, that model's answers by (what-if, device total)): a refit drops the
        # answers of the model before it (kept 4096 at a time, they held every refit's model alive for hours)
        self._predictions: OrderedDict[str, tuple[Any, dict[tuple, Prediction | None]]] = OrderedDict()
        self._max = max_models
        self.errors: dict[str, str] = {}

    def _model(self, agent: AgentView) -> Any:
        step = agent.last_step
        if step is None:
            return None
        if agent.model is not None:  # the hub fitted these steps already: its model, not a second fit
            self.errors.pop(agent.key, None)
            return agent.model
        key = (agent.key, step.step, len(agent.history))
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        try:
            model = memory_model.fit(fit_steps(agent), optimizer=agent.hello.optimizer)
            self.errors.pop(agent.key, None)
        except Exception as exc:  # noqa: BLE001 - a model bug must not take the monitor down
            model = None
            self.errors[agent.key] = f"memory model failed: {type(exc).__name__}: {exc}"
        self._models[key] = model
        while len(self._models) > self._max:
            self._models.popitem(last=False)
        return model

    def predict(self, agent: AgentView, what_if: WhatIf, device_total: int | None) -> Prediction | None:
        """The predicted breakdown under ``what_if``; the hub's own prediction when the model can't fit."""
        model = self._model(agent)
        if model is None:
            if what_if == WhatIf(batch_size=what_if.batch_size) and agent.prediction is not None and (
                what_if.batch_size in (None, agent.prediction.batch_size)
            ):
                return agent.prediction
            return None
        # one model answers one what-if one way (the hub may refit the same steps later: another model)
        entry = self._predictions.get(agent.key)
        if entry is None or entry[0] is not model:
            entry = self._predictions[agent.key] = (model, {})
            self._predictions.move_to_end(agent.key)
            while len(self._predictions) > self._max:
                self._predictions.popitem(last=False)
        answers = entry[1]
        key = (what_if, device_total)
        if key in answers:
            return answers[key]
        try:
            pred = model.predict(what_if, device_total=device_total)
        except Exception as exc:  # noqa: BLE001
            pred = None
            self.errors[agent.key] = f"prediction failed: {type(exc).__name__}: {exc}"
        if len(answers) >= 4096:  # a chart's curve is ~100 batch sizes a what-if: many what-ifs, one model
            answers.clear()
        answers[key] = pred
        return pred

    def total(self, agent: AgentView, what_if: WhatIf, device_total: int | None) -> int | None:
        pred = self.predict(agent, what_if, device_total)
        return pred.total if pred is not None else None
