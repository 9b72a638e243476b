"""One `run` or `compare` invocation: everything checked before compiling (names,
settings, `--out`, `--checkpoint`), the runs, and what `config.json` records."""

import argparse
import dataclasses
import math
import pathlib
import time
from typing import Any

from . import _output
from ._compare import ranking
from ._plot import plot
from ._runner import Job, Trace, evaluation, run_solver
from ._settings import (
    Settings,
    UsageError,
    build_problem,
    build_solver,
    check_applies,
    known_problem,
    parse_settings,
)


def say(*lines: str) -> None:
    """Print plain lines to stdout at once (a log file gets them as they happen)."""
    print(*lines, sep="\n", flush=True)


def dtype() -> str:
    """The floating dtype runs use (float32 unless x64 is enabled)."""
    import jax.numpy as jnp

    return str(jnp.result_type(float))


@dataclasses.dataclass
class Session:
    """One `run` or `compare` invocation: its problem, runs and output directory."""

    args: argparse.Namespace
    settings: Settings
    job: Job
    traces: list[Trace]
    out: pathlib.Path | None
    start: dict[str, float] = dataclasses.field(default_factory=dict)
    state: str = "running"

    @property
    def bench(self):
        return self.job.bench

    def history_path(self, trace: Trace) -> pathlib.Path | None:
        if self.out is None:
            return None
        suffix = "" if self.args.command == "run" else f"_{trace.name}"
        return self.out / f"history{suffix}.csv"

    def checkpoint(self, trace: Trace) -> pathlib.Path | None:
        if self.args.checkpoint is None:
            return None
        root = pathlib.Path(self.args.checkpoint)
        return root if self.args.command == "run" else root / trace.name

    def checkpointing(self, trace: Trace) -> dict[str, Any]:
        """`bl.solve`'s checkpoint arguments for this run (none without
        `--checkpoint`); `--force` starts an existing checkpoint over."""
        directory = self.checkpoint(trace)
        if directory is None:
            return {}
        options = {"checkpoint": str(directory), "resume": self.args.resume}
        if self.args.force and not self.args.resume:
            options["overwrite"] = True
        return options

    def config(self) -> dict[str, Any]:
        """What `config.json` records: enough to rerun, and how every run ended."""
        bench, args = self.bench, self.args
        config = {
            "command": args.command,
            "state": self.state,
            "problem": bench.name,
            "problem_params": self.settings.problem,
            "metric": bench.metric,
            "maximize": bench.maximize,
            "baseline": bench.baseline,
            "solvers": {t.name: _solver_record(t.solver) for t in self.traces},
            "steps": args.steps,
            "log_every": self.job.log_every,
            "seed": args.seed,
            "dtype": dtype(),
            "checkpoint": args.checkpoint,
            "start_metrics": self.start,
            "results": [t.summary() for t in self.traces],
        }
        if args.command == "run":
            trace = self.traces[0]
            config.update(status=trace.status, metrics=trace.final)
        else:
            config["ranking"] = ranking(self.traces, bench, self.start_value())
        return config

    def start_value(self) -> float:
        """The problem's metric at the initial point."""
        return self.start.get(self.bench.metric, math.nan)

    def save(self) -> None:
        """Write `config.json` and the plot (the histories are written as runs go)."""
        if self.out is None:
            return
        _output.write_config(self.out, self.config())
        if any(trace.rows for trace in self.traces):
            plot(
                self.out / _output.PLOT,
                self.traces,
                self.bench.metric,
                self.start_value(),
            )


def _solver_record(solver: Any) -> dict[str, Any]:
    fields = {f.name: getattr(solver, f.name) for f in dataclasses.fields(solver)}
    return {"class": type(solver).__name__, "settings": fields}


def _log_every(args: argparse.Namespace) -> int:
    if args.log_every is not None:
        return min(args.steps, args.log_every)
    return max(1, args.steps // 50)


def open_session(args: argparse.Namespace, names: list[str]) -> Session:
    """Everything that can be checked before compiling: names, settings, solver
    configurations, `--out`, the problem, applicability, `--checkpoint`."""
    problem = known_problem(args.problem)
    settings = parse_settings(args.set, names, problem)
    solvers = {n: build_solver(n, settings.solvers[n.lower()]) for n in names}
    out = None if args.out is None else pathlib.Path(args.out)
    if out is not None:
        _output.check_writable(out)
    bench = build_problem(problem, args.seed, settings.problem)
    traces = []
    for name, solver in solvers.items():
        check_applies(name, solver, bench)
        traces.append(Trace(name.lower(), solver))
    job = Job(bench, args.steps, _log_every(args), args.seed, not args.quiet)
    session = Session(args, settings, job, traces, out)
    _check_checkpoints(session)
    if out is not None:
        _prepare_out(session)
    return session


def _check_checkpoints(session: Session) -> None:
    args = session.args
    if args.checkpoint is None or args.resume or args.force:
        return
    for trace in session.traces:
        directory = session.checkpoint(trace)
        if directory.is_dir() and any(directory.iterdir()):
            raise UsageError(
                f"--checkpoint {directory} already holds a run; add --resume to "
                "continue it or --force to start over"
            )


def _prepare_out(session: Session) -> None:
    args, out = session.args, session.out
    keep = None if args.checkpoint is None else pathlib.Path(args.checkpoint).resolve()
    earlier = _output.read_config(out) if args.resume and not args.force else None
    if earlier is not None:
        _check_same_run(earlier, session)
    _output.prepare(out, force=args.force, resume=earlier is not None, keep=keep)
    for trace in session.traces:
        trace.rows = _output.History.read(session.history_path(trace))
        trace.steps = int(trace.rows[-1]["step"]) if trace.rows else 0


def _check_same_run(earlier: dict[str, Any], session: Session) -> None:
    """A resumed run may append to `--out` only if it holds this same run."""
    now = _output.plain(session.config())
    keys = (
        "command",
        "problem",
        "problem_params",
        "solvers",
        "seed",
        "log_every",
        "dtype",
    )
    differ = [key for key in keys if earlier.get(key) != now.get(key)]
    if differ:
        raise UsageError(
            f"--out {session.out} holds another run ({', '.join(differ)} differ); "
            "resume into a new directory or the one this run wrote"
        )


def run_all(session: Session) -> None:
    """Evaluate the start, then run every solver, saving after each."""
    bench = session.bench
    session.start = evaluation(bench, bench.x0, bench.y0)  # compiles the evaluation
    start = time.perf_counter()
    evaluation(bench, bench.x0, bench.y0)
    session.job.plan_evaluations(time.perf_counter() - start)
    session.save()
    for i, trace in enumerate(session.traces, start=1):
        counter = f"[{i}/{len(session.traces)}] " if len(session.traces) > 1 else ""
        solver = type(trace.solver).__name__
        say(
            f"{counter}{bench.name} / {solver}: {session.args.steps} steps, log every "
            f"{session.job.log_every}, {dtype()}"
        )
        run_solver(
            session.job,
            trace,
            session.history_path(trace),
            session.checkpointing(trace),
        )
        say(
            f"{trace.name}: {trace.status} after {trace.steps} steps (compile "
            f"{trace.compile_seconds:.1f} s, run {trace.run_seconds:.1f} s, evaluation "
            f"{trace.eval_seconds:.1f} s)"
        )
        session.save()
