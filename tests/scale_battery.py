"""The scale battery of the default step sizes: `bl.problems.quadratic(4, 10,
lower_condition=20, lower_scale=s, upper_scale=t)` for several (s, t), plus the stiff
member (lower Hessian eigenvalues in [1, 50], s = t = 1), as ONE problem whose scales
and rows are data, so that a solver runs every member in one compiled, vmapped call.

`check_family` verifies that each member is exactly the registry's quadratic with those
scales (the family is a re-parametrisation, not a different problem)."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import bilevel as bl


# (s, t) pairs: all four extremes of {0.02, 1, 50}^2, the unit pair and two mixed ones.
PAIRS = ((0.02, 0.02), (0.02, 1.0), (0.02, 50.0), (1.0, 1.0), (50.0, 0.02),
         (50.0, 1.0), (50.0, 50.0))  # fmt: skip
STIFF = (1.0, 1.0, 50.0)  # (s, t, lower_condition): eigenvalues of the Hessian [1, 50]
MEMBERS = tuple((s, t, 20.0) for s, t in PAIRS) + (STIFF,)
DIM_X, DIM_Y = 4, 10


def quadratic(dtype, **options):
    """`bl.problems.quadratic(DIM_X, DIM_Y, **options)` built in `dtype`."""
    # Rank promotion allowed while building: `lower_condition` scales rows by a
    # broadcast product, which the test configuration's "raise" rejects.
    with jax.enable_x64(dtype == jnp.float64), jax.numpy_rank_promotion("allow"):
        return bl.problems.quadratic(DIM_X, DIM_Y, **options)


def quadratics(dtype) -> dict:
    """The registry quadratics (unit scales) with condition numbers 20 and 50, built in
    `dtype` (they share the coupling and target: same seed)."""
    return {k: quadratic(dtype, lower_condition=k) for k in (20, 50)}


def family(dtype):
    """`(benches, problem, data)`: `data` stacks the members along a leading axis."""
    benches = quadratics(dtype)
    base = benches[20].problem

    def lower(x, y, batch):
        return batch["s"] * base.lower(x, y, batch["rows"])

    def upper(x, y, batch):
        return batch["t"] * base.upper(x, y, None)

    s, t, kappa = (jnp.asarray([m[i] for m in MEMBERS], dtype) for i in range(3))
    rows = jnp.stack([benches[int(k)].data.lower for _, _, k in MEMBERS])
    data = bl.FullBatch(upper={"t": t}, lower={"rows": rows, "s": s})
    return benches, bl.BilevelProblem(upper, lower), data


def member(data, i):
    """The batch data of member `i` (unstacked)."""
    return jax.tree_util.tree_map(lambda u: u[i], data)


def check_family(dtype=jnp.float64, rtol=1e-12) -> None:
    """Each member's objectives equal `bl.problems.quadratic(..., lower_scale=s,
    upper_scale=t)` at a random point (values and gradients)."""
    _, problem, data = family(dtype)
    kx, ky = jr.split(jr.PRNGKey(3))
    x, y = jr.normal(kx, (DIM_X,), dtype), jr.normal(ky, (DIM_Y,), dtype)
    for i, (s, t, kappa) in enumerate(MEMBERS):
        bench = quadratic(dtype, lower_condition=kappa, lower_scale=s, upper_scale=t)
        batch = member(data, i)
        pairs = [
            (problem.lower, batch.lower, bench.problem.lower, bench.data.lower),
            (problem.upper, batch.upper, bench.problem.upper, None),
        ]
        for ours, our_batch, theirs, their_batch in pairs:
            mine = jax.value_and_grad(ours, argnums=(0, 1))(x, y, our_batch)
            ref = jax.value_and_grad(theirs, argnums=(0, 1))(x, y, their_batch)
            leaves = jax.tree_util.tree_leaves
            for a, b in zip(leaves(mine), leaves(ref)):
                np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol)


def run_family(solver, dtype, num_steps: int):
    """Run `solver` with its defaults on every member at once: `(x, history)`, `x`
    stacked by member, the history's arrays of shape (members, steps)."""
    benches, problem, data = family(dtype)
    x0, y0 = benches[20].x0, benches[20].y0

    def one(batch):
        key = jr.PRNGKey(0)
        state, history = bl.run(problem, solver, x0, y0, batch, num_steps, key)
        return solver.params(state)[0], history

    return jax.vmap(one)(data)


def relative_gaps(x, dtype) -> np.ndarray:
    r"""$(F(x_i) - F^*) / (F(x_0) - F^*)$ per member, with $F$ of unit scales (the scale
    $t$ cancels in the ratio)."""
    benches = quadratics(dtype)
    gaps = []
    for i, (_, _, kappa) in enumerate(MEMBERS):
        bench = benches[int(kappa)]

        def value(z, bench=bench):
            return float(bench.evaluate(z, bench.y0)["hyper_objective"])

        best, start = value(bench.solution), value(bench.x0)
        gaps.append((value(x[i]) - best) / (start - best))
    return np.asarray(gaps)
