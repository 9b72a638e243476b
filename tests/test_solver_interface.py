"""The shared solver interface: declared capabilities checked in one place, declared
hyperparameter bounds, and variables that are equinox Modules with non-array leaves."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import bilevel as bl
from bilevel._solver import Bounds, check_hyperparameters, positive


def _upper(x, y, batch):
    return 0.5 * jnp.sum((y - 1.0) ** 2) + 0.5 * jnp.sum(x**2)


def _lower(x, y, batch):
    return 0.5 * jnp.sum((y - x) ** 2)


def test_constrained_problem_rejected_by_unconstrained_solvers():
    problem = bl.BilevelProblem(
        _upper,
        _lower,
        lower_constraints=lambda x, y: x + y - 2.0,
        project_feasible=lambda x, y: (x, y),
    )
    x0 = y0 = jnp.zeros(1)
    unconstrained = (
        bl.solvers.ImplicitDiff(),
        bl.solvers.Unrolled(),
        bl.solvers.Penalty(),
    )
    for solver in unconstrained:
        with pytest.raises(
            ValueError, match="lower-level constraints.*Solvers that do: LVHBA"
        ):
            solver.init(problem, x0, y0, jr.PRNGKey(0))
    bl.solvers.LVHBA().init(problem, x0, y0, jr.PRNGKey(0))  # supported: no error


def test_multiblock_problem_rejected_by_single_block_solvers():
    problem = bl.MultiBlockProblem(
        lambda x, y, b, i: _upper(x, y, b), lambda x, y, b, i: _lower(x, y, b), 2
    )
    with pytest.raises(TypeError, match="needs a bl.BilevelProblem.*BSVRB"):
        bl.solvers.ImplicitDiff().init(problem, jnp.zeros(1), jnp.zeros((2, 1)))


def test_custom_condition_rejected_where_ignored():
    fixed_point = bl.BilevelProblem(_upper, _lower, optimality=lambda x, y, b: y - x)
    with pytest.raises(ValueError, match="optimality condition.*ImplicitDiff"):
        bl.solvers.Unrolled().init(fixed_point, jnp.zeros(1), jnp.zeros(1))
    retagged = bl.BilevelProblem(
        _upper,
        _lower,
        optimality=bl.OptimalityCondition(
            bl.stationarity_condition(_lower).fn, symmetric=True
        ),
    )
    bl.solvers.Unrolled().init(retagged, jnp.zeros(1), jnp.zeros(1))  # same condition


def test_inner_tol_rejects_minibatches_at_step():
    problem = bl.BilevelProblem(
        _upper, lambda x, y, b: jnp.mean((y - x * b[:, 0]) ** 2)
    )
    data = bl.Minibatch(upper=None, lower=jnp.ones((8, 1)), batch_size=2)
    solver = bl.solvers.ImplicitDiff(inner_tol=1e-6)
    state = solver.init(problem, jnp.zeros(1), jnp.zeros(1))
    with pytest.raises(ValueError, match="stochastic data.*inner_tol"):
        solver.step(problem, state, data, jr.PRNGKey(0))
    full = bl.Minibatch(upper=None, lower=jnp.ones((8, 1)), batch_size=None)
    assert full.deterministic and not data.deterministic
    solver.step(problem, state, full, jr.PRNGKey(0))


@pytest.mark.parametrize(
    "value, ok",
    [
        (0.1, True),
        (3, True),
        (0.0, False),
        (-1.0, False),
        (float("nan"), False),
        (float("inf"), False),
        (None, False),
        ("auto", False),
        (True, False),
    ],
)
def test_bounds_of_a_positive_step(value, ok):
    assert Bounds(0.0, low_open=True).accepts(value) is ok


def test_declared_bounds_checked_at_construction():
    class Toy(eqx.Module):
        lr: float = positive(0.1)
        auto_lr: float | None = positive(None, optional=True)

    check_hyperparameters(Toy())
    with pytest.raises(
        ValueError, match="Toy: `lr` must be a finite number in \\(0, inf\\]"
    ):
        check_hyperparameters(Toy(lr=float("nan")))
    check_hyperparameters(Toy(lr=jnp.array([0.1, 0.2])))  # a batch of values: unchecked
    jax.vmap(lambda lr: check_hyperparameters(Toy(lr=lr)))(jnp.array([0.1, 0.2]))


def _regression_problem():
    inputs = jr.normal(jr.PRNGKey(0), (16, 2))
    targets = jnp.sin(inputs[:, 0])

    def loss(model):
        return jnp.mean((jax.vmap(model)(inputs)[:, 0] - targets) ** 2)

    def lower(x, y, batch):
        weights = jax.tree_util.tree_leaves(eqx.filter(y, eqx.is_inexact_array))
        return loss(y) + jnp.exp(x["log_reg"]) * sum(jnp.sum(w**2) for w in weights)

    def upper(x, y, batch):
        return loss(y)

    return bl.BilevelProblem(upper, lower)


def test_mlp_lower_variable_through_solve():
    """An eqx.nn.MLP (activation functions as leaves) is a valid y: only its arrays
    move, and the result is an MLP again. Penalty is first order, so its x-gradient is
    exact: compare one step by hand."""
    problem = _regression_problem()
    mlp = eqx.nn.MLP(2, 1, 8, 1, key=jr.PRNGKey(1))
    x0 = {"log_reg": jnp.array(-3.0)}
    solver = bl.solvers.Penalty(y_steps=1, z_steps=1)
    result = bl.solve(
        problem, solver, x0, mlp, num_steps=2, log_every=1, progress=False
    )
    assert isinstance(result.y, eqx.nn.MLP)
    assert result.y.activation is mlp.activation
    moved = jax.tree_util.tree_leaves(eqx.filter(result.y, eqx.is_array))
    start = jax.tree_util.tree_leaves(eqx.filter(mlp, eqx.is_array))
    assert any(not np.allclose(a, b) for a, b in zip(moved, start))
    assert np.all(np.isfinite(result.history["upper_loss"]))
