"""Problems library: registry, offline data, ridge_hpo and logreg_hpo (closed forms,
determinism, improvement under ImplicitDiff)."""

import dataclasses
import socket

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import bilevel as bl
from bilevel.problems import _common

from .helpers import central_difference, relative_error


# Eager lineax solves dispatch op by op: compile the hypergradient instead.
hypergradient = eqx.filter_jit(bl.hypergradient)


# ---------------------------------------------------------------- registry and data


def test_registry_maps_names_to_the_constructors():
    expected = {
        "quadratic": bl.problems.quadratic,
        "ridge_hpo": bl.problems.ridge_hpo,
        "logreg_hpo": bl.problems.logreg_hpo,
        "hypercleaning": bl.problems.hypercleaning,
        "distillation": bl.problems.distillation,
        "imaml": bl.problems.imaml,
    }
    for name, constructor in expected.items():
        assert bl.problems.registry[name] is constructor
    assert bl.problems.parameters("hypercleaning")["corruption"] == 0.3


def test_make_builds_the_same_problem_as_the_constructor():
    made = bl.problems.make("quadratic", dim_x=3, dim_y=4, seed=2)
    direct = bl.problems.quadratic(dim_x=3, dim_y=4, seed=2)
    assert made.name == "quadratic"
    np.testing.assert_array_equal(made.solution, direct.solution)


def test_unknown_names_and_parameters_fail_early():
    with pytest.raises(KeyError, match="unknown problem 'nope'; available"):
        bl.problems.registry["nope"]
    with pytest.raises(ValueError, match="unknown problem 'nope'"):
        bl.problems.make("nope")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['bogus'\]"):
        bl.problems.make("ridge_hpo", bogus=1)


def test_datasets_load_offline(monkeypatch):
    # Any network access would go through socket.socket: make it fail, and bypass the
    # cache so the packaged files are really read.
    def no_network(*args, **kwargs):
        raise AssertionError("a dataset loader tried to open a network connection")

    monkeypatch.setattr(socket, "socket", no_network)
    sizes = {"digits": (1797, 64), "breast_cancer": (569, 30), "diabetes": (442, 10)}
    for name, shape in sizes.items():
        features, targets = _common._load.__wrapped__(name)
        assert features.shape == shape and targets.shape == (shape[0],)
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        _common.load_dataset("mnist")


def test_bad_sizes_fail_early():
    with pytest.raises(ValueError, match="ridge_hpo: split sizes"):
        bl.problems.ridge_hpo(num_train=400, num_val=100)
    with pytest.raises(ValueError, match="logreg_hpo: `num_train` must be an int >= 1"):
        bl.problems.logreg_hpo(num_train=0)


# ---------------------------------------------------------------------------- ridge


@pytest.fixture(scope="module")
def ridge():
    return bl.problems.ridge_hpo(
        num_train=150, num_val=100, seed=0, num_noise_features=3
    )


def test_baseline_value_reads_the_named_baseline_or_the_start(ridge):
    x = ridge.x0 + 1.0
    scores = ridge.evaluate(x, ridge.lower_solution(x))
    assert ridge.baseline_value(scores) == float(scores["baseline_validation_loss"])
    worse = {**scores, ridge.metric: scores["baseline_validation_loss"] + 1.0}
    assert not ridge.beats_baseline(worse)
    better = {**scores, ridge.metric: scores["baseline_validation_loss"] - 1.0}
    assert ridge.beats_baseline(better)
    # no named baseline: the metric at (x0, y0); for a maximised metric, larger wins
    start = ridge.evaluate(ridge.x0, ridge.y0)[ridge.metric]
    unnamed = dataclasses.replace(ridge, baseline=None)
    assert unnamed.baseline_value(scores) == float(start)
    maximised = dataclasses.replace(unnamed, maximize=True)
    assert maximised.beats_baseline({ridge.metric: start + 1.0})
    assert not maximised.beats_baseline({ridge.metric: start})
    # the comparison on two numbers: strict, in the metric's direction
    assert ridge.improves(0.1, 0.2) and not ridge.improves(0.2, 0.2)
    assert maximised.improves(0.2, 0.1) and not maximised.improves(0.1, 0.2)


def test_ridge_shapes_and_split(ridge):
    (a_val, b_val), (a_train, b_train) = ridge.data.upper, ridge.data.lower
    assert a_train.shape == (150, 13) and b_train.shape == (150,)
    assert a_val.shape == (100, 13) and b_val.shape == (100,)
    assert ridge.x0.shape == ridge.y0.shape == (13,)
    # standardised with training statistics: training columns have mean 0, std 1
    np.testing.assert_allclose(np.mean(a_train, axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(np.std(a_train, axis=0), 1.0, rtol=1e-12)


def test_ridge_is_deterministic_given_the_seed(ridge):
    again = bl.problems.ridge_hpo(
        num_train=150, num_val=100, seed=0, num_noise_features=3
    )
    other = bl.problems.ridge_hpo(
        num_train=150, num_val=100, seed=1, num_noise_features=3
    )
    for u, v in zip(jax.tree.leaves(ridge.data), jax.tree.leaves(again.data)):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(ridge.data.lower[0], other.data.lower[0])


def test_ridge_closed_form_solution_and_hypergradient(ridge, getkey):
    x = 0.5 * jr.normal(getkey(), ridge.x0.shape)
    y_star = ridge.lower_solution(x)
    upper, lower = ridge.data.upper, ridge.data.lower
    # y*(x) zeroes the lower gradient; 1e-12 is rounding for a system of condition ~1e2.
    stationarity = jax.grad(ridge.problem.lower, argnums=1)(x, y_star, lower)
    assert float(jnp.linalg.norm(stationarity)) < 1e-12
    # bl.hypergradient (matrix-free CG, rtol 1e-10) vs the closed form.
    grad, info = hypergradient(ridge.problem, x, y_star, upper, lower_batch=lower)
    assert relative_error(grad, ridge.hypergradient(x)) < 1e-8
    assert info.linear_converged
    # and the closed form vs central differences of F(x) = f(x, y*(x)) (float64,
    # eps 1e-6: truncation ~1e-12, rounding ~1e-10 relative).
    direction = jr.normal(getkey(), x.shape)
    fd = central_difference(
        lambda u: ridge.evaluate(u, y_star)["validation_loss"], x, direction
    )
    np.testing.assert_allclose(fd, ridge.hypergradient(x) @ direction, rtol=1e-6)


def test_ridge_improves_under_implicit_diff(ridge):
    solver = bl.solvers.ImplicitDiff(inner_steps=20, inner_lr=0.2, outer_lr=2.0)
    state, history = bl.run(ridge.problem, solver, ridge.x0, ridge.y0, ridge.data, 50)
    start = ridge.evaluate(ridge.x0, ridge.y0)
    end = ridge.evaluate(*solver.params(state))
    # x0 (weight 1 on every feature) over-regularises; the best single global weight
    # is reachable by the per-feature family, so 50 steps must close at least half of
    # the gap between F(x0) and the grid-searched global baseline (measured: ~0.7).
    gap = start["validation_loss"] - start["baseline_validation_loss"]
    assert gap > 0
    assert end["validation_loss"] < start["validation_loss"] - 0.5 * gap
    assert bool(jnp.all(history["finite"]))


# --------------------------------------------------------------------------- logreg


@pytest.fixture(scope="module")
def logreg():
    return bl.problems.logreg_hpo(num_train=150, num_val=100, seed=0)


def test_logreg_shapes(logreg):
    assert logreg.x0.shape == (30,)
    assert logreg.y0["weights"].shape == (30,) and logreg.y0["bias"].shape == ()
    (a_val, _), (a_train, s_train) = logreg.data.upper, logreg.data.lower
    assert a_train.shape == (150, 30) and a_val.shape == (100, 30)
    assert set(np.unique(s_train)) == {0.0, 1.0}


def test_logreg_is_deterministic_given_the_seed(logreg):
    again = bl.problems.logreg_hpo(num_train=150, num_val=100, seed=0)
    for u, v in zip(jax.tree.leaves(logreg.data), jax.tree.leaves(again.data)):
        np.testing.assert_array_equal(u, v)


def test_logreg_hypergradient_matches_finite_differences(logreg, getkey):
    # No closed form: refit y*(x) by L-BFGS (lower gradient ~1e-9 at the end) and
    # compare the IFT hypergradient with central differences of F(x) = f(x, y*(x))
    # along the hypergradient itself. With eps = 1e-3 the refit error contributes
    # ~1e-9 / eps = 1e-6 and truncation O(eps^2) ~1e-6 relative: rtol 1e-3.
    x = -1.0 + 0.3 * jr.normal(getkey(), logreg.x0.shape)

    def refit(u):
        return _common.minimize(
            bl.problems._logreg._refit_objective,
            logreg.y0,
            (u, *logreg.data.lower),
            200,
        )

    grad, info = hypergradient(
        logreg.problem, x, refit(x), logreg.data.upper, lower_batch=logreg.data.lower
    )
    assert float(info.optimality_residual) < 1e-8
    direction = grad / jnp.linalg.norm(grad)
    fd = central_difference(
        lambda u: logreg.problem.upper(u, refit(u), logreg.data.upper),
        x,
        direction,
        eps=1e-3,
    )
    np.testing.assert_allclose(jnp.linalg.norm(grad), fd, rtol=1e-3)


def test_logreg_improves_under_implicit_diff(logreg):
    solver = bl.solvers.ImplicitDiff(inner_steps=20, inner_lr=0.2, outer_lr=10.0)
    state, _ = bl.run(logreg.problem, solver, logreg.x0, logreg.y0, logreg.data, 50)
    start = logreg.evaluate(logreg.x0, logreg.y0)
    end = logreg.evaluate(*solver.params(state))
    # Weight 1 per feature over-regularises; 50 steps must close half of the gap to the
    # grid-searched global weight (measured: ~0.7), and the trained model must classify
    # the test split within 3 points of that baseline (~0.2 points measured; 3 points is
    # ~5 test samples of slack).
    gap = start["validation_loss"] - start["baseline_validation_loss"]
    assert gap > 0
    assert end["validation_loss"] < start["validation_loss"] - 0.5 * gap
    assert end["test_accuracy"] > end["baseline_test_accuracy"] - 0.03
