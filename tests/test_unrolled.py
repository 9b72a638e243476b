"""Unrolled: default step sizes (the scale battery), the accelerated default inner
steps against the exact hypergradient, and one inner loop shared with ImplicitDiff (the
same batches from the same key)."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import bilevel as bl

from . import scale_battery as battery
from .helpers import relative_error


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_defaults_pass_the_scale_battery(dtype):
    # Measured: a relative gap of 1e-3 after 18 steps (float64) or 11 (float32); final
    # gaps 4e-7 / 1e-5 (bias of K = 50 unrolled steps), 1e-4 for the stiff member.
    x, history = battery.run_family(bl.solvers.Unrolled(), dtype, 100)
    for name, values in history.items():
        assert np.all(np.isfinite(np.asarray(values))), name
    gaps = battery.relative_gaps(x, dtype)
    assert np.all(gaps <= 1e-3), gaps
    t = np.asarray([m[1] for m in battery.MEMBERS])[:, None]
    f = np.asarray(history["upper_loss"], np.float64)[: len(battery.PAIRS), :20] / t[:7]
    spread = np.max(np.abs(f - f[3]) / np.abs(f[3]))
    # Measured 3e-14 (float64) and 2e-5 (float32).
    assert spread <= (1e-10 if dtype == jnp.float64 else 1e-3)


def test_default_inner_steps_give_an_accurate_unrolled_hypergradient():
    # From the warm start y0 = y*(x), the unrolled derivative is a polynomial in the
    # Hessian; with K = 50 accelerated steps of 1/L its error is 0.8% for condition
    # number 20 (gradient descent: 5.5%).
    bench = battery.quadratic(jnp.float64, lower_condition=20)
    x = jnp.array([0.5, -0.3, 0.2, 0.9])
    solver = bl.solvers.Unrolled()
    data = bl.FullBatch(upper=None, lower=bench.data.lower)
    y0 = bench.lower_solution(x)

    def hyperobjective(x):
        y = solver.unrolled_solution(bench.problem, x, y0, data, jr.PRNGKey(0), 0)
        return bench.problem.upper(x, y, None)

    grad = jax.grad(hyperobjective)(x)
    assert relative_error(grad, bench.hypergradient(x)) < 2e-2
    checkpointed = bl.solvers.Unrolled(checkpoint=True)

    def rematerialised(x):
        y = checkpointed.unrolled_solution(bench.problem, x, y0, data, jr.PRNGKey(0), 0)
        return bench.problem.upper(x, y, None)

    np.testing.assert_allclose(jax.grad(rematerialised)(x), grad, rtol=1e-12)


def test_implicit_diff_and_unrolled_draw_the_same_batches():
    bench = bl.problems.quadratic(3, 6, seed=1, num_samples=24, batch_size=4)
    key = jr.PRNGKey(5)
    x0 = jnp.array([0.3, -0.1, 0.2])
    ys, metrics = [], []
    for cls in (bl.solvers.ImplicitDiff, bl.solvers.Unrolled):
        solver = cls(inner_steps=5, inner_lr=0.1, outer_lr=0.1)
        state = solver.init(bench.problem, x0, bench.y0)
        state, step_metrics = solver.step(bench.problem, state, bench.data, key)
        ys.append(solver.params(state)[1])
        metrics.append(step_metrics)
    # The reference: the documented draws, step k on lower_batch(fold_in(key, k), k).
    inner_key = jr.split(key, 3)[0]
    grad_g = jax.grad(bench.problem.lower, argnums=1)
    y = bench.y0
    for k in range(5):
        batch = bench.data.lower_batch(jr.fold_in(inner_key, k), jnp.asarray(k))
        y = y - 0.1 * grad_g(x0, y, batch)
    np.testing.assert_allclose(ys[0], y, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(ys[1], y, rtol=1e-12, atol=1e-15)
    # The metric contract, for both: f and ||grad_y g|| at (x_k, y_K), the latter on
    # the step's lower batch (stream 1 of the third key).
    lower_batch = bench.data.lower_batch(jr.split(key, 3)[2], jnp.asarray(0), stream=1)
    residual = jnp.linalg.norm(grad_g(x0, y, lower_batch))
    for step_metrics in metrics:
        assert set(bl.METRICS) <= set(step_metrics)
        upper = bench.problem.upper(x0, y, None)
        np.testing.assert_allclose(step_metrics["upper_loss"], upper, rtol=1e-12)
        np.testing.assert_allclose(step_metrics["lower_residual"], residual, rtol=1e-10)
