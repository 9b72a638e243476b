"""Ranking solvers by the problem's own evaluation (`bench.metric`), never by a solver's
internal loss, and timing each to a common target."""

import math
from typing import Any

from ._runner import EVAL_PREFIX, Trace


TARGET_FRACTION = 0.99
"""The target is this fraction of the largest gain over the start any solver reached."""


def _score(value: float, maximize: bool) -> float:
    """Lower is better; NaN (not evaluated, or a non-finite run) ranks last."""
    if value is None or not math.isfinite(value):
        return math.inf
    return -value if maximize else value


def target(
    traces: list[Trace], metric: str, maximize: bool, start: float
) -> float | None:
    """The metric value that counts as reached: `start` moved by `TARGET_FRACTION` of
    the way to the best value seen at any evaluated point of any run; `None` when no
    run improved on `start`."""
    scores = [
        _score(row[EVAL_PREFIX + metric], maximize)
        for trace in traces
        for row in trace.evaluated(metric)
    ]
    best, origin = min(scores, default=math.inf), _score(start, maximize)
    if not best < origin:
        return None
    goal = origin + TARGET_FRACTION * (best - origin)
    return -goal if maximize else goal


def first_reaching(trace: Trace, metric: str, maximize: bool, goal: float | None):
    """The first evaluated row of `trace` at or beyond `goal`, or `None`."""
    if goal is None:
        return None
    for row in trace.evaluated(metric):
        if _score(row[EVAL_PREFIX + metric], maximize) <= _score(goal, maximize):
            return row
    return None


def ranking(traces: list[Trace], bench: Any, start: float) -> list[dict[str, Any]]:
    """One table row per run, best final `bench.metric` first: status, final metric,
    step and solver seconds (no compilation, no evaluation) at which the target was
    first reached, compile seconds, run seconds."""
    metric, maximize = bench.metric, bench.maximize
    goal = target(traces, metric, maximize, start)
    ordered = sorted(
        traces, key=lambda t: _score(t.final.get(metric, math.nan), maximize)
    )
    rows = []
    for place, trace in enumerate(ordered, start=1):
        hit = first_reaching(trace, metric, maximize, goal)
        rows.append(
            {
                "#": place,
                "solver": trace.name,
                "status": trace.status,
                metric: trace.final.get(metric),
                "target step": None if hit is None else int(hit["step"]),
                "target s": None if hit is None else hit.get("seconds"),
                "compile s": trace.compile_seconds,
                "run s": trace.run_seconds,
            }
        )
    return rows
