r"""Optimality conditions $\Phi(x, y) = 0$ characterising the lower-level solution.

Implicit differentiation needs a map $\Phi$ whose zero is $y^*(x)$; the IFT then gives
$\partial y^* = -(\partial_y \Phi)^{-1} \partial_x \Phi$ (Blondel et al., 2022,
"Efficient and Modular Implicit Differentiation", NeurIPS). Fixed-point maps $T$ are
written in the "positive" root form $\Phi = y - T(x, y)$ so that $\partial_y\Phi =
I - \partial_y T$, whose spectrum lies in the right half-plane when $T$ is a contraction.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from ._misc import tree_sub


class OptimalityCondition(eqx.Module):
    r"""A map $\Phi(x, y, *args)$, zero at the lower-level solution, with the structure
    of its Jacobian $\partial_y\Phi$ declared so a suitable linear solver can be chosen.

    **Fields:**

    - `fn`: `fn(x, y, *args) -> pytree like y`.
    - `symmetric`: whether $\partial_y\Phi$ is symmetric (true for a gradient map).
    - `positive_semidefinite`: whether $\partial_y\Phi \succeq 0$ (a gradient map of a
      lower objective convex in $y$). With both tags the default solver is CG.
    """

    fn: Callable[..., PyTree[Array]]
    symmetric: bool = eqx.field(static=True, default=False)
    positive_semidefinite: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        if not callable(self.fn):
            raise TypeError(f"OptimalityCondition: `fn` must be callable, got {self.fn!r}")
        if self.positive_semidefinite and not self.symmetric:
            raise ValueError(
                "OptimalityCondition: `positive_semidefinite=True` needs `symmetric=True`"
            )

    def __call__(self, x: PyTree, y: PyTree, *args: Any) -> PyTree[Array]:
        return self.fn(x, y, *args)


def as_condition(optimality: Callable | OptimalityCondition) -> OptimalityCondition:
    """Wrap a plain callable as an untagged (general, non-symmetric) condition."""
    if isinstance(optimality, OptimalityCondition):
        return optimality
    if not callable(optimality):
        raise TypeError(f"`optimality` must be callable, got {type(optimality).__name__}")
    return OptimalityCondition(optimality)


def stationarity_condition(lower: Callable[..., Array]) -> OptimalityCondition:
    r"""$\Phi(x, y) = \nabla_y g(x, y)$ for an unconstrained smooth lower level.

    $\partial_y\Phi = \nabla^2_{yy} g$ is symmetric, and positive semidefinite at a
    minimiser of a convex $g$; it is tagged so (CG by default). For a non-convex lower
    level whose iterate may be a saddle, pass an explicit `lx.GMRES` solver instead.
    """
    return OptimalityCondition(
        _Stationarity(lower), symmetric=True, positive_semidefinite=True
    )


def is_stationarity_of(optimality: Callable, lower: Callable) -> bool:
    """Whether `optimality` is $\\nabla_y g$ for this `lower` (whatever its tags)."""
    fn = optimality.fn if isinstance(optimality, OptimalityCondition) else optimality
    return isinstance(fn, _Stationarity) and fn.lower is lower


def projected_gradient_condition(
    lower: Callable[..., Array], project_y: Callable, step: float = 1.0
) -> OptimalityCondition:
    r"""$\Phi(x, y) = y - P_Y(y - \eta \nabla_y g(x, y))$ for $\min_{y \in Y} g$.

    The fixed points do not depend on $\eta > 0$; $\eta$ only affects the conditioning of
    $\partial_y\Phi$ (use $\eta \le 1/L$). The Jacobian is not symmetric in general:
    GMRES by default.
    """
    return OptimalityCondition(_ProjectedGradient(lower, project_y, step))


def proximal_gradient_condition(
    smooth: Callable[..., Array], prox: Callable, step: float = 1.0
) -> OptimalityCondition:
    r"""$\Phi(x, y) = y - \mathrm{prox}_{\eta r(x, \cdot)}(y - \eta\nabla_y s(x, y))$ for
    $\min_y s(x, y) + r(x, y)$.

    `prox(x, v, step)` returns $\arg\min_u \frac12\|u - v\|^2 + \text{step}\cdot r(x, u)$;
    it may depend on $x$ (e.g. an $\ell_1$ weight), and derivatives flow through it.
    """
    return OptimalityCondition(_ProximalGradient(smooth, prox, step))


def kkt_condition(
    lower: Callable[..., Array], constraints: Callable[..., Array]
) -> OptimalityCondition:
    r"""KKT conditions of $\min_y g(x, y)$ s.t. $h(x, y) \le 0$, in the unknown
    $(y, \lambda)$:

    $\Phi(x, (y, \lambda)) = (\nabla_y g + \partial_y h^\top \lambda,\; \lambda \odot h)$.

    Dual feasibility is dropped (it holds locally). The Jacobian is invertible under
    LICQ, strict complementarity and second-order sufficiency; it is not symmetric
    (GMRES by default). The solution passed in must be the pair `(y, multipliers)`.
    """
    return OptimalityCondition(_KKT(lower, constraints))


class _Stationarity(eqx.Module):
    lower: Callable

    def __call__(self, x, y, *args):
        return jax.grad(self.lower, argnums=1)(x, y, *args)


class _ProjectedGradient(eqx.Module):
    lower: Callable
    project_y: Callable
    step: float

    def __call__(self, x, y, *args):
        grad = jax.grad(self.lower, argnums=1)(x, y, *args)
        moved = jtu.tree_map(lambda u, g: u - self.step * g, y, grad)
        return tree_sub(y, self.project_y(moved))


class _ProximalGradient(eqx.Module):
    smooth: Callable
    prox: Callable
    step: float

    def __call__(self, x, y, *args):
        grad = jax.grad(self.smooth, argnums=1)(x, y, *args)
        moved = jtu.tree_map(lambda u, g: u - self.step * g, y, grad)
        return tree_sub(y, self.prox(x, moved, self.step))


class _KKT(eqx.Module):
    lower: Callable
    constraints: Callable

    def __call__(self, x, primal_dual, *args):
        y, multipliers = primal_dual
        values, h_vjp = jax.vjp(lambda v: self.constraints(x, v), y)
        if jnp.ndim(values) != 1:
            raise ValueError(
                "kkt_condition: `constraints(x, y)` must return a 1-D array, got shape "
                f"{jnp.shape(values)}"
            )
        (constraint_term,) = h_vjp(multipliers)
        grad = jax.grad(self.lower, argnums=1)(x, y, *args)
        stationarity = jtu.tree_map(jnp.add, grad, constraint_term)
        return stationarity, multipliers * values
