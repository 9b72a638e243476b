"""One solver run as the command drives it: compiled once apart (so compile time is
reported on its own), then run with `bl.solve`, the problem's own evaluation at
regular log points, and the history appended to disk at every log point."""

import dataclasses
import math
import pathlib
import time
from typing import Any

import jax.random as jr
import numpy as np

from ._output import History
from ._settings import UsageError, one_line


EVAL_PREFIX = "eval_"
EVALUATIONS = (5, 50)  # evaluations per run (fewest, most), at regular log points
EVALUATION_BUDGET = 30.0  # seconds of evaluation per run, when that allows more than 5


@dataclasses.dataclass
class Job:
    """What every run of one command shares."""

    bench: Any
    steps: int
    log_every: int
    seed: int
    progress: bool
    evaluations: int = EVALUATIONS[1]

    def plan_evaluations(self, seconds: float) -> None:
        """Evaluate as often as `EVALUATION_BUDGET` allows at `seconds` each."""
        fewest, most = EVALUATIONS
        affordable = EVALUATION_BUDGET / max(seconds, 1e-9)
        self.evaluations = int(min(most, max(fewest, affordable)))

    @property
    def eval_every(self) -> int:
        """Log points between two evaluations (the last point is always evaluated)."""
        log_points = math.ceil(self.steps / self.log_every)
        return max(1, math.ceil(log_points / self.evaluations))

    def key(self):
        return jr.PRNGKey(self.seed)


@dataclasses.dataclass
class Trace:
    """One solver's run as the command saw it: a row per log point (`step`, the
    solver's metrics, `seconds` of solver time without compilation or evaluation, and
    `eval_*` columns at evaluated points), how it ended, and where time went."""

    name: str
    solver: Any
    rows: list[dict[str, float]] = dataclasses.field(default_factory=list)
    status: str = "not started"
    steps: int = 0
    compile_seconds: float = math.nan
    run_seconds: float = 0.0
    eval_seconds: float = 0.0
    final: dict[str, float] = dataclasses.field(default_factory=dict)

    def evaluated(self, metric: str) -> list[dict[str, float]]:
        """The rows where the problem's `metric` was evaluated."""
        return [row for row in self.rows if EVAL_PREFIX + metric in row]

    def summary(self) -> dict[str, Any]:
        """How the run ended, for `config.json`: status, steps, the final value of
        every metric of the problem's evaluation, and where time went."""
        return {
            "solver": self.name,
            "status": self.status,
            "steps": self.steps,
            **self.final,
            "compile_seconds": self.compile_seconds,
            "run_seconds": self.run_seconds,
            "evaluation_seconds": self.eval_seconds,
        }


def _scalars(values: dict[str, Any]) -> dict[str, float]:
    """The scalar entries of `values` as floats (`step` excluded)."""
    return {
        k: float(np.asarray(v))
        for k, v in values.items()
        if np.size(v) == 1 and k != "step"
    }


def evaluation(bench: Any, x: Any, y: Any) -> dict[str, float]:
    """`bench.evaluate(x, y)` as floats (scalar entries only)."""
    return _scalars(bench.evaluate(x, y))


def _warm_up(job: Job, trace: Trace) -> tuple[float, int]:
    """Compile every chunk size the run will use with a short `bl.solve`; returns
    its wall time and its number of steps."""
    import bilevel as bl

    bench = job.bench
    remainder = job.steps % job.log_every
    steps = min(job.steps, job.log_every + remainder)
    start = time.perf_counter()
    try:
        bl.solve(
            bench.problem,
            trace.solver,
            bench.x0,
            bench.y0,
            bench.data,
            num_steps=steps,
            key=job.key(),
            log_every=job.log_every,
            progress=False,
        )
    except (TypeError, ValueError) as err:
        raise UsageError(
            f"{trace.name} cannot run on {bench.name}: {one_line(err)}"
        ) from err
    return time.perf_counter() - start, steps


class _Recorder:
    """The `bl.solve` callback: times the solver, evaluates, appends history rows."""

    def __init__(self, job: Job, trace: Trace, path: pathlib.Path | None):
        self.job, self.trace, self.path = job, trace, path
        self.history: History | None = None
        self.offset = trace.rows[-1].get("seconds", 0.0) if trace.rows else 0.0
        self.new_rows = 0
        self.paused = 0.0
        self.latest: tuple[Any, Any] = (None, None)  # (x, y) at the last log point
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return self.offset + time.perf_counter() - self.start - self.paused

    def __call__(self, step, metrics, x, y) -> None:
        entered = time.perf_counter()
        row = {"step": int(step)}
        row.update(_scalars(metrics))
        row["seconds"] = self.offset + entered - self.start - self.paused
        if self.new_rows % self.job.eval_every == 0:
            self.evaluate(row, x, y)
        self._append(row)
        self.latest = (x, y)
        self.paused += time.perf_counter() - entered

    def evaluate(self, row: dict, x: Any, y: Any) -> None:
        """Add the problem's evaluation at `(x, y)` to `row`."""
        start = time.perf_counter()
        values = evaluation(self.job.bench, x, y)
        row.update({EVAL_PREFIX + k: v for k, v in values.items()})
        self.trace.eval_seconds += time.perf_counter() - start

    def _append(self, row: dict) -> None:
        rows = self.trace.rows
        if self.new_rows == 0 and rows and rows[-1]["step"] >= row["step"]:
            rows[:] = [r for r in rows if r["step"] < row["step"]]  # a resumed run
            self._open(row).rewrite(rows)
        rows.append(row)
        self.trace.steps = row["step"]
        self.new_rows += 1
        if self.path is not None:
            self._open(row).append(row)

    def _open(self, row: dict) -> History:
        if self.history is None:
            columns = _columns(self.trace.rows + [row])
            self.history = History(self.path, columns)
        return self.history


def _columns(rows: list[dict]) -> list[str]:
    names = list(dict.fromkeys(k for row in rows for k in row))
    evaluated = [k for k in names if k.startswith(EVAL_PREFIX)]
    plain = [k for k in names if k not in evaluated and k not in ("step", "seconds")]
    return ["step", *plain, "seconds", *evaluated]


def run_solver(
    job: Job,
    trace: Trace,
    history: pathlib.Path | None,
    checkpointing: dict[str, Any] | None = None,
) -> None:
    """Run `trace.solver` on the job's problem, filling `trace` as it goes (so that it
    holds the run so far if interrupted: status `interrupted`, `KeyboardInterrupt`
    re-raised). `history` is the CSV file appended at every log point;
    `checkpointing` holds `bl.solve`'s `checkpoint`, `resume` and `overwrite`
    arguments, whose refusals (a checkpoint of another run) become a `UsageError`."""
    import bilevel as bl

    bench = job.bench
    warm_seconds, warm_steps = _warm_up(job, trace)
    recorder = _Recorder(job, trace, history)
    try:
        result = bl.solve(
            bench.problem,
            trace.solver,
            bench.x0,
            bench.y0,
            bench.data,
            num_steps=job.steps,
            key=job.key(),
            log_every=job.log_every,
            progress=job.progress,
            callback=recorder,
            **(checkpointing or {}),
        )
    except ValueError as err:
        if recorder.new_rows:
            raise
        raise UsageError(f"{trace.name}: {one_line(err)}") from err  # e.g. a checkpoint
    except KeyboardInterrupt:
        trace.status = "interrupted"
        _finish(trace, recorder, *recorder.latest, warm_seconds, warm_steps)
        raise
    finally:
        if recorder.history is not None:
            recorder.history.close()
    trace.status = str(result.status)
    trace.steps = int(result.num_steps)
    _complete_rows(trace, result.history)
    _finish(trace, recorder, result.x, result.y, warm_seconds, warm_steps)


def _finish(trace, recorder, x, y, warm_seconds, warm_steps) -> None:
    """Timing, the evaluation at the last log point (`x`, `y`) if it has none, the
    final metrics, and the history file rewritten whole."""
    _finish_timing(trace, recorder, warm_seconds, warm_steps)
    metric = EVAL_PREFIX + recorder.job.bench.metric
    if trace.rows and metric not in trace.rows[-1] and x is not None:
        recorder.evaluate(trace.rows[-1], x, y)
    trace.final = _latest_evaluation(trace)
    if recorder.path is not None and trace.rows:
        history = recorder.history or History(recorder.path, _columns(trace.rows))
        history.rewrite(trace.rows)


def _finish_timing(trace, recorder, warm_seconds, warm_steps) -> None:
    """Run time, and compile time: the warm-up's time less what its steps cost."""
    trace.run_seconds = recorder.elapsed()
    new_steps = recorder.new_rows * recorder.job.log_every
    per_step = (trace.run_seconds - recorder.offset) / new_steps if new_steps else 0.0
    trace.compile_seconds = max(0.0, warm_seconds - per_step * warm_steps)


def _complete_rows(trace: Trace, history: dict) -> None:
    """Add the log points of `bl.solve`'s history that no callback reported (those a
    resumed run restored from its checkpoint)."""
    seen = {row["step"] for row in trace.rows}
    for i, step in enumerate(np.asarray(history["step"]).tolist()):
        if int(step) not in seen:
            values = {name: column[i] for name, column in history.items()}
            trace.rows.append({"step": int(step), **_scalars(values)})
    trace.rows.sort(key=lambda row: row["step"])


def _latest_evaluation(trace: Trace) -> dict[str, float]:
    for row in reversed(trace.rows):
        values = {
            k[len(EVAL_PREFIX) :]: v
            for k, v in row.items()
            if k.startswith(EVAL_PREFIX)
        }
        if values:
            return values
    return {}
