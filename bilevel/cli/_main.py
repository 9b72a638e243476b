"""The `bilevel` command: argument parsing, the three subcommands, exit statuses."""

import argparse
import contextlib
import math
import os
import sys

from . import _summaries
from ._compare import TARGET_FRACTION, ranking, target
from ._session import Session, dtype, open_session, run_all, say
from ._settings import UsageError, solver_classes
from ._table import format_table


EXIT_USAGE = 2
EXIT_FAILED = 3  # a run ended `nonfinite` or `diverged`
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), after writing the partial results
FAILS = ("nonfinite", "diverged")


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
        f"{bench.name}: {session.args.steps} steps per solver, {dtype()}; ranked by "
        f"{bench.metric} ({better} is better)",
        f"at the start: {start:.4g}{_baseline(session)}; target: "
        + (
            "none (no solver improved)"
            if goal is None
            else f"{goal:.4g} ({TARGET_FRACTION:.0%} of the best gain)"
        ),
        "target step, target s: when the target was first reached (solver seconds, "
        "no compile)",
    ]
    say(*lines, format_table(ranking(session.traces, bench, start)))


def _baseline(session: Session) -> str:
    name = session.bench.baseline
    return f"; {name}: {session.start[name]:.4g}" if name in session.start else ""


def _session_command(args: argparse.Namespace, names: list[str], report) -> int:
    session = open_session(args, names)
    try:
        run_all(session)
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
        print(
            f"bilevel: {'; '.join(failed)} (exit status {EXIT_FAILED})", file=sys.stderr
        )
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
    sub.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process launch (jax.distributed); process 0 prints and "
        "writes",
    )
    sub.add_argument("--x64", action="store_true", help="compute in float64")


def _check_args(args: argparse.Namespace) -> None:
    if getattr(args, "steps", 1) < 1:
        raise UsageError("--steps must be >= 1")
    if getattr(args, "log_every", None) is not None and args.log_every < 1:
        raise UsageError("--log-every must be >= 1")
    if getattr(args, "resume", False) and args.checkpoint is None:
        raise UsageError("--resume needs --checkpoint DIR")


COMMANDS = {"list": cmd_list, "run": cmd_run, "compare": cmd_compare}


def _distributed(args: argparse.Namespace) -> int:
    """`run` / `compare` as one process of a multi-process launch: the runtime starts
    before any JAX work; every process runs the command, process 0 alone prints and
    writes `--out` (checkpoints: `bl.solve` writes them from process 0)."""
    import jax

    import bilevel as bl

    bl.distributed.initialize()
    if args.x64:
        jax.config.update("jax_enable_x64", True)
    if bl.distributed.is_main_process():
        return COMMANDS[args.command](args)
    args.out, args.quiet = None, True
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        return COMMANDS[args.command](args)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `bilevel` console script; returns the exit status.

    As the command itself (`argv` not given), after a Ctrl-C it exits at once with
    status 130 once the partial results are written and the streams flushed: an
    interrupt can leave compiled work in flight, and the interpreter's normal shutdown
    then waited on it (or crashed) instead of exiting."""
    status = _main(argv)
    if argv is None and status == EXIT_INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_args(args)
        if getattr(args, "distributed", False):
            return _distributed(args)
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
