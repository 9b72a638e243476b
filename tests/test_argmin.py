"""bl.argmin / root / fixed_point / least_squares / proximal_gradient /
projected_gradient: derivatives against closed forms and finite differences, forward
and reverse mode, float64 and float32."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import optimistix as optx
import pytest

import bilevel as bl

from .helpers import relative_error


A = jr.normal(jr.PRNGKey(0), (20, 5))
B = jr.normal(jr.PRNGKey(1), (20,))


def ridge(lam, w, a, b):
    return 0.5 * jnp.sum((a @ w - b) ** 2) + 0.5 * lam * jnp.sum(w**2)


def ridge_closed(lam, a=A, b=B):
    return jnp.linalg.solve(a.T @ a + lam * jnp.eye(a.shape[1], dtype=a.dtype), a.T @ b)


LAM = jnp.array(0.7)


def _check(solution, reference, tol):
    forward = jax.jit(jax.jacfwd(lambda lam: solution(lam, A, B)))(LAM)
    reverse = jax.jit(jax.jacrev(lambda lam: solution(lam, A, B)))(LAM)
    assert relative_error(forward, reference) < tol
    assert relative_error(reverse, reference) < tol


@pytest.mark.parametrize(
    "solver",
    [None, optx.BFGS(rtol=1e-12, atol=1e-12), optx.NonlinearCG(rtol=1e-12, atol=1e-12)],
    ids=["default-LBFGS", "BFGS", "NonlinearCG"],
)
def test_argmin_with_optimistix_minimisers(solver):
    solution = bl.argmin(ridge, solver, y0=jnp.zeros(5))
    assert relative_error(solution(LAM, A, B), ridge_closed(LAM)) < 1e-7
    # IFT at a solution accurate to ~1e-9 (tolerances 1e-10..1e-12; cond(H) ~ 1e1)
    _check(solution, jax.jacfwd(ridge_closed)(LAM), 1e-6)


# optax and optimistix mix dtypes internally (e.g. float64 constants with float32 state
# when x64 is on), which the strict promotion of this suite (not JAX's default) rejects.
STANDARD = jax.numpy_dtype_promotion("standard")


@STANDARD
def test_argmin_with_an_optax_transformation_for_k_steps_and_aux():
    def objective(lam, w, a, b):
        return ridge(lam, w, a, b), {"norm": jnp.linalg.norm(w)}

    lipschitz = float(jnp.max(jnp.linalg.eigvalsh(A.T @ A))) + 0.7
    solution = bl.argmin(
        objective,
        optax.sgd(1 / lipschitz),
        y0=jnp.zeros(5),
        max_steps=3000,
        has_aux=True,
    )
    w, aux = solution(LAM, A, B)
    # 3000 steps of gradient descent at 1/L: contraction 1 - mu/L per step, cond ~ 1e1
    assert relative_error(w, ridge_closed(LAM)) < 1e-10
    assert abs(float(aux["norm"]) - float(jnp.linalg.norm(w))) < 1e-12
    jac = jax.jacfwd(lambda lam: solution(lam, A, B)[0])(LAM)
    assert relative_error(jac, jax.jacfwd(ridge_closed)(LAM)) < 1e-9


def test_argmin_in_float32():
    # A float32 program (x64 off), as a float32 user runs it; with x64 on, optimistix's
    # LBFGS mixes float64 constants into its float32 state and fails.
    with jax.enable_x64(False):
        a, b = A.astype(jnp.float32), B.astype(jnp.float32)
        solution = bl.argmin(ridge, y0=jnp.zeros(5, jnp.float32))
        lam = jnp.array(0.7, jnp.float32)
        w = solution(lam, a, b)
        jac = jax.jacrev(lambda lam: solution(lam, a, b))(lam)
    assert w.dtype == jnp.float32 and jac.dtype == jnp.float32
    reference = jax.jacfwd(ridge_closed)(LAM)
    # float32: the inner and linear tolerances are 1e-5 (relative), cond(H) ~ 1e1
    assert relative_error(np.asarray(jac, np.float64), reference) < 1e-3


def test_argmin_warm_start_per_call_and_missing_start():
    solution = bl.argmin(ridge)
    with pytest.raises(ValueError, match="starting point"):
        solution(LAM, A, B)
    w = solution(LAM, A, B, y0=ridge_closed(LAM) + 1e-3)
    assert relative_error(w, ridge_closed(LAM)) < 1e-7
    # no derivative flows through the starting point
    grad = jax.grad(lambda w0: jnp.sum(solution(LAM, A, B, y0=w0)))(jnp.zeros(5))
    assert np.allclose(grad, 0.0)


def test_root_newton_and_bisection():
    gradient = lambda lam, w, a, b: jax.grad(ridge, 1)(lam, w, a, b)  # noqa: E731
    newton = bl.root(
        gradient, optx.Newton(rtol=1e-12, atol=1e-12), y0=jnp.zeros(5), symmetric=True
    )
    _check(newton, jax.jacfwd(ridge_closed)(LAM), 1e-9)
    # scalar root of y^3 + y - x: dy/dx = 1 / (3 y^2 + 1)
    cubic = bl.root(
        lambda x, y: y**3 + y - x,
        optx.Bisection(rtol=1e-13, atol=1e-13),
        y0=jnp.array(0.0),
        options={"lower": -10.0, "upper": 10.0},
    )
    x = jnp.array(2.0)  # root y = 1
    assert abs(float(cubic(x)) - 1.0) < 1e-10
    assert abs(float(jax.grad(cubic)(x)) - 0.25) < 1e-9


def test_fixed_point_and_least_squares():
    eta = 0.02
    step = lambda lam, w, a, b: w - eta * jax.grad(ridge, 1)(lam, w, a, b)  # noqa: E731
    fixed = bl.fixed_point(step, y0=jnp.zeros(5), max_steps=20000)
    _check(fixed, jax.jacfwd(ridge_closed)(LAM), 1e-7)

    def residuals(lam, w, a, b):
        return jnp.concatenate([a @ w - b, jnp.sqrt(lam) * w])

    for solver in (optx.GaussNewton(rtol=1e-12, atol=1e-12), None):
        fit = bl.least_squares(residuals, solver, y0=jnp.zeros(5))
        _check(fit, jax.jacfwd(ridge_closed)(LAM), 1e-8)


def test_proximal_gradient_lasso_against_the_active_set_closed_form():
    def smooth(lam, w, a, b):
        return 0.5 * jnp.mean((a @ w - b) ** 2)

    solution = bl.proximal_gradient(smooth, bl.prox.lasso, y0=jnp.zeros(5), tol=1e-12)
    lam = jnp.array(0.1)
    w = solution(lam, A, B)
    active = jnp.abs(w) > 0
    assert 0 < int(jnp.sum(active)) < 5  # both branches of the prox
    a_s = A[:, active]
    # On the active set: (A_S'A_S / n) w_S = A_S'b / n - lam sign(w_S).
    expected = (
        jnp.zeros(5)
        .at[active]
        .set(-jnp.linalg.solve(a_s.T @ a_s / 20, jnp.sign(w[active])))
    )
    jacobians = [
        jax.jit(mode(lambda t: solution(t, A, B)))(lam)
        for mode in (jax.jacfwd, jax.jacrev)
    ]
    for jac in jacobians:
        assert np.max(np.abs(jac - expected)) < 1e-8


def test_projected_gradient_on_the_simplex_and_an_x_dependent_ball():
    def lower(c, w, a, b):
        return 0.5 * jnp.sum((a @ w - b) ** 2) + c @ w

    with STANDARD:  # optax's simplex projection mixes int and float arrays
        solution = jax.jit(
            bl.projected_gradient(
                lower,
                optax.projections.projection_simplex,
                y0=jnp.ones(5) / 5,
                tol=1e-12,
            )
        )
        c = jnp.linspace(0.0, 1.0, 5)
        w = solution(c, A, B)
        assert abs(float(jnp.sum(w)) - 1.0) < 1e-12 and 0 < int(jnp.sum(w == 0)) < 5
        # central differences (eps 1e-6) of a solve converged to 1e-12: error ~1e-6
        eps = 1e-6
        plus = jax.vmap(lambda e: solution(c + eps * e, A, B))(jnp.eye(5))
        minus = jax.vmap(lambda e: solution(c - eps * e, A, B))(jnp.eye(5))
        fd = ((plus - minus) / (2 * eps)).T
        jac = jax.jit(jax.jacfwd(lambda c: solution(c, A, B)))(c)
        assert np.max(np.abs(jac - fd)) < 1e-5

    # ball of radius r (the hyperparameter) around 0, objective 0.5 |w - v|^2: w* = r
    # v/|v|
    ball = bl.projected_gradient(
        lambda r, w, v: 0.5 * jnp.sum((w - v) ** 2),
        bl.projection(lambda r, w: optax.projections.projection_l2_ball(w, r)),
        y0=jnp.zeros(5),
        tol=1e-12,
    )
    v = B[:5]
    grad = jax.jit(jax.jacrev(lambda r: ball(r, v)))(jnp.array(0.3))
    assert np.max(np.abs(grad - v / jnp.linalg.norm(v))) < 1e-9


def test_inner_failure_follows_the_policy():
    solution = bl.argmin(
        ridge,
        optx.BFGS(rtol=1e-14, atol=1e-14),
        y0=jnp.zeros(5),
        max_steps=2,
        on_failure="nan",
    )
    assert bool(jnp.all(jnp.isnan(solution(LAM, A, B))))
    warn = bl.argmin(
        ridge, optx.BFGS(rtol=1e-14, atol=1e-14), y0=jnp.zeros(5), max_steps=2
    )
    with pytest.warns(RuntimeWarning, match="inner solve"):
        jax.block_until_ready(warn(LAM, A, B))
