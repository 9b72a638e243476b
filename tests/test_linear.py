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
    lipschitz = float(jnp.max(jnp.linalg.eigvalsh(rows.T @ rows / rows.shape[0] + jnp.eye(6))))
    eta, num_terms = 1.0 / lipschitz, 12

    def unrolled(x):
        step = lambda _, y: y - eta * jax.grad(bench.problem.lower, 1)(x, y, rows)
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
