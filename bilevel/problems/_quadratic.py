"""Strongly convex quadratic bilevel problem with closed-form answers (test oracle)."""

import jax.numpy as jnp
import jax.random as jr
import numpy as np

from .._data import FullBatch, Minibatch
from .._problem import BilevelProblem
from ._benchmark import Benchmark


def quadratic(
    dim_x: int = 5,
    dim_y: int = 10,
    seed: int = 0,
    *,
    num_samples: int | None = None,
    batch_size: int | None = None,
    lower_reg: float = 1.0,
    upper_reg: float = 0.1,
    lower_condition: float | None = None,
    lower_scale: float = 1.0,
    upper_scale: float = 1.0,
) -> Benchmark:
    r"""Quadratic bilevel problem with a finite-sum lower level:

    $g(x, y) = s\,[\frac{1}{2n}\sum_{i=1}^n (a_i^\top y)^2 + \frac{\mu}{2}\|y\|^2 -
    y^\top Bx]$, $f(x, y) = t\,[\frac12\|y - c\|^2 + \frac{\lambda}{2}\|x\|^2]$.

    With $A = \frac1n\sum_i a_i a_i^\top + \mu I$ and $M = A^{-1}B$: $y^*(x) = Mx$,
    $\nabla F(x) = t\,[M^\top(Mx - c) + \lambda x]$ and
    $x^* = (M^\top M + \lambda I)^{-1}M^\top c$ are exact; none depends on $s$, and
    only $\nabla F$ on $t$ (the scale battery of the step-size tests).

    **Arguments:**

    - `dim_x`, `dim_y`, `seed`: sizes and the seed of $a_i$, $B$, $c$.
    - `num_samples`: $n$ rows $a_i$ (default `2 * dim_y`).
    - `batch_size`: minibatch size for the lower level (default: full batch).
    - `lower_reg`: $\mu > 0$; `upper_reg`: $\lambda \ge 0$.
    - `lower_condition`: if given, the rows are built so that $A$ has eigenvalues
      log-spaced on $[\mu, \mu\kappa]$, $\kappa$ = `lower_condition` (default: Gaussian
      rows $a_i$).
    - `lower_scale`, `upper_scale`: $s > 0$ and $t > 0$.

    The lower batch is the array of rows $a_i$; the upper level has no data.
    """
    if dim_x < 1 or dim_y < 1:
        raise ValueError(
            f"quadratic: dims must be >= 1, got dim_x={dim_x}, dim_y={dim_y}"
        )
    if lower_reg <= 0 or upper_reg < 0:
        raise ValueError("quadratic: need lower_reg > 0 and upper_reg >= 0")
    if lower_scale <= 0 or upper_scale <= 0:
        raise ValueError("quadratic: need lower_scale > 0 and upper_scale > 0")
    if lower_condition is not None and lower_condition < 1:
        raise ValueError(
            f"quadratic: lower_condition must be >= 1, got {lower_condition}"
        )
    num_samples = 2 * dim_y if num_samples is None else num_samples
    k_rows, k_b, k_c = jr.split(jr.PRNGKey(seed), 3)
    if lower_condition is None:
        rows = jr.normal(k_rows, (num_samples, dim_y))
    else:
        rows = _rows_with_spectrum(
            k_rows, num_samples, dim_y, lower_reg, lower_condition
        )
    coupling = jr.normal(k_b, (dim_y, dim_x)) / np.sqrt(dim_x)
    target = jr.normal(k_c, (dim_y,))

    def lower(x, y, batch):
        value = 0.5 * jnp.mean((batch @ y) ** 2) + 0.5 * lower_reg * y @ y
        return lower_scale * (value - y @ (coupling @ x))

    def upper(x, y, batch):
        loss = 0.5 * jnp.sum((y - target) ** 2) + 0.5 * upper_reg * x @ x
        return upper_scale * loss

    hessian = rows.T @ rows / num_samples + lower_reg * jnp.eye(dim_y)
    response = jnp.linalg.solve(hessian, coupling)

    def lower_solution(x):
        return response @ x

    def hypergradient(x):
        return upper_scale * (response.T @ (response @ x - target) + upper_reg * x)

    solution = jnp.linalg.solve(
        response.T @ response + upper_reg * jnp.eye(dim_x), response.T @ target
    )

    def evaluate(x, y):
        y_star = lower_solution(x)
        return {
            "hyper_objective": upper(x, y_star, None),
            "x_error": jnp.linalg.norm(x - solution),
            "y_error": jnp.linalg.norm(y - y_star),
        }

    if batch_size is None:
        data = FullBatch(upper=None, lower=rows)
    else:
        data = Minibatch(upper=None, lower=rows, batch_size=batch_size)
    return Benchmark(
        name="quadratic",
        problem=BilevelProblem(upper, lower),
        x0=jnp.zeros(dim_x),
        y0=jnp.zeros(dim_y),
        data=data,
        evaluate=evaluate,
        solution=solution,
        lower_solution=lower_solution,
        hypergradient=hypergradient,
        metric="hyper_objective",
        maximize=False,
    )


def _rows_with_spectrum(key, num_samples: int, dim: int, reg: float, condition: float):
    r"""Rows $a_i$ with $\frac1n\sum_i a_i a_i^\top + \mu I$ of eigenvalues log-spaced
    on $[\mu, \mu\kappa]$ (needs $n \ge d$)."""
    if num_samples < dim:
        raise ValueError(
            f"quadratic: lower_condition needs num_samples >= dim_y, got {num_samples}"
        )
    k_left, k_right = jr.split(key)
    left, _ = jnp.linalg.qr(jr.normal(k_left, (num_samples, dim)))
    right, _ = jnp.linalg.qr(jr.normal(k_right, (dim, dim)))
    eigenvalues = reg * jnp.logspace(0.0, np.log10(condition), dim)
    singular = jnp.sqrt(num_samples * (eigenvalues - reg))
    return (left * singular) @ right.T
