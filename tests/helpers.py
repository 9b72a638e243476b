"""Shared test helpers."""

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

import bilevel as bl


def tree_allclose(a, b, *, rtol=1e-5, atol=1e-8) -> bool:
    """Leafwise `np.allclose` on two pytrees of the same structure."""
    if jtu.tree_structure(a) != jtu.tree_structure(b):
        return False
    return all(
        np.allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)
        for u, v in zip(jtu.tree_leaves(a), jtu.tree_leaves(b))
    )


def relative_error(estimate, reference) -> float:
    """||estimate - reference|| / ||reference|| over flattened pytrees."""
    e = jnp.concatenate([jnp.ravel(u) for u in jtu.tree_leaves(estimate)])
    r = jnp.concatenate([jnp.ravel(u) for u in jtu.tree_leaves(reference)])
    return float(jnp.linalg.norm(e - r) / jnp.linalg.norm(r))


def central_difference(fn, x, direction, eps=1e-6):
    """Central finite difference of a scalar- or pytree-valued `fn` along `direction`
    (float64: error O(eps^2) + O(1e-16 / eps))."""
    plus = fn(jtu.tree_map(lambda u, d: u + eps * d, x, direction))
    minus = fn(jtu.tree_map(lambda u, d: u - eps * d, x, direction))
    return jtu.tree_map(lambda p, m: (p - m) / (2 * eps), plus, minus)


def dense_jacobian(fn, x):
    """Dense float64 Jacobian via jax.jacfwd, for small reference computations."""
    return jax.jacfwd(fn)(x)


def weight_decay_problem(target: float):
    r"""$g = e^{x_0}\|y\|^2/2 - \sum_i y_i$, $f = \|y - \text{target}\|^2/2$: every
    Hessian in $y$ is a multiple of the identity ($L_g = e^{x_0}$, $y^* = e^{-x_0}$),
    so curvature estimates are exact and follow $x$ in closed form."""
    return bl.BilevelProblem(
        lambda x, y, batch: 0.5 * jnp.sum((y - target) ** 2),
        lambda x, y, batch: 0.5 * jnp.exp(x[0]) * jnp.sum(y**2) - jnp.sum(y),
    )
