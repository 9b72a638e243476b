"""The defaults matrix: every solver with its defaults (no CLI recipes) on every
registry problem it supports, judged by the problem's own evaluation metric against the
problem's baseline; then the scale battery of the single-block solvers, and the
feature-scale probe (`feature_scale_probe`).

Run: `make bench` (all benchmarks) or `python benchmarks/run_all.py defaults`.
`--steps N` sets the budget (default 2000); `--small` runs small instances of the
problems (fewer samples or tasks); `--solvers` and `--problems` select a part of the
matrix; `--no-battery` skips the scale battery and the probe."""

import argparse
import pathlib
import sys

import jax.numpy as jnp
import jax.random as jr
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


PROBE_STARTS = (7.0, 0.0, -7.0)


def feature_scale_probe(num_steps: int, solvers=SOLVERS) -> list[dict]:
    r"""Each solver's defaults through `bl.solve` on `ridge_hpo` (a log-weight per
    feature) started at every `init_log_reg` of `PROBE_STARTS`: the status and the
    hyper-objective $\Phi(x) = f(x, y^*(x))$ (closed form) at the returned $x$ against
    $\Phi(x_0)$; a run that fails returns its last good iterate. Starting at
    $x_0 = -2\log c$ is the problem at $x_0 = 0$ with its features multiplied by $c$
    (substitute $y = u/c$): at $x_0 = -7$ ($c \approx 30$) the weights are negligible
    next to the data's curvature, $\Phi$ is flat at $x_0$ and its curvature grows like
    $e^{x_j}$ along the path; at $x_0 = 7$ ($c \approx 0.03$) they dominate it."""
    rows = []
    for name in solvers:
        row = {"solver": name}
        for start in PROBE_STARTS:
            bench = bl.problems.make("ridge_hpo", init_log_reg=start)
            upper_data = bench.data.full_upper()

            def hyper_objective(x):
                return float(
                    bench.problem.upper(x, bench.lower_solution(x), upper_data)
                )

            try:
                result = bl.solve(
                    bench.problem,
                    getattr(bl.solvers, name)(),
                    bench.x0,
                    bench.y0,
                    bench.data,
                    num_steps=num_steps,
                    key=jr.PRNGKey(0),
                    progress=False,
                )
            except (TypeError, ValueError) as error:  # not applicable
                row[f"x0 = {start:g}"] = f"n/a ({type(error).__name__})"
                continue
            before, after = hyper_objective(bench.x0), hyper_objective(result.x)
            row[f"x0 = {start:g}"] = f"{result.status}: {before:.3g} -> {after:.3g}"
        rows.append(row)
        print(row, flush=True)
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
        print_table(
            "Feature-scale probe, float32 (ridge_hpo started at init_log_reg 7 / 0 / "
            f"-7; status: Phi(x0) -> Phi(x) after {args.steps} steps)",
            feature_scale_probe(args.steps, args.solvers),
        )
