"""Test problems shared by the penalty-family tests: `bl.problems.quadratic` with its
constants carried in the batch, so that one compiled function serves every scale
(lower objective times s, upper times t) and either floating dtype."""

import jax
import jax.numpy as jnp

import bilevel as bl


def quadratic_constants(bench) -> dict:
    """Rows a_i, coupling B and target c of a `bl.problems.quadratic` bench built with
    the default `lower_reg=1`, `upper_reg=0.1` and scales 1, read off its functions by
    exact differentiation (g is bilinear in (x, y) plus quadratic terms, f is
    quadratic)."""
    rows = bench.data.lower
    zero_x, zero_y = jnp.zeros_like(bench.x0), jnp.zeros_like(bench.y0)
    grad_y = jax.grad(bench.problem.lower, argnums=1)
    coupling = -jax.jacfwd(grad_y, argnums=0)(zero_x, zero_y, rows)
    target = -jax.grad(bench.problem.upper, argnums=1)(zero_x, zero_y, None)
    return {"rows": rows, "coupling": coupling, "target": target}


def _upper(x, y, batch):
    return batch["t"] * (0.5 * jnp.sum((y - batch["target"]) ** 2) + 0.05 * x @ x)


def _lower(x, y, batch):
    fit = 0.5 * jnp.mean((batch["rows"] @ y) ** 2) + 0.5 * y @ y
    return batch["s"] * (fit - y @ (batch["coupling"] @ x))


CARRIED_QUADRATIC = bl.BilevelProblem(_upper, _lower)
r"""$t\,[\frac12\|y - c\|^2 + \frac{0.1}{2}\|x\|^2]$ over
$s\,[\frac{1}{2n}\sum_i (a_i^\top y)^2 + \frac12\|y\|^2 - y^\top Bx]$,
everything from the batch of `carried_data`."""


def carried_data(constants: dict, dtype, s=1.0, t=1.0) -> bl.FullBatch:
    """The same batch for both levels: the constants and the scales, in `dtype`."""
    batch = {**constants, "s": s, "t": t}
    return bl.FullBatch(jax.tree_util.tree_map(lambda u: jnp.asarray(u, dtype), batch))
