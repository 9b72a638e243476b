"""Per-feature ridge regularisation on the diabetes data (10 real + 10 noise features).

Runs several solvers on `bl.problems.ridge_hpo`, plus gradient descent on the exact
closed-form hypergradient as a reference, and prints the validation loss F(x) (exact),
the test MSE of the model y*(x) and the wall time of the run (compilation included),
next to the best single global weight found by grid search.

    python examples/ridge_hpo.py
"""

import time

import jax
import jax.numpy as jnp
from _common import timed_run

import bilevel as bl
from bilevel.cli import format_table


NUM_STEPS = 300


def closed_form_descent(bench, lr):
    """Reference: gradient descent on F with the exact hypergradient."""

    @jax.jit
    def descend(x):
        step = lambda _, u: u - lr * bench.hypergradient(u)  # noqa: E731
        return jax.lax.fori_loop(0, NUM_STEPS, step, x)

    start = time.perf_counter()
    x = jax.block_until_ready(descend(bench.x0))
    return (x, bench.lower_solution(x)), time.perf_counter() - start


def row(method, metrics, seconds=None):
    return {
        "method": method,
        "validation_loss": float(metrics["validation_loss"]),
        "test_mse": float(metrics["refit_test_mse"]),
        "wall_s": "-" if seconds is None else f"{seconds:.1f}",
    }


def main():
    bench = bl.problems.ridge_hpo(num_noise_features=10)
    solvers = {
        "ImplicitDiff": bl.solvers.ImplicitDiff(
            inner_steps=20, inner_lr=0.2, outer_lr=5.0
        ),
        "Unrolled": bl.solvers.Unrolled(inner_steps=20, inner_lr=0.2, outer_lr=5.0),
        "VPBGD": bl.solvers.VPBGD(
            penalty=10.0, x_lr=0.5, y_lr=0.02, z_lr=0.2, z_steps=10
        ),
        "F2SA": bl.solvers.F2SA(
            penalty=10.0,
            penalty_growth=0.0,
            y_lr=0.02,
            y_lr_decay=0.0,
            z_lr=0.2,
            z_lr_decay=0.0,
            x_ratio=25.0,
        ),
    }
    start = bench.evaluate(bench.x0, bench.lower_solution(bench.x0))
    rows = [
        row("x0 (every weight 1)", start),
        row(
            "global weight (grid of 25)",
            {
                "validation_loss": start["baseline_validation_loss"],
                "refit_test_mse": start["baseline_test_mse"],
            },
        ),
    ]
    (x, y), seconds = closed_form_descent(bench, lr=5.0)
    rows.append(row("closed-form hypergradient", bench.evaluate(x, y), seconds))
    for name, solver in solvers.items():
        (x, y), seconds = timed_run(bench, solver, NUM_STEPS)
        rows.append(row(name, bench.evaluate(x, y), seconds))
    print(
        f"ridge_hpo (diabetes + 10 noise features), {NUM_STEPS} outer steps, "
        f"{jnp.result_type(float)}"
    )
    print(format_table(rows))


if __name__ == "__main__":
    main()
