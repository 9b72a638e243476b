"""Lower-level iterations shared by the solvers that take inner gradient steps."""

from typing import Any

import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import optax
from jaxtyping import Array, PRNGKeyArray, PyTree

from ._data import AbstractData
from ._misc import tree_norm
from ._problem import apply_project_y


def default_optimizer(optimizer: optax.GradientTransformation | None, lr: float):
    """`optimizer` if given, else plain gradient descent with step `lr`."""
    return optimizer if optimizer is not None else optax.sgd(lr)


def inner_steps(
    problem: Any,
    optimizer: optax.GradientTransformation,
    x: PyTree[Array],
    y: PyTree[Array],
    opt_state: Any,
    data: AbstractData,
    key: PRNGKeyArray,
    num_steps: int,
    first_draw: Array,
) -> tuple[PyTree[Array], Any]:
    """`num_steps` (projected) optimizer steps on $g(x, \\cdot)$, each on a fresh lower
    batch; differentiable in `x` (used as is by unrolled differentiation)."""

    def body(k, carry):
        y, opt_state = carry
        batch = data.lower_batch(jr.fold_in(key, k), first_draw + k)
        grad = jax.grad(problem.lower, argnums=1)(x, y, batch)
        updates, opt_state = optimizer.update(grad, opt_state, y)
        return apply_project_y(problem, x, optax.apply_updates(y, updates)), opt_state

    return lax.fori_loop(0, num_steps, body, (y, opt_state))


def inner_steps_until(
    problem: Any,
    optimizer: optax.GradientTransformation,
    x: PyTree[Array],
    y: PyTree[Array],
    opt_state: Any,
    batch: Any,
    max_steps: int,
    tol: float,
) -> tuple[PyTree[Array], Any]:
    """Deterministic optimizer steps until $\\|\\Phi(x, y)\\| \\le$ `tol` or `max_steps`."""
    condition = problem.condition

    def cond(carry):
        y, _, k = carry
        return (k < max_steps) & (tree_norm(condition(x, y, batch)) > tol)

    def body(carry):
        y, opt_state, k = carry
        grad = jax.grad(problem.lower, argnums=1)(x, y, batch)
        updates, opt_state = optimizer.update(grad, opt_state, y)
        return apply_project_y(problem, x, optax.apply_updates(y, updates)), opt_state, k + 1

    y, opt_state, _ = lax.while_loop(cond, body, (y, opt_state, jnp.array(0)))
    return y, opt_state
