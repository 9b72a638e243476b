"""ImplicitDiff and Unrolled with default settings (no CLI recipes) on the registry
problems they apply to, compared by each problem's own evaluation metric with its
baseline (issue: defaults that work), and the scale battery of the quadratic.

    python benchmarks/implicit_diff_defaults.py [--steps N] [--only NAME ...] [--x64]
        [--inner-solvers]

Table 1: problem x solver: status, metric vs baseline, hypergradient status, last
lower residual, seconds.
Table 2: relative hyper-objective gap of the scaled quadratic after the given steps.
Table 3 (with `--inner-solvers`): ImplicitDiff's default inner steps against
`inner_optimizer=optax.lbfgs()` on the problems whose lower level becomes
ill-conditioned (logreg_hpo) or whose lower variable is large (imaml): metric, last
lower residual, seconds.
"""

import argparse

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from _registry_defaults import timed_default_solve
from _timing import print_table


# (label, registry name, parameters): the defaults matrix rows for these two solvers.
CASES = [
    ("quadratic", "quadratic", {}),
    ("ridge_hpo", "ridge_hpo", {}),
    ("logreg_hpo", "logreg_hpo", {}),
    ("hypercleaning", "hypercleaning", {}),
    ("hypercleaning mlp", "hypercleaning", {"model": "mlp"}),
    ("distillation", "distillation", {}),
    ("distillation mlp", "distillation", {"lower": "mlp"}),
    ("imaml", "imaml", {}),
    ("hyper_representation", "hyper_representation", {}),
]
SOLVERS = ("ImplicitDiff", "Unrolled")
INNER_CASES = ("logreg_hpo", "imaml")


def defaults_row(label, name, params, solver_name, steps, **options):
    import bilevel as bl

    bench = bl.problems.make(name, **params)
    result, seconds = timed_default_solve(bench, solver_name, steps, **options)
    values = bench.evaluate(result.x, result.y)
    metric = float(values[bench.metric])
    baseline = bench.baseline_value(values)
    better = bench.improves(metric, baseline)
    status = result.history.get("hypergradient_status")
    return {
        "problem": label,
        "solver": solver_name,
        "status": str(result.status),
        "steps": int(result.num_steps),
        "metric": bench.metric,
        "value": metric,
        "baseline": baseline,
        "beats baseline": bool(better),
        "hypergrad status (last)": "-" if status is None else int(status[-1]),
        "lower residual (last)": float(result.history["lower_residual"][-1]),
        "seconds": seconds,
    }


def inner_solver_rows(steps, only=None):
    """ImplicitDiff with its default inner steps and with `optax.lbfgs()` ones."""
    rows = []
    for label, name, params in CASES:
        if label not in INNER_CASES or (only and label not in only):
            continue
        for inner, options in (
            ("default", {}),
            ("optax.lbfgs()", {"inner_optimizer": optax.lbfgs()}),
        ):
            row = defaults_row(label, name, params, "ImplicitDiff", steps, **options)
            rows.append({"inner steps": inner, **row})
            print(rows[-1], flush=True)
    return rows


def scale_battery(steps, pairs=None):
    import bilevel as bl

    pairs = pairs or [(s, t) for s in (0.02, 1.0, 50.0) for t in (0.02, 1.0, 50.0)]
    rows = []
    for solver_name in SOLVERS:
        for s, t in pairs:
            bench = bl.problems.quadratic(
                4, 10, lower_condition=20, lower_scale=s, upper_scale=t
            )
            solver = getattr(bl.solvers, solver_name)()
            state, history = bl.run(
                bench.problem,
                solver,
                bench.x0,
                bench.y0,
                bench.data,
                steps,
                jr.PRNGKey(0),
            )
            x, y = solver.params(state)

            def value(x, y, bench=bench):
                return float(bench.evaluate(x, y)["hyper_objective"])

            best, start = value(bench.solution, bench.y0), value(bench.x0, bench.y0)
            gap = (value(x, y) - best) / (start - best)
            # f(x_k, y_k) ~ F(x_k) once y_k tracks y*(x_k): steps to a 1e-3 gap.
            trace = (np.asarray(history["upper_loss"]) - best) / (start - best)
            hit = np.nonzero(trace <= 1e-3)[0]
            finite = bool(np.all(np.isfinite(np.asarray(history["upper_loss"]))))
            steps_to = int(hit[0]) + 1 if hit.size else "-"
            rows.append(
                {
                    "solver": solver_name,
                    "s (lower)": s,
                    "t (upper)": t,
                    "relative gap": gap,
                    "steps to 1e-3": steps_to,
                    "finite": finite,
                }
            )
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--battery-steps", type=int, default=3000)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--solvers", nargs="*", default=list(SOLVERS))
    parser.add_argument("--x64", action="store_true")
    parser.add_argument("--no-battery", action="store_true")
    parser.add_argument("--no-registry", action="store_true")
    parser.add_argument("--inner-solvers", action="store_true")
    args = parser.parse_args()
    if args.x64:
        jax.config.update("jax_enable_x64", True)
    if not args.no_registry:
        rows = []
        for label, name, params in CASES:
            if args.only and label not in args.only:
                continue
            for solver_name in args.solvers:
                try:
                    row = defaults_row(label, name, params, solver_name, args.steps)
                    rows.append(row)
                except Exception as err:  # reported as a row: the table is the output
                    rows.append(
                        {
                            "problem": label,
                            "solver": solver_name,
                            "status": f"error: {str(err)[:60]}",
                        }
                    )
                print(rows[-1], flush=True)
        print_table(f"defaults, {args.steps} steps (bl.solve, key 0)", rows)
    if not args.no_battery:
        print_table(
            "scale battery: quadratic(4, 10, lower_condition=20), "
            f"{args.battery_steps} steps, gap (F(x_K) - F*) / (F(x_0) - F*)",
            scale_battery(args.battery_steps),
        )
    if args.inner_solvers:
        print_table(
            f"ImplicitDiff inner steps, {args.steps} steps (bl.solve, key 0)",
            inner_solver_rows(args.steps, args.only),
        )


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing
    main()
