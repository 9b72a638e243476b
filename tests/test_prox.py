"""bl.prox against a brute-force argmin (an independent oracle), against jaxopt's
implementations, and their derivatives against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel as bl


V = jnp.array([-2.0, -0.3, 0.0, 0.15, 0.8, 1.7])
GRID = jnp.linspace(-3.0, 3.0, 60001)  # spacing 1e-4: argmin accurate to 1e-4


def brute_force(penalty, v, step):
    """Coordinate-wise argmin_u 0.5 (u - v)^2 + step * penalty(u) over a fine grid (the
    proxes below are separable)."""
    objective = 0.5 * (GRID[None, :] - v[:, None]) ** 2 + step * penalty(GRID)[None, :]
    return GRID[jnp.argmin(objective, axis=1)]


NONNEGATIVE = lambda u: jnp.where(u >= 0, 0.0, jnp.inf)  # noqa: E731

CASES = [
    ("lasso", 0.5, lambda u: 0.5 * jnp.abs(u)),
    ("nonnegative_lasso", 0.5, lambda u: 0.5 * jnp.abs(u) + NONNEGATIVE(u)),
    ("elastic_net", (0.5, 2.0), lambda u: 0.5 * jnp.abs(u) + u**2),
    (
        "nonnegative_elastic_net",
        (0.5, 2.0),
        lambda u: 0.5 * jnp.abs(u) + u**2 + NONNEGATIVE(u),
    ),
    ("ridge", 2.0, lambda u: u**2),
    ("nonnegative_ridge", 2.0, lambda u: u**2 + NONNEGATIVE(u)),
]


@pytest.mark.parametrize("name, strength, penalty", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("step", [1.0, 0.3])
def test_separable_proxes_match_a_brute_force_argmin(name, strength, penalty, step):
    got = getattr(bl.prox, name)(strength, V, step)
    assert np.max(np.abs(got - brute_force(penalty, V, step))) < 2e-4  # grid spacing


def test_group_lasso_closed_form_and_zero_block():
    v = jnp.array([3.0, 4.0])  # norm 5
    assert np.allclose(bl.prox.group_lasso(1.0, v, 2.0), (1 - 2.0 / 5.0) * v)
    assert np.allclose(bl.prox.group_lasso(1.0, v, 6.0), 0.0)
    # the derivative at a zeroed block is zero, not NaN
    grad = jax.grad(lambda v: jnp.sum(bl.prox.group_lasso(1.0, v, 6.0)))(jnp.zeros(2))
    assert np.allclose(grad, 0.0)


def test_strength_as_array_and_pytree():
    weights = jnp.linspace(0.1, 1.0, 6)
    got = bl.prox.lasso(weights, V, 1.0)
    assert np.allclose(got, jnp.sign(V) * jnp.maximum(jnp.abs(V) - weights, 0))
    tree = {"a": V[:3], "b": V[3:]}
    got = bl.prox.ridge({"a": 1.0, "b": 3.0}, tree, 1.0)
    assert np.allclose(got["a"], V[:3] / 2) and np.allclose(got["b"], V[3:] / 4)


def test_derivative_with_respect_to_the_strength():
    # d/dlam soft(v, eta lam) = -eta sign(v) on the active coordinates, 0 elsewhere.
    grad = jax.jacfwd(lambda lam: bl.prox.lasso(lam, V, 0.5))(jnp.array(0.4))
    expected = jnp.where(jnp.abs(V) > 0.2, -0.5 * jnp.sign(V), 0.0)
    assert np.allclose(grad, expected)


def test_from_projection_uses_x_when_declared():
    clip = bl.projection(lambda x, v: jnp.clip(v, -x, x))
    prox = bl.prox.from_projection(clip)
    assert np.allclose(prox(jnp.array(0.5), V, 123.0), jnp.clip(V, -0.5, 0.5))
    plain = bl.prox.from_projection(lambda v: jnp.maximum(v, 0))
    assert np.allclose(plain(None, V, 1.0), jnp.maximum(V, 0))


def test_agree_with_jaxopt_and_adapter():
    jaxopt = pytest.importorskip("jaxopt")
    p = jaxopt.prox
    pairs = [
        (bl.prox.lasso(0.5, V, 0.7), p.prox_lasso(V, 0.5, 0.7)),
        (
            bl.prox.nonnegative_lasso(0.5, V, 0.7),
            p.prox_non_negative_lasso(V, 0.5, 0.7),
        ),
        (
            bl.prox.elastic_net((0.5, 0.5 * 2.0), V, 0.7),
            p.prox_elastic_net(V, (0.5, 2.0), 0.7),
        ),
        (bl.prox.ridge(2.0, V, 0.7), p.prox_ridge(V, 2.0, 0.7)),
        (
            bl.prox.nonnegative_ridge(2.0, V, 0.7),
            p.prox_non_negative_ridge(V, 2.0, 0.7),
        ),
        (bl.prox.group_lasso(0.5, V, 0.7), p.prox_group_lasso(V, 0.5, 0.7)),
        (bl.prox.from_jaxopt(p.prox_lasso)(0.5, V, 0.7), p.prox_lasso(V, 0.5, 0.7)),
    ]
    for ours, theirs in pairs:
        assert np.max(np.abs(ours - theirs)) < 1e-12
    # jaxopt's proxes passed unwrapped are detected (they would silently misbehave)
    with pytest.raises(TypeError, match="from_jaxopt"):
        bl.proximal_gradient_condition(lambda x, y: jnp.sum(y**2), p.prox_lasso)
