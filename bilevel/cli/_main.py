"""The `bilevel` command: argument parsing, the three subcommands, exit statuses."""

import argparse
import dataclasses
import math
import pathlib
import sys
import time
from typing import Any

from . import _output, _summaries
from ._compare import TARGET_FRACTION, ranking, target
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
    solver_classes,
)
from ._table import format_table


EXIT_USAGE = 2
EXIT_FAILED = 3  # a run ended `nonfinite` or `diverged`
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), after writing the partial results
FAILS = ("nonfinite", "diverged")


def say(*lines: str) -> None:
    """Print plain lines to stdout at once (a log file gets them as they happen)."""
    print(*lines, sep="\n", flush=True)


# -----------------------------------------------------------------------------------
# bilevel list


def cmd_list(args: argparse.Namespace) -> int:
    from bilevel.problems import registry

    say("problems:")
    for name in sorted(registry):
        say(f"  {name:<22}{_summaries.PROBLEMS.get(name, '(no summary yet)')}")
    say("solvers:")
    for name in sorted(solver_classes()):
        say(f"  {name:<22}{_summaries.SOLVERS.get(name, '(no summary yet)')}")
    return 0


# -----------------------------------------------------------------------------------
# bilevel run / bilevel compare


@dataclasses.dataclass
class Session:
    """One `run` or `compare` invocation: its problem, runs and output directory."""

    args: argparse.Namespace
    names: list[str]
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
            "dtype": _dtype(),
            "checkpoint": args.checkpoint,
            "start_metrics": self.start,
            "results": [t.summary() for t in self.traces],
        }
        if args.command == "run":
            trace = self.traces[0]
            config.update(status=trace.status, metrics=trace.final)
        else:
            config["ranking"] = ranking(self.traces, bench, self._start_value())
        return config

    def _start_value(self) -> float:
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
                self._start_value(),
            )


def _solver_record(solver: Any) -> dict[str, Any]:
    fields = {f.name: getattr(solver, f.name) for f in dataclasses.fields(solver)}
    return {"class": type(solver).__name__, "settings": fields}


def _dtype() -> str:
    import jax.numpy as jnp

    return str(jnp.result_type(float))


def _log_every(args: argparse.Namespace) -> int:
    return min(args.steps, args.log_every or max(1, args.steps // 50))


def _open_session(args: argparse.Namespace, names: list[str]) -> Session:
    """Everything that can be checked before compiling: names, settings, solver
    configurations, `--out`, the problem, applicability, `--checkpoint`."""
    problem = known_problem(args.problem)
    settings = parse_settings(args.set, names, problem)
    solvers = {n: build_solver(n, problem, settings.solvers[n.lower()]) for n in names}
    out = None if args.out is None else pathlib.Path(args.out)
    if out is not None:
        _output.check_writable(out)
    bench = build_problem(problem, args.seed, settings.problem)
    traces = []
    for name, solver in solvers.items():
        check_applies(name, solver, bench)
        traces.append(Trace(name.lower(), solver))
    job = Job(bench, args.steps, _log_every(args), args.seed, not args.quiet)
    session = Session(args, names, settings, job, traces, out)
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
    earlier = _output.read_config(out) if args.resume else None
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


def _run_all(session: Session) -> None:
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
            f"{session.job.log_every}, {_dtype()}"
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


def _report_run(session: Session) -> None:
    trace = session.traces[0]
    rows = [
        {"metric": k, "start": session.start.get(k), "final": v}
        for k, v in trace.final.items()
    ]
    say("", format_table(rows))


def _report_compare(session: Session) -> None:
    bench = session.bench
    start = session.start.get(bench.metric, math.nan)
    goal = target(session.traces, bench.metric, bench.maximize, start)
    better = "higher" if bench.maximize else "lower"
    lines = [
        "",
        f"{bench.name}: {session.args.steps} steps per solver, {_dtype()}; ranked by "
        f"{bench.metric} ({better} is better)",
        f"at the start: {start:.4g}"
        + (
            f"; {bench.baseline}: {session.start[bench.baseline]:.4g}"
            if bench.baseline in session.start
            else ""
        )
        + (
            "; target: none (no solver improved)"
            if goal is None
            else f"; target: {goal:.4g} ({TARGET_FRACTION:.0%} of the best gain)"
        ),
        "target step, target s: when the target was first reached (solver seconds, "
        "no compile)",
    ]
    say(*lines, format_table(ranking(session.traces, bench, start)))


def _session_command(args: argparse.Namespace, names: list[str], report) -> int:
    session = _open_session(args, names)
    try:
        _run_all(session)
    except KeyboardInterrupt:
        session.state = "interrupted"
        session.save()
        report(session)
        where = f"; partial results in {session.out}" if session.out else ""
        print(f"bilevel: interrupted{where}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    session.state = "finished"
    session.save()
    report(session)
    if session.out is not None:
        say(f"results: {session.out}")
    failed = [f"{t.name} ended {t.status}" for t in session.traces if t.status in FAILS]
    if failed:
        print(f"bilevel: {'; '.join(failed)} (exit status 3)", file=sys.stderr)
        return EXIT_FAILED
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    return _session_command(args, [args.solver], _report_run)


def cmd_compare(args: argparse.Namespace) -> int:
    names = [s.strip() for s in args.solvers.split(",") if s.strip()]
    if not names:
        raise UsageError("--solvers needs a comma-separated list of solver names")
    if len({n.lower() for n in names}) != len(names):
        raise UsageError(f"--solvers lists a solver twice: {args.solvers}")
    return _session_command(args, names, _report_compare)


# -----------------------------------------------------------------------------------
# Parser and entry point


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `bilevel` command."""
    parser = argparse.ArgumentParser(
        prog="bilevel",
        description="Bilevel optimization in JAX: list, run and compare solvers.",
        epilog=f"exit status: 0 done, {EXIT_USAGE} bad usage, {EXIT_FAILED} a run "
        f"ended non-finite or diverged, {EXIT_INTERRUPTED} interrupted (partial "
        "results written)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="problems and solvers, one line each")
    run = commands.add_parser("run", help="run one solver on one problem")
    run.add_argument("--solver", required=True)
    compare = commands.add_parser("compare", help="run several solvers, same budget")
    compare.add_argument(
        "--solvers", required=True, help="comma-separated solver names"
    )
    for sub in (run, compare):
        _add_run_options(sub)
    return parser


def _add_run_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("problem")
    sub.add_argument("--steps", type=int, default=500)
    sub.add_argument(
        "--log-every",
        type=int,
        default=None,
        help="steps between log points (default: steps / 50)",
    )
    sub.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a solver field or problem.PARAMETER (repeatable)",
    )
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--out", default=None, help="directory for history, config, plot")
    sub.add_argument(
        "--force",
        action="store_true",
        help="replace an earlier run's files in --out and --checkpoint",
    )
    sub.add_argument(
        "--checkpoint",
        default=None,
        metavar="DIR",
        help="checkpoint after every log point into DIR",
    )
    sub.add_argument(
        "--resume",
        action="store_true",
        help="continue the run checkpointed in --checkpoint",
    )
    sub.add_argument("--quiet", action="store_true", help="no progress output")
    sub.add_argument("--x64", action="store_true", help="compute in float64")


def _check_args(args: argparse.Namespace) -> None:
    if getattr(args, "steps", 1) < 1:
        raise UsageError("--steps must be >= 1")
    if (getattr(args, "log_every", None) or 1) < 1:
        raise UsageError("--log-every must be >= 1")
    if getattr(args, "resume", False) and args.checkpoint is None:
        raise UsageError("--resume needs --checkpoint DIR")


COMMANDS = {"list": cmd_list, "run": cmd_run, "compare": cmd_compare}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `bilevel` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        _check_args(args)
        if getattr(args, "x64", False):
            import jax

            jax.config.update("jax_enable_x64", True)
        return COMMANDS[args.command](args)
    except UsageError as err:
        print(f"bilevel: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("bilevel: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
