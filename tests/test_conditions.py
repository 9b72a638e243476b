"""Each optimality condition gives the right solution Jacobian: compared with dense
float64 IFT algebra and with central finite differences of an accurate inner solver."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import bilevel as bl


N, M = 5, 3
Q = (lambda R: R @ R.T / N + jnp.eye(N))(
    jr.normal(jr.PRNGKey(0), (N, N))
)  # eig in [1, ~4]
C = jr.normal(jr.PRNGKey(1), (N, M))
STEP = 1.0 / float(jnp.max(jnp.linalg.eigvalsh(Q)))
FD_TOL = 1e-6  # central differences at eps 1e-6 of a solver converged to ~1e-15


def quad(x, y):
    return 0.5 * y @ Q @ y - (C @ x) @ y


def fixed_point_solve(update, x, y0, num_steps=600):
    # Contraction with factor <= 1 - STEP * lambda_min(Q) <= 0.75: 600 steps reach
    # 1e-16.
    return jax.lax.fori_loop(0, num_steps, lambda _, y: update(x, y), y0)


@eqx.filter_jit
def dense_ift_jacobian(condition, x, y):
    """-(d_y Phi)^{-1} d_x Phi with both Jacobians materialised in float64."""
    jac_y = jax.jacfwd(condition, argnums=1)(x, y)
    jac_x = jax.jacfwd(condition, argnums=0)(x, y)
    return -jnp.linalg.solve(jac_y, jac_x)


def finite_difference_jacobian(solve, x, eps=1e-6):
    columns = [
        (solve(x + eps * e) - solve(x - eps * e)) / (2 * eps) for e in jnp.eye(M)
    ]
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
        return fixed_point_solve(
            lambda x, y: project(y - STEP * jax.grad(quad, 1)(x, y)), x, jnp.zeros(N)
        )

    x = jnp.array([1.5, -1.0, 0.8])
    y = solve(x)
    active = (y <= 0.0) | (y >= 1.0)
    assert (
        0 < int(jnp.sum(active)) < N
    )  # both active and free coordinates are exercised
    jac = check_condition(condition, solve, x)
    assert np.max(np.abs(jac[active])) < 1e-12  # clipped coordinates do not move


def test_proximal_gradient_condition_lasso():
    # min_y 0.5 y'Qy - (Cx)'y + sum exp(w) |y|, w fixed; derivative in x through the
    # prox.
    weights = jnp.full(N, -0.5)

    def prox(x, v, step):
        tau = step * jnp.exp(weights)
        return jnp.sign(v) * jnp.maximum(jnp.abs(v) - tau, 0.0)

    condition = bl.proximal_gradient_condition(quad, prox, step=STEP)

    def solve(x):
        return fixed_point_solve(
            lambda x, y: prox(x, y - STEP * jax.grad(quad, 1)(x, y), STEP),
            x,
            jnp.zeros(N),
        )

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
    assert (
        float(multipliers[0]) > 0.1
    )  # strictly active: the KKT Jacobian is invertible
    jac_y, jac_multipliers = jax.jacfwd(bl.implicit_diff(condition)(solve))(x)
    assert np.max(np.abs(jac_y - (jnp.eye(M) - jnp.outer(a, a) / (a @ a)))) < 1e-9
    assert np.max(np.abs(jac_multipliers[0] - a / (a @ a))) < 1e-9
    assert np.max(np.abs(jac_multipliers[1])) < 1e-9  # the inactive multiplier stays 0


# --------------------------------------------------------------------------------------
# optax projections, sets that depend on x, KKT with equalities and data, multipliers.

import functools as ft  # noqa: E402

import optax  # noqa: E402
import pytest  # noqa: E402


def _projected_solve(project, x, y0, num_steps=2000):
    # Projected gradient with step 1/L (contraction <= 0.75 on the free coordinates).
    def update(x, y):
        return bl._projection.project_at(project, x, y - STEP * jax.grad(quad, 1)(x, y))

    return jax.lax.fori_loop(0, num_steps, lambda _, y: update(x, y), y0)


@pytest.mark.parametrize(
    "name, project",
    [
        ("box", ft.partial(optax.projections.projection_box, lower=0.0, upper=1.0)),
        ("simplex", optax.projections.projection_simplex),
        ("l2_ball", ft.partial(optax.projections.projection_l2_ball, scale=0.5)),
        ("non_negative", optax.projections.projection_non_negative),
    ],
)
def test_optax_projections_in_the_projected_gradient_condition(name, project):
    condition = bl.projected_gradient_condition(quad, project)
    x = jnp.array([1.5, -1.0, 0.8])

    def solve(x):
        return _projected_solve(project, x, jnp.full(N, 0.2))

    # optax's simplex projection mixes int and float arrays internally, which the strict
    # promotion of this test suite (not JAX's default) rejects.
    with jax.numpy_dtype_promotion("standard" if name == "simplex" else "strict"):
        check_condition(condition, solve, x)


def test_projection_depending_on_x():
    # y*(x) = argmin_{|y| <= r} 0.5 |y - c|^2 with x = (r, c): y* = r c / |c| when |c| >
    # r, so dy*/dr = c / |c| and dy*/dc = (r / |c|) (I - c c^T / |c|^2).
    def lower(x, y):
        return 0.5 * jnp.sum((y - x["c"]) ** 2)

    project = bl.projection(
        lambda x, y: optax.projections.projection_l2_ball(y, scale=x["r"])
    )
    condition = bl.projected_gradient_condition(lower, project)

    @bl.implicit_diff(condition)
    def solve(x):
        return x["r"] * x["c"] / jnp.linalg.norm(x["c"])

    x = {"r": jnp.array(0.5), "c": jnp.array([1.0, -2.0, 0.5])}
    c, r = x["c"], x["r"]
    norm = jnp.linalg.norm(c)
    jac = jax.jacrev(solve)(x)
    assert np.max(np.abs(jac["r"] - c / norm)) < 1e-12
    expected = r / norm * (jnp.eye(3) - jnp.outer(c, c) / norm**2)
    assert np.max(np.abs(jac["c"] - expected)) < 1e-12
    assert np.max(np.abs(jax.jacfwd(solve)(x)["r"] - c / norm)) < 1e-12
    with pytest.raises(TypeError, match="depends on the upper variable"):
        project(c)


def test_x_dependent_projection_is_honoured_by_the_problem_and_its_lift():
    # apply_project_y passes x; lift_problem keeps the x-dependence for Module
    # variables.
    from bilevel._misc import split_variable
    from bilevel._problem import apply_project_y, lift_problem

    project = bl.projection(lambda x, y: jnp.clip(y, -x, x))
    problem = bl.BilevelProblem(lambda x, y, b: jnp.sum(y), quad, project_y=project)
    y = jnp.array([2.0, -3.0, 0.1, 0.4, -0.2])
    assert np.allclose(
        apply_project_y(problem, jnp.array(0.3), y), jnp.clip(y, -0.3, 0.3)
    )
    x_params, x_frozen = split_variable(jnp.array(0.3))
    lifted = lift_problem(problem, x_frozen, split_variable(y)[1])
    assert np.allclose(apply_project_y(lifted, x_params, y), jnp.clip(y, -0.3, 0.3))


def test_kkt_with_equality_constraints_and_data_arguments():
    # min 0.5 y'Qy - (Cx)'y  s.t.  E y = e (data), y_0 <= 10 (inactive):
    # [Q E'; E 0] [y; nu] = [Cx; e].
    E = jnp.array([[1.0, 1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 0.0, 0.0, 2.0]])
    e = jnp.array([1.0, 0.5])

    def lower(x, y, E, e):
        return quad(x, y)

    def equalities(x, y, E, e):  # takes the data arguments
        return E @ y - e

    def inequalities(x, y):
        return jnp.array([y[0] - 10.0])

    kkt = bl.kkt_condition(lower, inequalities, equalities)
    saddle = jnp.block([[Q, E.T], [E, jnp.zeros((2, 2))]])

    def solve(x, E, e):
        sol = jnp.linalg.solve(saddle, jnp.concatenate([C @ x, e]))
        return sol[:N], jnp.zeros(1), sol[N:]

    x = jnp.array([0.3, -0.2, 0.5])
    point = solve(x, E, e)
    residual = kkt(x, point, E, e)
    assert max(float(jnp.max(jnp.abs(r))) for r in residual) < 1e-12
    jac = jax.jacfwd(bl.implicit_diff(kkt)(solve))(x, E, e)
    reference = jnp.linalg.solve(saddle, jnp.concatenate([C, jnp.zeros((2, M))]))
    assert np.max(np.abs(jac[0] - reference[:N])) < 1e-9
    assert np.max(np.abs(jac[2] - reference[N:])) < 1e-9
    # derivative with respect to the data e of the equality constraints (reverse mode)
    grad_e = jax.grad(lambda e: jnp.sum(bl.implicit_diff(kkt)(solve)(x, E, e)[0]))(e)
    reference_e = jax.grad(
        lambda e: jnp.sum(jnp.linalg.solve(saddle, jnp.concatenate([C @ x, e]))[:N])
    )(e)
    assert np.max(np.abs(grad_e - reference_e)) < 1e-9


def test_kkt_multipliers_from_a_primal_solution():
    # Box 0 <= y <= 1 on quad: the multipliers are the clipped gradient components.
    def constraints(x, y):
        return jnp.concatenate([-y, y - 1.0])

    x = jnp.array([1.5, -1.0, 0.8])

    def project(y):
        return jnp.clip(y, 0.0, 1.0)

    y = _projected_solve(project, x, jnp.full(N, 0.2), num_steps=3000)
    _, lam = bl.kkt_multipliers(quad, constraints)(x, y)
    grad = jax.grad(quad, 1)(x, y)
    expected = jnp.concatenate(
        [jnp.where(y <= 0, grad, 0), jnp.where(y >= 1, -grad, 0)]
    )
    assert np.max(np.abs(lam - jnp.maximum(expected, 0))) < 1e-10
    kkt = bl.kkt_condition(quad, constraints)
    assert max(float(jnp.max(jnp.abs(r))) for r in kkt(x, (y, lam))) < 1e-10


def test_kkt_multipliers_of_isotonic_regression():
    # min 0.5 |y - v|^2 s.t. y_i <= y_{i+1}: the multipliers, derived by hand with a
    # cumulative sum in the jaxopt example, come out of the least-squares recovery.
    v = jnp.array([1.0, 3.0, 2.0, 2.5, 0.5])

    def lower(x, y):
        return 0.5 * jnp.sum((y - x * v) ** 2)

    def constraints(x, y):
        return y[:-1] - y[1:]

    # Pool-adjacent-violators solution for x = 1 (blocks {0}, {1,2,3,4}).
    y = jnp.array([1.0, 2.0, 2.0, 2.0, 2.0])
    _, lam = bl.kkt_multipliers(lower, constraints)(jnp.array(1.0), y)
    expected = jnp.cumsum(v - y)[:-1]  # stationarity y - v + D'lam = 0
    assert np.max(np.abs(lam - jnp.maximum(expected, 0))) < 1e-12
    assert float(lam[0]) == 0.0  # inactive constraint

    kkt = bl.kkt_condition(lower, constraints)
    solve = bl.implicit_diff(kkt)(
        lambda x: (x * y, bl.kkt_multipliers(lower, constraints)(x, x * y)[1])
    )
    # y*(x) = x * y*(1) (the problem is positively homogeneous): dy*/dx = y*(1)
    assert np.max(np.abs(jax.jacfwd(solve)(jnp.array(1.0))[0] - y)) < 1e-9


def test_jaxopt_style_prox_is_rejected_with_the_adapter_named():
    def prox_lasso(x, l1reg=None, scaling=1.0):  # jaxopt's signature
        return jnp.sign(x) * jnp.maximum(jnp.abs(x) - l1reg * scaling, 0)

    with pytest.raises(TypeError, match="from_jaxopt"):
        bl.proximal_gradient_condition(quad, prox_lasso)
    bl.proximal_gradient_condition(quad, bl.prox.from_jaxopt(prox_lasso))
