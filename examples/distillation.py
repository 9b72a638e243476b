"""Dataset distillation on digits: one synthetic image per class (10 images in all).

Learns the 10 images with several solvers, for kernel ridge regression (RBF kernel,
KIP-style) and for an MLP trained on the synthetic set (implicit differentiation of a
non-convex lower level), and prints the test accuracy of a model trained from scratch
on the distilled images, next to the same model trained on a random real subset of the
same size (the starting point), and the wall time of the run (compilation included).

    python examples/distillation.py
"""

import jax.numpy as jnp
from _common import timed_run

import bilevel as bl
from bilevel.cli import format_table


def main():
    runs = {
        "krr": (
            200,
            {
                "ImplicitDiff": bl.solvers.ImplicitDiff(
                    inner_steps=20, inner_lr=0.3, outer_lr=20.0
                ),
                "Unrolled": bl.solvers.Unrolled(
                    inner_steps=20, inner_lr=0.3, outer_lr=20.0
                ),
            },
        ),
        "mlp": (
            150,
            {
                # symmetric, not definite: 20 damped Richardson steps, not GMRES
                "ImplicitDiff": bl.solvers.ImplicitDiff(
                    inner_steps=20,
                    inner_lr=0.5,
                    outer_lr=5.0,
                    linear_solver=bl.Richardson(num_steps=20, omega=0.5),
                ),
                "Unrolled": bl.solvers.Unrolled(
                    inner_steps=20, inner_lr=0.5, outer_lr=5.0
                ),
            },
        ),
    }
    rows = []
    for lower, (num_steps, solvers) in runs.items():
        bench = bl.problems.distillation(images_per_class=1, lower=lower)
        start = bench.evaluate(bench.x0, bench.y0)
        rows.append(
            {
                "lower": lower,
                "method": "random real subset",
                "steps": "-",
                "test_accuracy": float(start["baseline_test_accuracy"]),
                "wall_s": "-",
            }
        )
        for name, solver in solvers.items():
            (x, y), seconds = timed_run(bench, solver, num_steps)
            metrics = bench.evaluate(x, y)
            rows.append(
                {
                    "lower": lower,
                    "method": name,
                    "steps": num_steps,
                    "test_accuracy": float(metrics["distilled_test_accuracy"]),
                    "wall_s": f"{seconds:.1f}",
                }
            )
    print(
        f"distillation (digits, 10 synthetic images, 500 real training images), "
        f"test accuracy of a model trained on the 10 images, {jnp.result_type(float)}"
    )
    print(format_table(rows))


if __name__ == "__main__":
    main()
