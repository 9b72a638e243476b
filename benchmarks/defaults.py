"""The defaults matrix: every solver with its defaults (no CLI recipes) on every
registry problem it supports, judged by the problem's own evaluation metric against the
problem's baseline; then the scale battery of the single-block solvers.

Run: `make bench` (all benchmarks) or `python benchmarks/run_all.py defaults`.
`--steps N` sets the budget (default 2000); `--small` runs small instances of the
problems (fewer samples or tasks); `--solvers` and `--problems` select a part of the
matrix; `--no-battery` skips the scale battery."""

import argparse
import pathlib
import sys

import jax.numpy as jnp
import numpy as np
from _registry_defaults import defaults_rows
from _timing import print_table

import bilevel as bl


sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))
from tests import scale_battery  # noqa: E402


SOLVERS = (
    *("ImplicitDiff", "Unrolled", "Penalty", "VPBGD", "F2SA", "SLBAMM", "BOREP"),
    *("LVHBA", "SOBA", "SABA", "SRBA", "MASOBA", "BSVRB"),
)


def matrix(num_steps: int, small: bool, solvers=SOLVERS, names=None) -> list[dict]:
    rows = []
    for name in solvers:
        solver_class = getattr(bl.solvers, name)
        for row in defaults_rows(solver_class, num_steps, names=names, small=small):
            rows.append({"solver": name, **row})
            print(name, row["problem"], row["value"], row["baseline"], flush=True)
    return rows


def summary(rows: list[dict]) -> str:
    good = [row for row in rows if row["better"] and row["finite"]]
    failing = ", ".join(
        f"{r['problem']} {r['solver']} ({r['value']:.4g} vs {r['baseline']:.4g})"
        for r in rows
        if not (r["better"] and r["finite"])
    )
    return f"{len(good)} of {len(rows)} pairs finite and better than the baseline" + (
        f"; failing: {failing}" if failing else ""
    )


def battery(num_steps: int, solvers=SOLVERS) -> list[dict]:
    """Relative hyper-objective gap per (s, t, condition) member after `num_steps`."""
    rows = []
    for name in solvers:
        solver = getattr(bl.solvers, name)()
        try:
            x, history = scale_battery.run_family(solver, jnp.float32, num_steps)
        except (TypeError, ValueError) as error:  # not applicable
            print(f"{name}: {error}")
            continue
        gaps = scale_battery.relative_gaps(x, jnp.float32)
        row = {"solver": name}
        for (s, t, kappa), gap in zip(scale_battery.MEMBERS, gaps):
            row[f"s={s:g},t={t:g},k={kappa:g}"] = f"{gap:.1e}"
        row["finite"] = bool(np.all(np.asarray(history["finite"])[:, -1]))
        rows.append(row)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--small", action="store_true", help="small instances")
    parser.add_argument("--solvers", nargs="+", default=SOLVERS)
    parser.add_argument("--problems", nargs="+", default=None)
    parser.add_argument("--no-battery", action="store_true")
    args = parser.parse_known_args()[0]
    size = "small instances" if args.small else "registry sizes"
    rows = matrix(args.steps, args.small, args.solvers, args.problems)
    print_table(f"Defaults matrix ({args.steps} steps, float32, {size})", rows)
    print(summary(rows))
    if not args.no_battery:
        print_table(
            "Scale battery, float32 (relative gap (F - F*)/(F0 - F*) after "
            f"{args.steps} steps)",
            battery(args.steps, args.solvers),
        )
