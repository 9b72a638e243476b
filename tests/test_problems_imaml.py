"""Problems library: imaml (task construction, vmapped implicit meta-gradients against
the stacked bilevel problem and the closed-form iMAML formula, improvement under
ImplicitDiff, the episodic loop)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import bilevel as bl

from .helpers import relative_error


@pytest.fixture(scope="module")
def bench():
    return bl.problems.imaml(
        num_ways=3, num_shots=1, num_tasks=32, num_eval_tasks=50, hidden=16
    )


def _rows_in(rows, table):
    """For each row of `rows`, whether it equals some row of `table`."""
    rows, table = np.asarray(rows), np.asarray(table).reshape(-1, rows.shape[-1])
    return np.array([np.any(np.all(table == r, axis=1)) for r in rows])


def test_imaml_shapes(bench):
    (s_in, s_lab), (q_in, q_lab) = bench.data.support, bench.data.query
    assert s_in.shape == (32, 3, 64) and s_lab.shape == (32, 3)
    assert q_in.shape == (32, 30, 64) and q_lab.shape == (32, 30)
    assert [(w.shape, b.shape) for w, b in bench.x0] == [
        ((64, 16), (16,)),
        ((16, 3), (3,)),
    ]
    for x_leaf, y_leaf in zip(jax.tree.leaves(bench.x0), jax.tree.leaves(bench.y0)):
        assert y_leaf.shape == (32,) + x_leaf.shape


def test_imaml_meta_train_and_meta_test_classes_are_disjoint(bench, getkey):
    tasks = bench.data.tasks
    assert tasks.train_images.shape[0] == 6 and tasks.test_images.shape[0] == 4
    pool_images = np.concatenate(
        [bench.data.support[0].reshape(-1, 64), bench.data.query[0].reshape(-1, 64)]
    )
    assert _rows_in(pool_images, tasks.train_images).all()
    assert not _rows_in(pool_images, tasks.test_images).any()
    (test_in, _), _ = jax.jit(lambda k: tasks.sample(k, 4, "test"))(getkey())
    assert _rows_in(test_in.reshape(-1, 64), tasks.test_images).all()
    # each task's support holds one example of each of its labels 0..num_ways-1
    np.testing.assert_array_equal(
        np.sort(bench.data.support[1], axis=1), [[0, 1, 2]] * 32
    )


def test_imaml_is_deterministic_given_the_seed(bench):
    again = bl.problems.imaml(
        num_ways=3, num_shots=1, num_tasks=32, num_eval_tasks=50, hidden=16
    )
    leaves = jax.tree.leaves((bench.x0, bench.data))
    for u, v in zip(leaves, jax.tree.leaves((again.x0, again.data))):
        np.testing.assert_array_equal(u, v)


@eqx.filter_jit
def _meta_gradients(bench):
    tasks = bench.data.tasks
    support, query = bench.data.support, bench.data.query
    adapted = jax.vmap(tasks.adapt, in_axes=(None, 0))(bench.x0, support)
    _, vmapped = tasks.meta_gradient(bench.x0, support, query)
    stacked, _ = bl.hypergradient(
        bench.problem, bench.x0, adapted, query, lower_batch=support
    )
    # iMAML's closed form for task 0: lambda (lambda I + H)^{-1} grad L_q, with H the
    # dense Hessian of the support loss at the adapted parameters.
    first = jax.tree.map(lambda u: u[0], (support, query, adapted))
    flat, unravel = ravel_pytree(first[2])
    hessian = jax.hessian(
        lambda f: tasks.support_objective(bench.x0, unravel(f), first[0])
    )(flat)
    grad_query = ravel_pytree(jax.grad(tasks.task_loss)(first[2], first[1]))[0]
    closed_form = tasks.prox_reg * jnp.linalg.solve(hessian, grad_query)
    implicit = jax.grad(lambda t: tasks.task_loss(tasks.adapt(t, first[0]), first[1]))(
        bench.x0
    )
    return vmapped, stacked, closed_form, ravel_pytree(implicit)[0]


def test_vmapped_implicit_gradients_match_the_stacked_problem_and_the_closed_form(
    bench,
):
    vmapped, stacked, closed_form, implicit = _meta_gradients(bench)
    # (1) per-task implicit gradients vmapped over the tasks = one IFT solve on the
    # stacked (block-diagonal) problem at the same adapted parameters; both CG solves
    # run to rtol 1e-10.
    assert relative_error(vmapped, stacked) < 1e-8
    # (2) the implicit gradient of task 0 = iMAML's closed form with a dense Hessian
    # (1091 parameters, condition ~1e1: a direct solve is exact to rounding).
    assert relative_error(implicit, closed_form) < 1e-8


# Meta-test accuracy is measured after adaptation on 50 tasks of classes 6-9, never seen
# in meta-training: 50 x 30 = 1500 paired query predictions, standard error ~1.3
# points. Both tests require 10 points over adapting from the random initialisation
# (~50%), about half the measured gains (see each test).


def test_imaml_improves_under_implicit_diff(bench):
    # generic solver on the fixed pool of 32 tasks; measured: +20 points after 40 steps
    solver = bl.solvers.ImplicitDiff(inner_steps=20, inner_lr=0.05, outer_lr=0.5)
    state, _ = bl.run(bench.problem, solver, bench.x0, bench.y0, bench.data, 40)
    end = bench.evaluate(*solver.params(state))
    assert end["meta_test_accuracy"] > end["baseline_meta_test_accuracy"] + 0.10


def test_episodic_imaml_improves(bench):
    # fresh meta-batches of 8 tasks, vmapped implicit gradients; measured: +26 points
    theta, history = bl.problems.imaml_meta_train(
        bench, jr.PRNGKey(0), num_steps=30, meta_batch_size=8, outer_lr=0.5
    )
    end = bench.evaluate(theta, bench.y0)
    assert end["meta_test_accuracy"] > end["baseline_meta_test_accuracy"] + 0.10
    assert history["query_loss"].shape == (30,)


@jax.jit
def _sinusoid_fit(support, query):
    # A sin(u - p) = a sin u + b cos u: least-squares (a, b) on each task's support
    # points, then the prediction of its query points (the network inputs are u / 5).
    def basis(inputs):
        u = 5.0 * inputs[:, 0]
        return jnp.stack([jnp.sin(u), jnp.cos(u)], axis=1)

    def one(s_in, s_out, q_in):
        coef = jnp.linalg.lstsq(basis(s_in), s_out)[0]
        return basis(q_in) @ coef, jnp.linalg.norm(coef)

    return jax.vmap(one)(support[0], support[1], query[0])


def test_sinusoid_tasks_lie_on_one_sinusoid_each():
    sinusoid = bl.problems.imaml(
        task="sinusoid", num_shots=5, num_queries=7, num_tasks=6, num_eval_tasks=2
    )
    (s_in, _), (_, q_out) = sinusoid.data.support, sinusoid.data.query
    assert s_in.shape == (6, 5, 1) and q_out.shape == (6, 7)
    assert float(jnp.max(jnp.abs(s_in))) <= 1.0
    predicted, amplitude = _sinusoid_fit(sinusoid.data.support, sinusoid.data.query)
    # the query points lie on the support points' sinusoid (rounding only) ...
    np.testing.assert_allclose(predicted, q_out, atol=1e-10)
    # ... whose amplitude is in the documented range [0.1, 5]
    assert np.all((amplitude >= 0.1) & (amplitude <= 5.0))


_not_imaml = bl.problems.Benchmark(
    name="other",
    problem=None,
    x0=jnp.zeros(2),
    y0=jnp.zeros(2),
    data=None,
    evaluate=dict,
)


def test_imaml_bad_input_fails_early():
    with pytest.raises(ValueError, match="2 <= num_ways <= 4"):
        bl.problems.imaml(num_ways=5)
    with pytest.raises(ValueError, match="`task` must be 'digits' or 'sinusoid'"):
        bl.problems.imaml(task="omniglot")
    with pytest.raises(ValueError, match="imaml_meta_train needs a benchmark built by"):
        bl.problems.imaml_meta_train(_not_imaml, jr.PRNGKey(0))
    with pytest.raises(ValueError, match="exceeds the"):
        bl.problems.imaml(num_shots=100, num_queries=100)
