"""Per-feature L2 regularisation of logistic regression on the breast-cancer data.

Runs several solvers on `bl.problems.logreg_hpo` and prints the validation loss F(x)
and the test accuracy of the model refitted by L-BFGS at the learned x (comparable
across solvers), and the wall time of the run (compilation included), next to the
best single global L2 weight chosen by grid search.

    python examples/logreg_hpo.py
"""

import jax.numpy as jnp
from _common import timed_run

import bilevel as bl
from bilevel.cli import format_table


NUM_STEPS = 300


def row(method, validation_loss, test_accuracy, seconds=None):
    return {
        "method": method,
        "validation_loss": float(validation_loss),
        "test_accuracy": float(test_accuracy),
        "wall_s": "-" if seconds is None else f"{seconds:.1f}",
    }


def main():
    bench = bl.problems.logreg_hpo()
    solvers = {
        "ImplicitDiff": bl.solvers.ImplicitDiff(
            inner_steps=20, inner_lr=0.2, outer_lr=10.0
        ),
        "Unrolled": bl.solvers.Unrolled(inner_steps=20, inner_lr=0.2, outer_lr=10.0),
        "VPBGD": bl.solvers.VPBGD(
            penalty=10.0, x_lr=1.0, y_lr=0.02, z_lr=0.2, z_steps=10
        ),
        "F2SA": bl.solvers.F2SA(
            penalty=10.0,
            penalty_growth=0.0,
            y_lr=0.02,
            y_lr_decay=0.0,
            z_lr=0.2,
            z_lr_decay=0.0,
            x_ratio=50.0,
        ),
    }
    start = bench.evaluate(bench.x0, bench.y0)
    rows = [
        row(
            "x0 (every weight 1)",
            start["validation_loss"],
            start["refit_test_accuracy"],
        ),
        row(
            "global weight (grid of 13)",
            start["baseline_validation_loss"],
            start["baseline_test_accuracy"],
        ),
    ]
    for name, solver in solvers.items():
        (x, y), seconds = timed_run(bench, solver, NUM_STEPS)
        metrics = bench.evaluate(x, y)
        rows.append(
            row(
                name,
                metrics["validation_loss"],
                metrics["refit_test_accuracy"],
                seconds,
            )
        )
    print(
        f"logreg_hpo (breast cancer), {NUM_STEPS} outer steps, {jnp.result_type(float)}"
    )
    print(format_table(rows))


if __name__ == "__main__":
    main()
