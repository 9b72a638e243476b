"""Per-feature L2 regularisation of logistic regression on the breast-cancer data.

Runs several solvers on `bl.problems.logreg_hpo` and prints the validation loss F(x)
and the test accuracy of the model refitted by L-BFGS at the learned x (comparable
across solvers), and the wall time of the run (compilation included), next to the
best single global L2 weight chosen by grid search.

    python examples/logreg_hpo.py
"""

import time

import jax
import jax.numpy as jnp

import bilevel as bl


NUM_STEPS = 300


def timed_run(bench, solver):
    start = time.perf_counter()
    state, _ = bl.run(bench.problem, solver, bench.x0, bench.y0, bench.data, NUM_STEPS)
    state = jax.block_until_ready(state)
    return solver.params(state), time.perf_counter() - start


def print_table(rows):
    columns = list(rows[0])
    cells = [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in r.values()] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


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
        "ImplicitDiff": bl.solvers.ImplicitDiff(inner_steps=20, inner_lr=0.2, outer_lr=10.0),
        "Unrolled": bl.solvers.Unrolled(inner_steps=20, inner_lr=0.2, outer_lr=10.0),
        "VPBGD": bl.solvers.VPBGD(penalty=10.0, x_lr=1.0, y_lr=0.02, z_lr=0.2, z_steps=10),
        "F2SA": bl.solvers.F2SA(
            penalty=10.0, penalty_growth=0.0, y_lr=0.02, y_lr_decay=0.0, z_lr=0.2,
            z_lr_decay=0.0, x_ratio=50.0,
        ),
    }
    start = bench.evaluate(bench.x0, bench.y0)
    rows = [
        row("x0 (every weight 1)", start["validation_loss"], start["refit_test_accuracy"]),
        row(
            "global weight (grid of 13)",
            start["baseline_validation_loss"],
            start["baseline_test_accuracy"],
        ),
    ]
    for name, solver in solvers.items():
        (x, y), seconds = timed_run(bench, solver)
        metrics = bench.evaluate(x, y)
        rows.append(
            row(name, metrics["validation_loss"], metrics["refit_test_accuracy"], seconds)
        )
    print(f"logreg_hpo (breast cancer), {NUM_STEPS} outer steps, {jnp.result_type(float)}")
    print_table(rows)


if __name__ == "__main__":
    main()
