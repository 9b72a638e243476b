"""The Richardson / Neumann solver against closed forms and unrolled differentiation."""

import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
import pytest

import bilevel as bl

from .helpers import relative_error


R = jr.normal(jr.PRNGKey(0), (6, 6))
H = R @ R.T / 6 + 0.5 * jnp.eye(6)
ETA = 1.0 / float(jnp.max(jnp.linalg.eigvalsh(H)))
RHS = jnp.linspace(-1.0, 2.0, 6)
OPERATOR = lx.MatrixLinearOperator(H)


def truncated_neumann(num_terms):
    """eta * sum_{k < K} (I - eta H)^k b, computed densely."""
    step = jnp.eye(6) - ETA * H
    total, term = jnp.zeros(6), RHS
    for _ in range(num_terms):
        total, term = total + term, step @ term
    return ETA * total


def test_richardson_without_tolerance_is_the_truncated_neumann_sum():
    sol = lx.linear_solve(OPERATOR, RHS, bl.Richardson(num_steps=7, omega=ETA))
    assert np.max(np.abs(sol.value - truncated_neumann(7))) < 1e-13
    assert int(sol.stats["num_steps"]) == 7


def test_richardson_with_tolerance_converges_and_reports_truncation():
    converged = lx.linear_solve(
        OPERATOR, RHS, bl.Richardson(num_steps=5000, omega=ETA, rtol=1e-12, atol=1e-12)
    )
    assert relative_error(converged.value, jnp.linalg.solve(H, RHS)) < 1e-10
    truncated = lx.linear_solve(
        OPERATOR, RHS, bl.Richardson(num_steps=3, omega=ETA, rtol=1e-12), throw=False
    )
    assert truncated.result == lx.RESULTS.max_steps_reached


def test_richardson_warm_start_at_the_solution_stays_there():
    exact = jnp.linalg.solve(H, RHS)
    sol = lx.linear_solve(
        OPERATOR, RHS, bl.Richardson(num_steps=3, omega=ETA), options={"y0": exact}
    )
    assert np.max(np.abs(sol.value - exact)) < 1e-12


def test_neumann_hypergradient_equals_reverse_mode_through_unrolled_steps():
    # Spec test: the Neumann hypergradient with K terms equals reverse mode through K
    # gradient steps y <- y - eta grad_y g started at y*(x) (treated as a constant).
    bench = bl.problems.quadratic(dim_x=3, dim_y=6, seed=2)
    rows = bench.data.lower
    x = jnp.array([0.2, -0.4, 1.0])
    y_star = bench.lower_solution(x)
    lipschitz = float(
        jnp.max(jnp.linalg.eigvalsh(rows.T @ rows / rows.shape[0] + jnp.eye(6)))
    )
    eta, num_terms = 1.0 / lipschitz, 12

    def unrolled(x):
        def step(_, y):
            return y - eta * jax.grad(bench.problem.lower, 1)(x, y, rows)

        y = jax.lax.fori_loop(0, num_terms, step, y_star)
        return bench.problem.upper(x, y, None)

    neumann, _ = bl.hypergradient(
        bench.problem, x, y_star, rows, bl.Richardson(num_steps=num_terms, omega=eta)
    )
    assert np.max(np.abs(neumann - jax.grad(unrolled)(x))) < 1e-12
    # ... and with enough terms it approaches the exact hypergradient.
    exact_enough, _ = bl.hypergradient(
        bench.problem, x, y_star, rows, bl.Richardson(num_steps=400, omega=eta)
    )
    assert relative_error(exact_enough, bench.hypergradient(x)) < 1e-8


def test_neumann_on_a_fixed_point_condition():
    # Phi = y - T(y) with T(y) = J y + b, rho(J) < 1: Neumann(K) = sum_{k<K} J^k rhs.
    J = 0.4 * (H / float(jnp.max(jnp.linalg.eigvalsh(H))))
    operator = lx.MatrixLinearOperator(jnp.eye(6) - J)
    sol = lx.linear_solve(operator, RHS, bl.Neumann(60))
    assert relative_error(sol.value, jnp.linalg.solve(jnp.eye(6) - J, RHS)) < 1e-14


def test_richardson_rejects_bad_configuration():
    with pytest.raises(ValueError, match="num_steps"):
        bl.Richardson(num_steps=-1)
    with pytest.raises(ValueError, match="rtol"):
        bl.Richardson(num_steps=3, rtol=-1.0)


# --------------------------------------------------------------------------------------
# MINRES: the default adjoint solver for symmetric systems.

S_INDEFINITE = (lambda M: M + M.T)(jr.normal(jr.PRNGKey(5), (6, 6)))


def _minres(matrix, rhs, tol=1e-12, **options):
    operator = lx.MatrixLinearOperator(matrix, lx.symmetric_tag)
    return lx.linear_solve(
        operator, rhs, bl.MINRES(rtol=tol, atol=0.0), options=options, throw=False
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("kind", ["spd", "indefinite"])
def test_minres_solves_definite_and_indefinite_systems(dtype, kind):
    matrix = (H if kind == "spd" else S_INDEFINITE).astype(dtype)
    tol = 1e-12 if dtype == jnp.float64 else 1e-5
    assert float(jnp.min(jnp.linalg.eigvalsh(S_INDEFINITE))) < 0  # genuinely indefinite
    sol = _minres(matrix, RHS.astype(dtype), tol)
    exact = np.linalg.solve(np.asarray(matrix, np.float64), np.asarray(RHS, np.float64))
    assert sol.result == lx.RESULTS.successful
    assert sol.value.dtype == dtype
    # Residual test ||r|| <= rtol ||b||; cond(S) ~ 1e2, so the error is <= 1e2 * rtol.
    error = relative_error(np.asarray(sol.value, np.float64), exact)
    assert error < (1e-9 if dtype == jnp.float64 else 1e-3)
    reported = float(sol.stats["residual_norm"])
    true = float(jnp.linalg.norm(matrix @ sol.value - RHS.astype(dtype)))
    assert abs(reported - true) < 1e-3 * float(jnp.linalg.norm(RHS)) * (
        1 if dtype == jnp.float32 else 1e-6
    )


def test_minres_preconditioner_and_warm_start():
    exact = jnp.linalg.solve(H, RHS)
    jacobi = lx.MatrixLinearOperator(
        jnp.diag(1 / jnp.diag(H)), lx.positive_semidefinite_tag
    )
    sol = _minres(H, RHS, preconditioner=jacobi)
    assert relative_error(sol.value, exact) < 1e-10
    warm = _minres(H, RHS, y0=exact)
    assert int(warm.stats["num_steps"]) == 0  # already converged: no product needed
    assert relative_error(warm.value, exact) < 1e-12


def test_minres_singular_inconsistent_system_is_reported_not_blown_up():
    # A 64-sample Hessian of a 100-dimensional least-squares problem: rank 64, and a
    # generic right-hand side has a component outside its range (no solution exists).
    rows = jr.normal(jr.PRNGKey(7), (64, 100))
    hessian = rows.T @ rows / 64
    rhs = jr.normal(jr.PRNGKey(8), (100,))
    sol = _minres(hessian, rhs, tol=1e-10)
    assert sol.result == lx.RESULTS.singular
    assert bool(jnp.all(jnp.isfinite(sol.value)))
    # lineax's CG on the same system diverges (norm ~1e18 after 1000 steps).
    cg = lx.linear_solve(
        lx.MatrixLinearOperator(hessian, lx.positive_semidefinite_tag),
        rhs,
        lx.CG(rtol=1e-10, atol=1e-10, max_steps=1000),
        throw=False,
    )
    assert float(jnp.linalg.norm(cg.value)) > 1e10


def test_minres_nonfinite_input_is_reported_quickly():
    sol = _minres(H.at[0, 0].set(jnp.nan), RHS)
    assert sol.result == lx.RESULTS.nonfinite_input
    assert int(sol.stats["num_steps"]) <= 1


def test_minres_rejects_unsymmetric_operators():
    with pytest.raises(ValueError, match="symmetric"):
        lx.linear_solve(lx.MatrixLinearOperator(H), RHS, bl.MINRES(1e-8, 0.0))


def test_default_solver_falls_back_to_a_bounded_series_on_singular_systems():
    # The default rule of bl.hypergradient on a singular minibatch Hessian: MINRES finds
    # the system inconsistent, and the answer is the truncated Neumann series with
    # eta = 1/||A|| (bounded by 20 eta ||b||), flagged `singular`.
    from bilevel._linear import FALLBACK_TERMS, solve_linear

    rows = jr.normal(jr.PRNGKey(7), (64, 100))
    hessian = rows.T @ rows / 64
    rhs = jr.normal(jr.PRNGKey(8), (100,))
    sol = solve_linear(lx.MatrixLinearOperator(hessian, lx.symmetric_tag), rhs)
    assert sol.result == lx.RESULTS.singular
    eta = 1 / float(sol.stats["operator_norm"])
    assert eta <= 1 / float(jnp.max(jnp.linalg.eigvalsh(hessian))) + 1e-12  # eta <= 1/L
    step = jnp.eye(100) - eta * hessian
    series, term = jnp.zeros(100), rhs
    for _ in range(FALLBACK_TERMS):
        series, term = series + term, step @ term
    assert np.max(np.abs(sol.value - eta * series)) < 1e-10


# --------------------------------------------------------------------------------------
# Neumann / Richardson report divergence.


def test_diverging_neumann_series_is_reported():
    # rho(J) = 1.5 > 1: the series diverges; it used to report success with residual
    # 5e30.
    J = 1.5 * H / float(jnp.max(jnp.linalg.eigvalsh(H)))
    operator = lx.MatrixLinearOperator(jnp.eye(6) - J)
    sol = lx.linear_solve(operator, RHS, bl.Neumann(60), throw=False)
    assert sol.result != lx.RESULTS.successful
    assert float(sol.stats["residual_norm"]) > 1e6
    converging = lx.linear_solve(
        lx.MatrixLinearOperator(jnp.eye(6) - J / 3), RHS, bl.Neumann(60)
    )
    assert converging.result == lx.RESULTS.successful


def test_neumann_is_a_solver_class():
    solver = bl.Neumann(5)
    assert isinstance(solver, bl.Neumann) and isinstance(
        solver, lx.AbstractLinearSolver
    )
    with pytest.raises(ValueError, match="num_terms"):
        bl.Neumann(-1)
