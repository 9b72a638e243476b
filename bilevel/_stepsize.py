r"""Curvature estimates from which default step sizes are derived.

A default step must follow the problem's scale: multiplying $g$ by $s$ multiplies the
lower curvature $L_g$ by $s$, and a step $1/L_g$ keeps gradient descent on $g$ exactly
as fast in iterations. The estimates here use Hessian-vector products only (a few power
iterations), so they cost a handful of gradient evaluations.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from jaxtyping import Array, PRNGKeyArray, PyTree, Scalar

from ._linear import solve_adjoint
from ._misc import tree_norm, tree_scale, tree_sub


def random_direction(key: PRNGKeyArray, like: PyTree[Array]) -> PyTree[Array]:
    """A standard normal pytree shaped like `like`, scaled to unit norm."""
    leaves, treedef = jtu.tree_flatten(like)
    keys = jr.split(key, max(len(leaves), 1))
    noise = [jr.normal(k, jnp.shape(u), jnp.result_type(u)) for k, u in zip(keys, leaves)]
    direction = jtu.tree_unflatten(treedef, noise)
    return tree_scale(1 / tree_norm(direction), direction)


def operator_norm(
    matvec: Callable[[PyTree], PyTree],
    like: PyTree[Array],
    key: PRNGKeyArray,
    num_iters: int = 20,
) -> Scalar:
    r"""Power-iteration estimate of $\|A\|_2$ for a symmetric operator $A$ given by
    `matvec` (its largest eigenvalue in absolute value).

    The estimate approaches $\|A\|_2$ from below; callers that turn it into a step size
    keep a safety margin. A zero operator gives 0.
    """

    def body(_, carry):
        v, _ = carry
        w = matvec(v)
        norm = tree_norm(w)
        safe = jnp.where(norm > 0, norm, jnp.ones_like(norm))
        return tree_scale(1 / safe, w), norm

    v0 = random_direction(key, like)
    norm0 = jnp.zeros((), jnp.result_type(*jtu.tree_leaves(like)))
    _, norm = lax.fori_loop(0, num_iters, body, (v0, norm0))
    return norm


def lower_curvature(
    problem: Any,
    x: PyTree[Array],
    y: PyTree[Array],
    batch: Any,
    key: PRNGKeyArray,
    num_iters: int = 20,
) -> Scalar:
    r"""Estimate of $L = \|\partial_y\Phi(x, y)\|_2$, the local smoothness of the lower
    objective ($\|\nabla^2_{yy} g\|_2$ for the default condition $\Phi = \nabla_y g$).

    For a condition not declared symmetric, $\sqrt{\|\partial_y\Phi^\top
    \partial_y\Phi\|_2}$.
    """
    condition = problem.condition
    _, jvp = jax.linearize(lambda v: condition(x, v, batch), y)
    if condition.symmetric:
        return operator_norm(jvp, y, key, num_iters)
    vjp = jax.linear_transpose(jvp, y)
    return jnp.sqrt(operator_norm(lambda v: vjp(jvp(v))[0], y, key, num_iters))


# -------------------------------------------------------------------------------------
# BSVRB


def hyper_hessian_product(
    problem: Any,
    x: PyTree[Array],
    y: PyTree[Array],
    direction: PyTree[Array],
    upper_batch: Any,
    lower_batch: Any,
) -> PyTree[Array]:
    r"""$\nabla^2\tilde F(x)\,d$ for the hyper-objective linearised in $y$,
    $\tilde F(x') = f(x', y + J(x' - x))$ with
    $J = -(\partial_y\Phi)^{-1}\partial_x\Phi$ at $(x, y)$:
    $\nabla^2\tilde F = [I; J]^\top\nabla^2 f\,[I; J]$, the Hessian of
    $F(x) = f(x, y^*(x))$ at $y = y^*(x)$ without the terms in the third derivatives
    of $g$ (exact when $g$ is quadratic). $d$ = `direction`.

    Two matrix-free solves with $\partial_y\Phi$ (its default solver), for a condition
    with a symmetric Jacobian such as $\Phi = \nabla_y g$.
    """
    condition = problem.condition
    _, cross_d = jax.jvp(lambda u: condition(u, y, lower_batch), (x,), (direction,))
    _, response, _, _ = solve_adjoint(condition, x, y, (lower_batch,), cross_d, None)
    grad = jax.grad(problem.upper, argnums=(0, 1))
    _, (hess_x, hess_y) = jax.jvp(
        lambda u, w: grad(u, w, upper_batch),
        (x, y),
        (direction, tree_scale(-1, response)),
    )
    _, adjoint, _, _ = solve_adjoint(condition, x, y, (lower_batch,), hess_y, None)
    _, vjp = jax.vjp(lambda u: condition(u, y, lower_batch), x)
    return tree_sub(hess_x, vjp(adjoint)[0])
