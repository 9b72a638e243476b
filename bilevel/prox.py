r"""Proximal operators $\mathrm{prox}_{\eta r}(v) = \arg\min_u \tfrac12\|u - v\|^2 +
\eta\, r(u)$ in `bilevel`'s signature `prox(strength, v, step)`.

`strength` is the regularisation weight (a scalar, an array broadcastable to each leaf,
or a pytree like `v`) and plays the role of the upper variable $x$ in
[`bilevel.proximal_gradient_condition`][], which calls `prox(x, v, step)`: pass one of
these directly when $x$ *is* the weight, or wrap it (`lambda x, v, step:
bl.prox.lasso(x["l1"], v, step)`). All are differentiable in `strength` and `v` (almost
everywhere), so hypergradients flow through the weight.

jaxopt's proxes take `(v, hyperparams, scaling)`; `bl.prox.from_jaxopt` adapts
them. The closed forms are standard (Parikh and Boyd, 2014, "Proximal Algorithms",
Foundations and Trends in Optimization, §6).
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, ArrayLike, PyTree

from ._misc import tree_dot, tree_scale
from ._projection import project_at


Strength = ArrayLike | PyTree[ArrayLike]


def _leafwise(fn: Callable, strength: Strength, v: PyTree[Array], *rest) -> PyTree:
    """`fn(strength_leaf, v_leaf, *rest)` per leaf; a pytree `strength` with the
    structure of `v` is used leaf by leaf, anything else is broadcast."""
    if jtu.tree_structure(strength) == jtu.tree_structure(v):
        return jtu.tree_map(lambda s, u: fn(s, u, *rest), strength, v)
    return jtu.tree_map(lambda u: fn(strength, u, *rest), v)


def _soft_threshold(threshold, u):
    return jnp.sign(u) * jnp.maximum(jnp.abs(u) - threshold, 0)


def lasso(strength: Strength, v: PyTree[Array], step: ArrayLike = 1.0) -> PyTree[Array]:
    r"""Soft-thresholding, the prox of $r(u) = \lambda\|u\|_1$:
    $\mathrm{sign}(v)\max(|v| - \eta\lambda, 0)$, with $\lambda$ = `strength` (applied
    coordinate-wise when it is an array or a pytree like `v`)."""
    return _leafwise(lambda s, u, eta: _soft_threshold(eta * s, u), strength, v, step)


def nonnegative_lasso(
    strength: Strength, v: PyTree[Array], step: ArrayLike = 1.0
) -> PyTree[Array]:
    r"""Prox of $\lambda\|u\|_1 + \iota_{u \ge 0}$: $\max(v - \eta\lambda, 0)$."""
    return _leafwise(lambda s, u, eta: jnp.maximum(u - eta * s, 0), strength, v, step)


def elastic_net(
    strength: tuple[Strength, Strength], v: PyTree[Array], step: ArrayLike = 1.0
) -> PyTree[Array]:
    r"""Prox of $r(u) = \lambda_1\|u\|_1 + \frac{\lambda_2}{2}\|u\|^2$, `strength` =
    $(\lambda_1, \lambda_2)$: $\mathrm{soft}(v, \eta\lambda_1) / (1 + \eta\lambda_2)$.

    jaxopt's `prox_elastic_net(v, (lam, gamma), s)` is `elastic_net((lam, lam * gamma),
    v, s)`.
    """
    l1, l2 = _pair("elastic_net", strength)
    shrunk = lasso(l1, v, step)
    return _leafwise(lambda s, u, eta: u / (1 + eta * s), l2, shrunk, step)


def nonnegative_elastic_net(
    strength: tuple[Strength, Strength], v: PyTree[Array], step: ArrayLike = 1.0
) -> PyTree[Array]:
    r"""Prox of $\lambda_1\|u\|_1 + \frac{\lambda_2}{2}\|u\|^2 + \iota_{u \ge 0}$:
    $\max(v - \eta\lambda_1, 0) / (1 + \eta\lambda_2)$."""
    l1, l2 = _pair("nonnegative_elastic_net", strength)
    shrunk = nonnegative_lasso(l1, v, step)
    return _leafwise(lambda s, u, eta: u / (1 + eta * s), l2, shrunk, step)


def ridge(strength: Strength, v: PyTree[Array], step: ArrayLike = 1.0) -> PyTree[Array]:
    r"""Prox of $r(u) = \frac{\lambda}{2}\|u\|^2$: $v / (1 + \eta\lambda)$ (the same
    map as jaxopt's `prox_ridge`)."""
    return _leafwise(lambda s, u, eta: u / (1 + eta * s), strength, v, step)


def nonnegative_ridge(
    strength: Strength, v: PyTree[Array], step: ArrayLike = 1.0
) -> PyTree[Array]:
    r"""Prox of $\frac{\lambda}{2}\|u\|^2 + \iota_{u \ge 0}$:
    $\max(v, 0) / (1 + \eta\lambda)$."""
    return _leafwise(
        lambda s, u, eta: jnp.maximum(u, 0) / (1 + eta * s), strength, v, step
    )


def group_lasso(strength: ArrayLike, v: PyTree[Array], step: ArrayLike = 1.0) -> PyTree:
    r"""Block soft-thresholding, the prox of $r(u) = \lambda\|u\|_2$ with the whole of
    `v` as one group: $\max(1 - \eta\lambda/\|v\|, 0)\, v$ (0 at $v = 0$, with a zero
    derivative there). Several groups: `jax.vmap` over a leading group axis, as with
    jaxopt's `prox_group_lasso`."""
    squared = tree_dot(v, v)
    threshold = step * strength
    active = squared > threshold**2
    # sqrt is not differentiable at 0: evaluate it only where the block survives.
    norm = jnp.sqrt(jnp.where(active, squared, 1))
    return tree_scale(jnp.where(active, 1 - threshold / norm, 0), v)


def from_projection(project: Callable) -> Callable:
    r"""The prox of the indicator of a set: `prox(x, v, step) = P(v)` (the step does not
    matter). `project` is a projection of $v$ (e.g. from `optax.projections`), or a set
    that depends on $x$ built with [`bilevel.projection`][], called with $x$."""
    if not callable(project):
        raise TypeError(f"from_projection: `project` must be callable, got {project!r}")
    return _FromProjection(project)


def from_jaxopt(prox: Callable, hyperparams: Callable | None = None) -> Callable:
    r"""Adapt a jaxopt-style `prox(v, hyperparams, scaling)` to `bilevel`'s
    `prox(x, v, step)`.

    `hyperparams(x)` maps the upper variable to jaxopt's hyperparameters (default: $x$
    itself). Passing a jaxopt prox unwrapped to
    [`bilevel.proximal_gradient_condition`][] raises an error, because the argument
    orders differ and the result would be silently wrong.
    """
    if not callable(prox):
        raise TypeError(f"from_jaxopt: `prox` must be callable, got {prox!r}")
    return _FromJaxopt(prox, hyperparams)


class _FromProjection(eqx.Module):
    project: Callable

    def __call__(self, x: Any, v: PyTree, step: Any = 1.0) -> PyTree:
        return project_at(self.project, x, v)


class _FromJaxopt(eqx.Module):
    prox: Callable
    hyperparams: Callable | None

    def __call__(self, x: Any, v: PyTree, step: Any = 1.0) -> PyTree:
        hyper = x if self.hyperparams is None else self.hyperparams(x)
        return self.prox(v, hyper, step)


def _pair(name: str, strength) -> tuple:
    if not isinstance(strength, tuple | list) or len(strength) != 2:
        raise TypeError(
            f"bl.prox.{name}: `strength` must be a pair (l1, l2), got {strength!r}"
        )
    return strength[0], strength[1]
