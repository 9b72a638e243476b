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


PROBE_SCALES = (0.03, 1.0, 30.0)


def _scaled_ridge(scale: float, seed: int = 1):
    r"""Ridge regression with one log-weight per feature, $g = \frac1{2n}\|Ay - b\|^2
    + \frac12\sum_j e^{x_j}y_j^2$, $f$ the same loss on validation rows without the
    weights, features multiplied by `scale` (lower curvature $\approx$ `scale`$^2$
    against the weights' $e^0 = 1$), $x_0 = 0$: the problem and $\Phi(x) = f(x,
    y^*(x))$ in closed form."""
    rng = np.random.default_rng(seed)
    n, n_val, d = 80, 60, 15
    w = rng.normal(size=d)
    a, a_val = (rng.normal(size=(m, d)) for m in (n, n_val))
    b, b_val = (m @ w + 0.5 * rng.normal(size=len(m)) for m in (a, a_val))
    a, a_val, b, b_val = (
        jnp.asarray(v, jnp.float32) for v in (scale * a, scale * a_val, b, b_val)
    )

    def lower(x, y, batch):
        return 0.5 * jnp.mean((a @ y - b) ** 2) + 0.5 * jnp.sum(jnp.exp(x) * y**2)

    def upper(x, y, batch):
        return 0.5 * jnp.mean((a_val @ y - b_val) ** 2)

    def hyper_objective(x):
        hessian = a.T @ a / n + jnp.diag(jnp.exp(x))
        return upper(x, jnp.linalg.solve(hessian, a.T @ b / n), None)

    return bl.BilevelProblem(upper=upper, lower=lower), hyper_objective, d


def feature_scale_probe(num_steps: int, solvers=SOLVERS) -> list[dict]:
    """Each solver's defaults through `bl.solve` on `_scaled_ridge` at every scale of
    `PROBE_SCALES`: the status and $\Phi$ at the returned $x$ against $\Phi(x_0)$
    (a solver that stops early returns its last good iterate)."""
    rows = []
    for name in solvers:
        row = {"solver": name}
        for scale in PROBE_SCALES:
            problem, hyper_objective, d = _scaled_ridge(scale)
            x0 = y0 = jnp.zeros(d, jnp.float32)
            try:
                result = bl.solve(
                    problem,
                    getattr(bl.solvers, name)(),
                    x0,
                    y0,
                    bl.FullBatch(),
                    num_steps=num_steps,
                    key=jr.PRNGKey(0),
                    progress=False,
                )
            except (TypeError, ValueError) as error:  # not applicable
                row[f"scale {scale:g}"] = f"n/a ({type(error).__name__})"
                continue
            start, end = float(hyper_objective(x0)), float(hyper_objective(result.x))
            row[f"scale {scale:g}"] = f"{result.status}: {start:.3g} -> {end:.3g}"
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
            "Feature-scale probe, float32 (ridge with a log-weight per feature, "
            f"features times 0.03 / 1 / 30, x0 = 0; status: Phi(x0) -> Phi(x) after "
            f"{args.steps} steps)",
            feature_scale_probe(args.steps, args.solvers),
        )
