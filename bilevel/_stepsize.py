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

from ._misc import tree_norm, tree_scale


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
# Stochastic single-loop (SOBA, SABA, SRBA, MA-SOBA)


def upper_curvature(
    problem: Any,
    x: PyTree[Array],
    y: PyTree[Array],
    batch: Any,
    key: PRNGKeyArray,
    num_iters: int = 20,
) -> Scalar:
    r"""Estimate of $L_f = \|\nabla^2 f(x, y)\|_2$, the smoothness of the upper
    objective in $(x, y)$ jointly (power iteration on Hessian-vector products)."""

    def grad(xy):
        return jax.grad(lambda u: problem.upper(u[0], u[1], batch))(xy)

    _, hvp = jax.linearize(grad, (x, y))
    return operator_norm(hvp, (x, y), key, num_iters)


def single_loop_step_sizes(
    problem: Any,
    x: PyTree[Array],
    y: PyTree[Array],
    upper_batches: Any,
    lower_batches: Any,
    key: PRNGKeyArray,
    fraction: float = 0.5,
) -> tuple[Scalar, Scalar]:
    r"""Default steps of the joint $(y, v, x)$ methods: $\rho = c / L_g$ for $y$ and $v$
    and $\gamma = c / L_f$ for $x$, $c$ = `fraction`, with $L_g$ the largest lower
    curvature ([`lower_curvature`][bilevel._stepsize.lower_curvature]) and $L_f$ the
    largest upper curvature (`upper_curvature`) at $(x, y)$ over the given batches
    (stacked along a leading axis, one per draw).

    $y$ and $v$ take gradient steps on $g$ and on $\frac12 v^\top\nabla^2_{yy} g\, v +
    v^\top\nabla_y f$, both $L_g$-smooth on every batch probed; the hyper-objective
    scales like $f$ (scaling $g$ changes neither $y^*(x)$ nor $\nabla^2_{xy} g\,v^*$),
    so the $x$ step follows $1/L_f$. Multiplying $g$ by $s$ or $f$ by $t$ leaves every
    iteration unchanged. The default $c = 1/2$ keeps a margin below $1/L$, beyond which
    variance-reduced steps on small batches diverge (power iteration also
    underestimates $L$ slightly). A zero curvature (e.g. an upper objective without
    second-order terms) falls back on the other level's.
    """
    lower_key, upper_key = jr.split(key)
    leaves = jtu.tree_leaves((upper_batches, lower_batches))
    num = jnp.shape(leaves[0])[0] if leaves else 1

    def largest(curvature, batches, key):
        keys = jr.split(key, num)
        values = jax.vmap(lambda b, k: curvature(problem, x, y, b, k))(batches, keys)
        return jnp.max(values)

    lower = largest(lower_curvature, lower_batches, lower_key)
    upper = largest(upper_curvature, upper_batches, upper_key)
    lower = jnp.where(lower > 0, lower, jnp.where(upper > 0, upper, 1.0))
    upper = jnp.where(upper > 0, upper, lower)
    return fraction / lower, fraction / upper
