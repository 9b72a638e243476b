"""Each optimality condition gives the right solution Jacobian: compared with dense float64
IFT algebra and with central finite differences of an accurate inner solver."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import bilevel as bl


N, M = 5, 3
Q = (lambda R: R @ R.T / N + jnp.eye(N))(jr.normal(jr.PRNGKey(0), (N, N)))  # eig in [1, ~4]
C = jr.normal(jr.PRNGKey(1), (N, M))
STEP = 1.0 / float(jnp.max(jnp.linalg.eigvalsh(Q)))
FD_TOL = 1e-6  # central differences at eps 1e-6 of a solver converged to ~1e-15


def quad(x, y):
    return 0.5 * y @ Q @ y - (C @ x) @ y


def fixed_point_solve(update, x, y0, num_steps=600):
    # Contraction with factor <= 1 - STEP * lambda_min(Q) <= 0.75: 600 steps reach 1e-16.
    return jax.lax.fori_loop(0, num_steps, lambda _, y: update(x, y), y0)


@eqx.filter_jit
def dense_ift_jacobian(condition, x, y):
    """-(d_y Phi)^{-1} d_x Phi with both Jacobians materialised in float64."""
    jac_y = jax.jacfwd(condition, argnums=1)(x, y)
    jac_x = jax.jacfwd(condition, argnums=0)(x, y)
    return -jnp.linalg.solve(jac_y, jac_x)


def finite_difference_jacobian(solve, x, eps=1e-6):
    columns = [(solve(x + eps * e) - solve(x - eps * e)) / (2 * eps) for e in jnp.eye(M)]
    return jnp.stack(columns, axis=1)


def check_condition(condition, solve, x):
    solve = jax.jit(solve)
    y_star = solve(x)
    implicit = jax.jit(jax.jacfwd(bl.implicit_diff(condition)(solve)))(x)
    implicit_rev = jax.jit(jax.jacrev(bl.implicit_diff(condition)(solve)))(x)
    assert np.max(np.abs(condition(x, y_star))) < 1e-12  # solved, so the IFT is exact
    assert np.max(np.abs(implicit - dense_ift_jacobian(condition, x, y_star))) < 1e-9
    assert np.max(np.abs(implicit_rev - implicit)) < 1e-9
    assert np.max(np.abs(implicit - finite_difference_jacobian(solve, x))) < FD_TOL
    return implicit


def test_stationarity_condition():
    condition = bl.stationarity_condition(quad)
    assert condition.symmetric and condition.positive_semidefinite

    def solve(x):
        return jnp.linalg.solve(Q, C @ x)

    jac = check_condition(condition, solve, jnp.array([0.3, -0.2, 0.5]))
    assert np.max(np.abs(jac - jnp.linalg.solve(Q, C))) < 1e-12  # closed form Q^{-1} C


def test_projected_gradient_condition_on_a_box():
    def project(y):
        return jnp.clip(y, 0.0, 1.0)

    condition = bl.projected_gradient_condition(quad, project)

    def solve(x):
        return fixed_point_solve(lambda x, y: project(y - STEP * jax.grad(quad, 1)(x, y)), x, jnp.zeros(N))

    x = jnp.array([1.5, -1.0, 0.8])
    y = solve(x)
    active = (y <= 0.0) | (y >= 1.0)
    assert 0 < int(jnp.sum(active)) < N  # both active and free coordinates are exercised
    jac = check_condition(condition, solve, x)
    assert np.max(np.abs(jac[active])) < 1e-12  # clipped coordinates do not move


def test_proximal_gradient_condition_lasso():
    # min_y 0.5 y'Qy - (Cx)'y + sum exp(w) |y|, w fixed; derivative in x through the prox.
    weights = jnp.full(N, -0.5)

    def prox(x, v, step):
        tau = step * jnp.exp(weights)
        return jnp.sign(v) * jnp.maximum(jnp.abs(v) - tau, 0.0)

    condition = bl.proximal_gradient_condition(quad, prox, step=STEP)

    def solve(x):
        return fixed_point_solve(lambda x, y: prox(x, y - STEP * jax.grad(quad, 1)(x, y), STEP), x, jnp.zeros(N))

    x = jnp.array([1.0, -0.7, 0.4])
    y = solve(x)
    assert 0 < int(jnp.sum(y == 0.0)) < N  # sparse solution: both branches of the prox
    check_condition(condition, solve, x)


def test_kkt_condition_halfspace_projection():
    # y*(x) = argmin 0.5|y - x|^2 s.t. a'y <= c and y_0 >= -5 (inactive):
    # y* = x - lam a with lam = (a'x - c)/|a|^2 > 0, Jacobian I - a a'/|a|^2.
    a, c = jnp.array([1.0, 2.0, -1.0]), 0.5

    def lower(x, y):
        return 0.5 * jnp.sum((y - x) ** 2)

    def constraints(x, y):
        return jnp.stack([a @ y - c, -y[0] - 5.0])

    condition = bl.kkt_condition(lower, constraints)

    def solve(x):
        lam = (a @ x - c) / (a @ a)
        return x - lam * a, jnp.stack([lam, jnp.zeros(())])

    x = jnp.array([1.0, 1.0, 0.0])
    y, multipliers = solve(x)
    assert float(multipliers[0]) > 0.1  # strictly active: the KKT Jacobian is invertible
    jac_y, jac_multipliers = jax.jacfwd(bl.implicit_diff(condition)(solve))(x)
    assert np.max(np.abs(jac_y - (jnp.eye(M) - jnp.outer(a, a) / (a @ a)))) < 1e-9
    assert np.max(np.abs(jac_multipliers[0] - a / (a @ a))) < 1e-9
    assert np.max(np.abs(jac_multipliers[1])) < 1e-9  # the inactive multiplier stays 0
