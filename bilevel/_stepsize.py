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

from ._misc import tree_axpy, tree_dot, tree_norm, tree_scale, tree_sub


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
# SLBAMM / BOREP / LVHBA


def hessian_norm(
    fn: Callable[[PyTree[Array]], Scalar],
    primals: PyTree[Array],
    key: PRNGKeyArray,
    num_iters: int = 20,
) -> Scalar:
    r"""Power-iteration estimate of $\|\nabla^2 \mathrm{fn}(\mathrm{primals})\|_2$ for a
    scalar function of one pytree (forward-over-reverse Hessian-vector products)."""
    _, hvp = jax.linearize(jax.grad(fn), primals)
    return operator_norm(hvp, primals, key, num_iters)


def spectrum_bounds(
    matvec: Callable[[PyTree], PyTree],
    like: PyTree[Array],
    key: PRNGKeyArray,
    num_iters: int = 20,
) -> tuple[Scalar, Scalar]:
    r"""Estimates of the largest and smallest eigenvalues $L$ and $m$ of a symmetric
    positive semidefinite operator: $L$ by power iteration, then $m = L -
    \|L I - A\|_2$ by power iteration on the shifted operator. Both approach from the
    inside of the spectrum ($L$ from below, $m$ from above), so $L/m$ underestimates
    the condition number when the iterations have not converged."""
    first, second = jr.split(key)
    largest = operator_norm(matvec, like, first, num_iters)
    shifted = operator_norm(
        lambda v: tree_sub(tree_scale(largest, v), matvec(v)), like, second, num_iters
    )
    return largest, jnp.maximum(largest - shifted, 0)


def jacobian_norm(
    fn: Callable[[PyTree[Array]], PyTree[Array]],
    primals: PyTree[Array],
    key: PRNGKeyArray,
    num_iters: int = 20,
) -> Scalar:
    r"""Power-iteration estimate of $\|\partial\,\mathrm{fn}(\mathrm{primals})\|_2$, the
    largest singular value of the Jacobian, as $\sqrt{\|J^\top J\|_2}$."""
    _, jvp = jax.linearize(fn, primals)
    vjp = jax.linear_transpose(jvp, primals)
    return jnp.sqrt(operator_norm(lambda v: vjp(jvp(v))[0], primals, key, num_iters))


def hyper_curvature(
    upper: Callable[[PyTree[Array], PyTree[Array]], Scalar],
    gradient: Callable[[PyTree[Array], PyTree[Array]], PyTree[Array]],
    x: PyTree[Array],
    y: PyTree[Array],
    key: PRNGKeyArray,
    num_iters: int = 10,
    max_steps: int = 50,
) -> Scalar:
    r"""Estimate of the curvature $L_\Phi = \|\nabla^2\Phi(x)\|_2$ of the
    hyper-objective $\Phi(x) = F(x, y^*(x))$, $G(x, y^*(x)) = 0$ (`upper` $= F$,
    `gradient` $= G$, the gradient in $y$ of a convex lower objective), from $(x, y)$.

    It is taken at the Newton point $\hat y = y - (\partial_y G)^{-1} G(x, y)$, which is
    $y^*(x)$ when $G$ is affine in $y$ and closer to it than $y$ otherwise (at an
    arbitrary $y$ the sensitivity of $y^*$ can vanish, e.g. $y = 0$ for a weight decay
    $e^x y$). With the sensitivity $J = -(\partial_y G)^{-1}\partial_x G$ of $y^*$ at
    $(x, \hat y)$ and the adjoint $v = (\partial_y G)^{-1}\nabla_y F$, the Hessian of
    $\Phi$ is the reduced Hessian of the Lagrangian $\mathcal L = F - \langle G,
    v\rangle$,
    $\nabla^2\Phi = \begin{pmatrix} I \\ J \end{pmatrix}^\top \nabla^2\mathcal L
    \begin{pmatrix} I \\ J \end{pmatrix}$ (exact at $\hat y = y^*(x)$), whose norm
    is estimated by `num_iters` power iterations. Each product takes two
    conjugate-gradient solves with $\partial_y G$ (at most `max_steps` Hessian-vector
    products each, relative tolerance $10^{-3}$: an estimate, not a certificate), so
    $\partial_y G$ must be symmetric positive semidefinite and nonsingular on the range
    of $\partial_x G$ and of $\nabla_y F$ (a direction of non-positive curvature ends a
    solve early).
    """

    def solver_at(y):
        residual, hvp = jax.linearize(lambda v: gradient(x, v), y)
        return residual, lambda rhs: _conjugate_gradient(hvp, rhs, max_steps)

    residual, solve = solver_at(y)
    y = tree_sub(y, solve(residual))
    _, solve = solver_at(y)
    _, cross = jax.linearize(lambda u: gradient(u, y), x)
    cross_t = jax.linear_transpose(cross, x)
    adjoint = solve(jax.grad(upper, argnums=1)(x, y))

    def lagrangian(xy):
        return upper(*xy) - tree_dot(gradient(*xy), adjoint)

    _, upper_hvp = jax.linearize(jax.grad(lagrangian), (x, y))

    def gauss_newton(w):
        direction = (w, tree_scale(-1.0, solve(cross(w))))
        h_x, h_y = upper_hvp(direction)
        (back,) = cross_t(solve(h_y))
        return tree_sub(h_x, back)

    return operator_norm(gauss_newton, x, key, num_iters)


def _conjugate_gradient(matvec, rhs: PyTree[Array], max_steps: int) -> PyTree[Array]:
    r"""Conjugate gradients for $A u = b$ from $u = 0$, until $\|b - Au\| \le 10^{-3}
    \|b\|$, `max_steps`, or a direction of non-positive curvature. (lineax's CG declares
    a breakdown when $p^\top A p < 100\, n\, \epsilon\, \|r\|^2$, an absolute test
    that a large float32 system of small curvature fails.)"""

    def cond(carry):
        _, _, _, rr, k = carry
        return (k < max_steps) & (rr > 1e-6 * rr0)

    def body(carry):
        u, r, p, rr, k = carry
        ap = matvec(p)
        curvature = tree_dot(p, ap)
        alpha = jnp.where(curvature > 0, rr / jnp.where(curvature > 0, curvature, 1), 0)
        u = tree_axpy(alpha, p, u)
        r = tree_axpy(-alpha, ap, r)
        rr_new = tree_dot(r, r)
        beta = rr_new / jnp.where(rr > 0, rr, 1)
        k = jnp.where(curvature > 0, k + 1, max_steps)
        return u, r, tree_axpy(beta, p, r), rr_new, k

    rr0 = tree_dot(rhs, rhs)
    zeros = jtu.tree_map(jnp.zeros_like, rhs)
    u, *_ = lax.while_loop(cond, body, (zeros, rhs, rhs, rr0, 0))
    return u
