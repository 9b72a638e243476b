"""Problems library: hypercleaning and distillation on digits (shapes, determinism,
closed forms, improvement under ImplicitDiff)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import bilevel as bl
from bilevel.problems import _hypercleaning

from .helpers import relative_error


# ---------------------------------------------------------------------- hypercleaning


@pytest.fixture(scope="module")
def cleaning():
    return bl.problems.hypercleaning(corruption=0.3, num_train=200, num_val=100, seed=0)


def test_hypercleaning_shapes(cleaning):
    assert cleaning.x0.shape == (200,)
    assert cleaning.y0["weights"].shape == (64, 10)
    assert cleaning.y0["bias"].shape == (10,)
    inputs, labels, index = cleaning.data.lower
    assert inputs.shape == (200, 64) and labels.shape == (200,)
    np.testing.assert_array_equal(index, np.arange(200))
    assert cleaning.data.upper[0].shape == (100, 64)
    mlp = bl.problems.hypercleaning(model="mlp", num_train=50, num_val=20, hidden=8)
    assert {k: v.shape for k, v in mlp.y0.items()} == {
        "w1": (64, 8),
        "b1": (8,),
        "w2": (8, 10),
        "b2": (10,),
    }
    assert not mlp.problem.condition.positive_semidefinite  # non-convex: no CG


def test_hypercleaning_corrupts_the_requested_fraction():
    labels = np.arange(1000) % 10
    noisy, mask = _hypercleaning._corrupt(labels, 0.3, seed=5)
    assert mask.sum() == 300
    assert np.all(noisy[mask] != labels[mask]) and np.all(noisy[~mask] == labels[~mask])
    # the wrong class is uniform over the 9 others: each offset is drawn ~300/9 = 33
    # times; 10..60 is beyond 4 binomial standard deviations (sd ~5.5).
    offsets = np.bincount((noisy[mask] - labels[mask]) % 10, minlength=10)[1:]
    assert offsets.min() >= 10 and offsets.max() <= 60


def test_hypercleaning_is_deterministic_given_the_seed(cleaning):
    again = bl.problems.hypercleaning(
        corruption=0.3, num_train=200, num_val=100, seed=0
    )
    other = bl.problems.hypercleaning(
        corruption=0.3, num_train=200, num_val=100, seed=1
    )
    for u, v in zip(jax.tree.leaves(cleaning.data), jax.tree.leaves(again.data)):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(cleaning.data.lower[1], other.data.lower[1])


def test_hypercleaning_minibatches_pick_the_matching_weights(cleaning, getkey):
    # With minibatches, the lower batch carries sample indices so that entry i of x
    # weights sample i: the minibatch loss must equal the weighted mean computed by
    # hand over the same samples.
    batched = bl.problems.hypercleaning(
        corruption=0.3, num_train=200, num_val=100, seed=0, batch_size=16
    )
    inputs, labels, index = batched.data.lower_batch(getkey(), jnp.array(3))
    x = jr.normal(getkey(), (200,))
    y = jax.tree.map(lambda u: jr.normal(getkey(), u.shape), batched.y0)
    logits = inputs @ y["weights"] + y["bias"][None, :]
    losses = -jax.nn.log_softmax(logits)[jnp.arange(16), labels]
    reference = jnp.mean(jax.nn.sigmoid(x[index]) * losses)
    reference += 0.5e-3 * jnp.sum(y["weights"] ** 2)
    got = batched.problem.lower(x, y, (inputs, labels, index))
    np.testing.assert_allclose(got, reference, rtol=1e-12)
    # and the indexed inputs are the full-batch rows
    np.testing.assert_array_equal(inputs, cleaning.data.lower[0][index])


def test_hypercleaning_improves_under_implicit_diff(cleaning):
    solver = bl.solvers.ImplicitDiff(inner_steps=20, inner_lr=0.1, outer_lr=100.0)
    state, _ = bl.run(
        cleaning.problem, solver, cleaning.x0, cleaning.y0, cleaning.data, 30
    )
    end = cleaning.evaluate(*solver.params(state))
    # Training on all 30%-corrupted labels (uniform weights) reaches ~54% test accuracy,
    # training on the clean samples only ~91%. After 30 steps (measured: 84%, F1 0.61)
    # require 15 points over the uniform-weight baseline and an F1 of 0.4 for flagging
    # corrupted samples (F1 of flagging at random is ~0.3 at best; at x0 it is 0).
    assert end["test_accuracy"] > end["baseline_test_accuracy"] + 0.15
    assert end["f1_corrupted"] > 0.4
    assert end["oracle_test_accuracy"] > end["baseline_test_accuracy"]


# ----------------------------------------------------------------------- distillation


@pytest.fixture(scope="module")
def distill():
    return bl.problems.distillation(
        images_per_class=1, lower="krr", num_train=300, seed=0
    )


def test_distillation_shapes_and_real_initial_subset(distill):
    assert distill.x0.shape == (10, 64) and distill.y0.shape == (10, 10)
    inputs, labels = distill.data.upper
    assert inputs.shape == (300, 64)
    # x0 is a random real subset: row c is a training image of class c.
    for c in range(10):
        same_row = np.all(np.asarray(inputs) == np.asarray(distill.x0[c]), axis=1)
        matches = np.flatnonzero(same_row)
        assert matches.size >= 1 and np.all(np.asarray(labels)[matches] == c)
    two = bl.problems.distillation(
        images_per_class=2, lower="mlp", num_train=300, hidden=8
    )
    assert two.x0.shape == (20, 64) and two.y0["w1"].shape == (64, 8)


def test_distillation_is_deterministic_given_the_seed(distill):
    again = bl.problems.distillation(
        images_per_class=1, lower="krr", num_train=300, seed=0
    )
    other = bl.problems.distillation(
        images_per_class=1, lower="krr", num_train=300, seed=1
    )
    np.testing.assert_array_equal(distill.x0, again.x0)
    np.testing.assert_array_equal(distill.data.upper[0], again.data.upper[0])
    assert not np.array_equal(distill.x0, other.x0)


def test_distillation_closed_form_solution_and_hypergradient(distill, getkey):
    x = distill.x0 + 0.1 * jr.normal(getkey(), distill.x0.shape)
    alpha = distill.lower_solution(x)
    # alpha*(x) zeroes the lower gradient (K + lambda I) alpha - Y; the kernel matrix of
    # 10 distinct images plus lambda = 0.01 has condition ~1e2: 1e-12 is rounding.
    stationarity = jax.grad(distill.problem.lower, argnums=1)(x, alpha, None)
    assert float(jnp.max(jnp.abs(stationarity))) < 1e-12
    # IFT hypergradient (matrix-free CG, rtol 1e-10) vs autodiff through the direct
    # solve of the closed form.
    grad, info = eqx.filter_jit(bl.hypergradient)(
        distill.problem, x, alpha, distill.data.upper
    )
    assert relative_error(grad, distill.hypergradient(x)) < 1e-8
    assert info.linear_converged


def test_distillation_beats_a_random_real_subset(distill):
    solver = bl.solvers.ImplicitDiff(inner_steps=20, inner_lr=0.3, outer_lr=20.0)
    state, _ = bl.run(distill.problem, solver, distill.x0, distill.y0, distill.data, 30)
    end = distill.evaluate(*solver.params(state))
    # One real image per class gives ~56% test accuracy with kernel ridge regression;
    # 30 steps of distillation measured ~77%. "Clearly better": 10 points over the
    # random real subset of the same size (the initial point).
    assert end["distilled_test_accuracy"] > end["baseline_test_accuracy"] + 0.10
