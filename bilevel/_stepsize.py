r"""Curvature estimates from which default step sizes are derived.

A default step must follow the problem's scale: multiplying $g$ by $s$ multiplies the
lower curvature $L_g$ by $s$, and a step $1/L_g$ keeps gradient descent on $g$ exactly
as fast in iterations. The estimates here use Hessian-vector products only (a few power
iterations), so they cost a handful of gradient evaluations.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from jaxtyping import Array, PRNGKeyArray, PyTree, Scalar

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


# --------------------------------------------------------------------------------------
# penalty family (Penalty, VPBGD, F2SA): tracked curvature and adaptive outer steps


class PowerIteration(eqx.Module):
    """A warm-started power iteration: the current estimate of $\\|A\\|_2$ and the unit
    vector it came from, carried in a solver state so that a slowly changing operator
    is tracked with one product per step."""

    norm: Scalar
    vector: PyTree[Array]


def start_power_iteration(key: PRNGKeyArray, like: PyTree[Array]) -> PowerIteration:
    """A random unit start vector shaped like `like` and the estimate 0."""
    vector = random_direction(key, like)
    zero = jnp.zeros((), jnp.result_type(*jtu.tree_leaves(like)))
    return PowerIteration(zero, vector)


def continue_power_iteration(
    matvec: Callable[[PyTree], PyTree], estimate: PowerIteration, num_iters: Any
) -> PowerIteration:
    """`num_iters` more power iterations from `estimate` (a traced count is allowed:
    under `jax.vmap` all runs share the count, so no run pays for another's)."""

    def iterate(_, current: PowerIteration) -> PowerIteration:
        image = matvec(current.vector)
        norm = tree_norm(image)
        divisor = jnp.where(norm > 0, norm, jnp.ones_like(norm))
        return PowerIteration(norm, tree_scale(1 / divisor, image))

    result = lax.fori_loop(0, num_iters, iterate, estimate)
    return lax.stop_gradient(result)


def hessian_product(
    fn: Callable[[PyTree], Scalar], point: PyTree[Array]
) -> Callable[[PyTree], PyTree]:
    r"""$v \mapsto \nabla^2 \mathrm{fn}(\text{point})\, v$ (forward over reverse)."""
    grad = jax.grad(fn)
    return lambda v: jax.jvp(grad, (point,), (v,))[1]


class SecantStep(eqx.Module):
    """State of the adaptive step of Malitsky and Mishchenko: the last step size, the
    ratio of the last two, and the last point and direction."""

    lr: Scalar
    ratio: Scalar
    point: PyTree[Array]
    direction: PyTree[Array]


def start_secant_step(point: PyTree[Array]) -> SecantStep:
    """Before the first step: no previous point (its fields are placeholders)."""
    zero = jnp.zeros((), jnp.result_type(*jtu.tree_leaves(point)))
    zeros = jtu.tree_map(jnp.zeros_like, point)
    return SecantStep(zero, jnp.ones_like(zero), point, zeros)


def secant_step(
    state: SecantStep,
    point: PyTree[Array],
    direction: PyTree[Array],
    first_lr: Scalar,
    first: Any,
    reliable: Any = True,
) -> tuple[Scalar, SecantStep]:
    r"""The step size of adaptive gradient descent without descent (Malitsky and
    Mishchenko, ICML 2020) for the direction field $d$ at $x_k$:

    $\alpha_k = \min\big(\sqrt{1 + \theta_{k-1}}\,\alpha_{k-1},\;
    \|x_k - x_{k-1}\| / (2\|d_k - d_{k-1}\|)\big)$, $\theta_k = \alpha_k/\alpha_{k-1}$,

    i.e. half the inverse of the local curvature seen along the last step, allowed to
    grow by at most $\sqrt{1 + \theta}$ per step. Invariant to scaling the objective;
    meant for exact (deterministic) directions. `first_lr` is used when `first` is
    true ($\theta_0 = 1$); a step that cannot be measured (no move, or no change of
    $d$) only grows the previous one. When `reliable` is false (the caller knows that
    $d_k$ is too inexact for its secant to mean anything, e.g. an inner solve that
    lags behind), the previous step is halved instead.
    """
    moved = tree_norm(tree_sub(point, state.point))
    change = tree_norm(tree_sub(direction, state.direction))
    grown = jnp.sqrt(1 + state.ratio) * state.lr
    measurable = (moved > 0) & (change > 0)
    secant = moved / (2 * jnp.where(measurable, change, jnp.ones_like(change)))
    lr = jnp.where(measurable, jnp.minimum(grown, secant), grown)
    lr = jnp.where(reliable, lr, state.lr / 2)
    lr = jnp.where(first, first_lr, lr)
    ratio = jnp.where(first, jnp.ones_like(lr), lr / state.lr)
    lr = lax.stop_gradient(lr)
    return lr, SecantStep(lr, lax.stop_gradient(ratio), point, direction)
