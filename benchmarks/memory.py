"""Memory of one outer step as the number of inner steps K grows.

XLA's memory analysis of the compiled `solver.step` (temporary buffers, excluding the
arguments and outputs) on `bl.problems.logreg_hpo` (logistic regression, 200 training
samples, 30 features; a non-quadratic lower level, so the backward pass through the
inner loop needs the iterates): ImplicitDiff differentiates nothing through its inner
loop, so its memory should not depend on K; Unrolled stores every inner step's
intermediates for the backward pass (memory grows like K), and `checkpoint=True` only
the per-step carries.
"""

import jax
import jax.random as jr
from _timing import print_table

import bilevel as bl


STEPS = (10, 100, 1000, 10000)
MIB = 2**20


def temporary_mib(bench, solver) -> float:
    """Temporary memory of the compiled step, in MiB."""
    state = solver.init(bench.problem, bench.x0, bench.y0, jr.PRNGKey(0))
    step = jax.jit(
        lambda state, key: solver.step(bench.problem, state, bench.data, key)
    )
    compiled = step.lower(state, jr.PRNGKey(1)).compile()
    return compiled.memory_analysis().temp_size_in_bytes / MIB


def table():
    bench = bl.problems.logreg_hpo()
    solvers = {
        "ImplicitDiff": lambda k: bl.solvers.ImplicitDiff(inner_steps=k),
        "Unrolled": lambda k: bl.solvers.Unrolled(inner_steps=k),
        "Unrolled(checkpoint=True)": lambda k: bl.solvers.Unrolled(
            inner_steps=k, checkpoint=True
        ),
    }
    rows = []
    for name, make in solvers.items():
        row = {"solver": name}
        for k in STEPS:
            row[f"K={k} MiB"] = temporary_mib(bench, make(k))
        rows.append(row)
    print_table(
        "temporary memory of one compiled outer step (XLA memory analysis), logreg_hpo "
        "(float32), K inner steps",
        rows,
    )


if __name__ == "__main__":
    table()
