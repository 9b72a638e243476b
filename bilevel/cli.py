"""The `bilevel` command: list, run and compare solvers on the problems library.

    bilevel list
    bilevel run PROBLEM --solver NAME --steps N [--set key=value ...] [--seed S] [--out DIR]
    bilevel compare PROBLEM --solvers a,b,c [--steps N] [--out DIR]

`--set` takes solver fields (`--set outer_lr=0.5`) and problem parameters
(`--set problem.corruption=0.4`). Exit code 2 means bad usage (unknown problem, solver
or key), with a message saying what is valid.
"""

import argparse
import csv
import dataclasses
import json
import pathlib
import sys
import time
from typing import Any

import jax
import jax.random as jr
import numpy as np


class UsageError(Exception):
    """Bad command-line input: reported on stderr with exit code 2."""


def solver_classes() -> dict[str, type]:
    """Public solvers by lower-case name."""
    import bilevel as bl

    classes = {}
    for name in dir(bl.solvers):
        obj = getattr(bl.solvers, name)
        if isinstance(obj, type) and issubclass(obj, bl.AbstractBilevelSolver):
            classes[name.lower()] = obj
    return classes


def _summary(obj: Any) -> str:
    doc = (obj.__doc__ or "").strip()
    return " ".join(doc.split("\n\n")[0].split())[:110]


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_settings(pairs: list[str], solver_cls: type, problem: str) -> tuple[dict, dict]:
    from bilevel.problems import parameters

    solver_keys = [f.name for f in dataclasses.fields(solver_cls)]
    problem_keys = [f"problem.{k}" for k in parameters(problem)]
    solver_kwargs, problem_kwargs = {}, {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UsageError(f"--set expects key=value, got {pair!r}")
        if key in solver_keys:
            solver_kwargs[key] = _parse_value(value)
        elif key in problem_keys:
            problem_kwargs[key.removeprefix("problem.")] = _parse_value(value)
        else:
            raise UsageError(
                f"unknown --set key {key!r}; valid keys: {', '.join(solver_keys + problem_keys)}"
            )
    return solver_kwargs, problem_kwargs


def _problem(name: str, seed: int, params: dict):
    from bilevel.problems import make, parameters, registry

    if name not in registry:
        raise UsageError(f"unknown problem {name!r}; available: {', '.join(sorted(registry))}")
    if "seed" in parameters(name):
        params = {"seed": seed, **params}
    try:
        return make(name, **params)
    except (TypeError, ValueError) as err:
        raise UsageError(f"cannot build problem {name!r}: {err}") from err


def _solver(name: str, kwargs: dict, problem: str):
    from bilevel._recipes import recipe

    classes = solver_classes()
    if name.lower() not in classes:
        raise UsageError(f"unknown solver {name!r}; available: {', '.join(sorted(classes))}")
    cls = classes[name.lower()]
    try:
        return cls(**{**recipe(problem, name.lower()), **kwargs})
    except (TypeError, ValueError) as err:
        raise UsageError(f"cannot configure {cls.__name__}: {err}") from err


def _run_one(problem_name, bench, solver_name, solver, steps, seed, progress):
    import bilevel as bl

    start = time.perf_counter()
    try:
        result = bl.solve(
            bench.problem, solver, bench.x0, bench.y0, bench.data, num_steps=steps,
            key=jr.PRNGKey(seed), log_every=max(1, steps // 50), progress=progress,
        )
    except (TypeError, ValueError) as err:
        raise UsageError(f"{solver_name} does not apply to {problem_name}: {err}") from err
    jax.block_until_ready(result.x)
    seconds = time.perf_counter() - start
    metrics = {k: float(v) for k, v in bench.evaluate(result.x, result.y).items()}
    return result, metrics, seconds


def _write_outputs(out: pathlib.Path, config: dict, histories: dict[str, dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    for name, history in histories.items():
        suffix = "" if len(histories) == 1 else f"_{name}"
        with open(out / f"history{suffix}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            columns = list(history)
            writer.writerow(columns)
            for row in zip(*(np.asarray(history[c]).tolist() for c in columns)):
                writer.writerow(row)
    _plot(out / "convergence.png", histories)


def _plot(path: pathlib.Path, histories: dict[str, dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no plot: matplotlib is missing; install it with `pip install 'bilevel[plot]'`)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, history in histories.items():
        axes[0].plot(history["step"], history["upper_loss"], label=name)
        axes[1].semilogy(history["step"], np.maximum(history["grad_norm"], 1e-300), label=name)
    axes[0].set(xlabel="step", ylabel="upper loss")
    axes[1].set(xlabel="step", ylabel="hypergradient / update norm")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"plot: {path}")


def _table(rows: list[dict]) -> str:
    columns = list(rows[0])
    cells = [[f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def cmd_list(args) -> None:
    from bilevel.problems import registry

    print("problems:")
    for name in sorted(registry):
        print(f"  {name:<22}{_summary(registry[name])}")
    print("solvers:")
    for name, cls in sorted(solver_classes().items()):
        print(f"  {name:<22}{_summary(cls)}")


def cmd_run(args) -> None:
    classes = solver_classes()
    if args.solver.lower() not in classes:
        raise UsageError(f"unknown solver {args.solver!r}; available: {', '.join(sorted(classes))}")
    solver_kwargs, problem_kwargs = _parse_settings(args.set, classes[args.solver.lower()], _known(args.problem))
    bench = _problem(args.problem, args.seed, problem_kwargs)
    solver = _solver(args.solver, solver_kwargs, args.problem)
    result, metrics, seconds = _run_one(args.problem, bench, args.solver, solver, args.steps, args.seed, not args.quiet)
    print(f"\n{args.problem} / {type(solver).__name__}: status {result.status}, "
          f"{result.num_steps} steps, {seconds:.1f} s")
    print(_table([{"metric": k, "value": v} for k, v in metrics.items()]))
    if args.out:
        config = {"problem": args.problem, "problem_params": problem_kwargs, "solver": type(solver).__name__,
                  "solver_settings": repr(solver), "steps": args.steps, "seed": args.seed,
                  "status": str(result.status), "metrics": metrics, "wall_seconds": seconds}
        _write_outputs(pathlib.Path(args.out), config, {args.solver: result.history})


def cmd_compare(args) -> None:
    names = [s for s in args.solvers.split(",") if s]
    if not names:
        raise UsageError("--solvers needs a comma-separated list of solver names")
    _known(args.problem)
    bench = _problem(args.problem, args.seed, {})
    solvers = {name: _solver(name, {}, args.problem) for name in names}
    rows, histories, finals = [], {}, {}
    for name, solver in solvers.items():
        print(f"\n{type(solver).__name__}")
        result, metrics, seconds = _run_one(args.problem, bench, name, solver, args.steps, args.seed, not args.quiet)
        histories[name] = result.history
        finals[name] = (result, metrics, seconds)
    best = min(float(np.min(h["upper_loss"])) for h in histories.values())
    target = best + 0.01 * abs(best)
    for name, (result, metrics, seconds) in finals.items():
        history = histories[name]
        hit = np.nonzero(np.asarray(history["upper_loss"]) <= target)[0]
        steps_to_target = int(history["step"][hit[0]]) if hit.size else None
        rows.append({"solver": name, "status": str(result.status), **metrics,
                     "steps to target": steps_to_target if steps_to_target is not None else "-",
                     "s to target": seconds * steps_to_target / result.num_steps if steps_to_target else "-",
                     "wall s": seconds})
    print(f"\n{args.problem}: {args.steps} steps each; target = upper loss within 1% of the best ({target:.4g})")
    print(_table(rows))
    if args.out:
        config = {"problem": args.problem, "solvers": names, "steps": args.steps, "seed": args.seed,
                  "results": rows}
        _write_outputs(pathlib.Path(args.out), config, histories)


def _known(problem: str) -> str:
    from bilevel.problems import registry

    if problem not in registry:
        raise UsageError(f"unknown problem {problem!r}; available: {', '.join(sorted(registry))}")
    return problem


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `bilevel` command."""
    parser = argparse.ArgumentParser(prog="bilevel", description="Bilevel optimization in JAX.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="problems and solvers with one-line descriptions")
    run = commands.add_parser("run", help="run one solver on one problem")
    run.add_argument("problem")
    run.add_argument("--solver", required=True)
    run.add_argument("--steps", type=int, default=500)
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    compare = commands.add_parser("compare", help="run several solvers with the same budget")
    compare.add_argument("problem")
    compare.add_argument("--solvers", required=True, help="comma-separated solver names")
    compare.add_argument("--steps", type=int, default=500)
    for sub in (run, compare):
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--out", default=None, help="directory for history, config and plot")
        sub.add_argument("--quiet", action="store_true", help="no progress bar")
        sub.add_argument("--x64", action="store_true", help="compute in float64")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `bilevel` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    if getattr(args, "steps", 1) < 1:
        print("bilevel: error: --steps must be >= 1", file=sys.stderr)
        return 2
    if getattr(args, "x64", False):
        jax.config.update("jax_enable_x64", True)
    try:
        {"list": cmd_list, "run": cmd_run, "compare": cmd_compare}[args.command](args)
    except UsageError as err:
        print(f"bilevel: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
