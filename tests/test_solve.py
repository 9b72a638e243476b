"""The loop (run / solve), ImplicitDiff and Unrolled against the quadratic's closed
forms, non-finite handling, and the data samplers."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import bilevel as bl

from .helpers import relative_error


@pytest.fixture(scope="module")
def bench():
    return bl.problems.quadratic(dim_x=3, dim_y=6, seed=1)


def test_implicit_diff_solve_reaches_closed_form_optimum(bench):
    # F is 0.16-strongly convex (eigenvalues of M'M + 0.1 I are [0.16, 1.18]) so
    # |x - x*| <= |grad F| / 0.16: tol 1e-7 on the gradient norm bounds the error by
    # 1e-6, plus the bias of 10 warm-started inner steps, which vanishes at the fixed
    # point.
    solver = bl.solvers.ImplicitDiff(inner_steps=10, outer_lr=1.0)
    result = bl.solve(
        bench.problem,
        solver,
        bench.x0,
        bench.y0,
        bench.data,
        num_steps=400,
        log_every=20,
        progress=False,
        tol=1e-7,
    )
    assert result.status == bl.Status.converged
    assert float(jnp.linalg.norm(result.x - bench.solution)) < 1e-4  # issue target
    assert float(jnp.linalg.norm(result.y - bench.lower_solution(result.x))) < 1e-4
    assert result.history["step"][-1] == result.num_steps
    assert set(result.history) >= {"upper_loss", "grad_norm", "lower_residual", "step"}


def test_run_matches_solve_and_vmaps_over_seeds(bench):
    solver = bl.solvers.ImplicitDiff(inner_steps=5, outer_lr=0.5)
    key = jr.PRNGKey(7)
    state, history = bl.run(
        bench.problem, solver, bench.x0, bench.y0, bench.data, 30, key
    )
    result = bl.solve(
        bench.problem,
        solver,
        bench.x0,
        bench.y0,
        bench.data,
        num_steps=30,
        key=key,
        log_every=10,
        progress=False,
    )
    x_run, _ = solver.params(state)
    assert np.max(np.abs(x_run - result.x)) < 1e-14  # same keys, same arithmetic
    assert np.allclose(history["upper_loss"][9::10], result.history["upper_loss"])
    keys = jr.split(key, 3)
    x0s = jnp.stack([bench.x0, bench.x0 + 1.0, bench.x0 - 1.0])
    states, _ = jax.vmap(
        lambda x0, k: bl.run(bench.problem, solver, x0, bench.y0, bench.data, 30, k)
    )(x0s, keys)
    single, _ = bl.run(bench.problem, solver, x0s[1], bench.y0, bench.data, 30, keys[1])
    assert np.max(np.abs(states.x[1] - single.x)) < 1e-12


def _unrolled_hypergradient(bench, x, num_steps, **options):
    solver = bl.solvers.Unrolled(inner_steps=num_steps, inner_lr=0.2, **options)
    data = bl.FullBatch(upper=None, lower=bench.data.lower)

    def hyperobjective(x):
        y = solver.unrolled_solution(bench.problem, x, bench.y0, data, jr.PRNGKey(0), 0)
        return bench.problem.upper(x, y, None)

    return jax.jit(jax.grad(hyperobjective))(x)


def test_unrolled_converges_to_the_implicit_hypergradient(bench):
    # ITD from y0 = 0 converges linearly in K to the exact hypergradient.
    x = jnp.array([0.5, -0.2, 0.8])
    exact = bench.hypergradient(x)
    errors = [
        relative_error(_unrolled_hypergradient(bench, x, k), exact) for k in (5, 20, 80)
    ]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-6


def test_unrolled_checkpoint_and_truncation(bench):
    x = jnp.array([0.5, -0.2, 0.8])
    full = _unrolled_hypergradient(bench, x, 20)
    # Rematerialisation changes memory, not arithmetic.
    rematerialised = _unrolled_hypergradient(bench, x, 20, checkpoint=True)
    assert np.max(np.abs(rematerialised - full)) < 1e-13
    untruncated = _unrolled_hypergradient(bench, x, 20, truncate=20)
    assert np.max(np.abs(untruncated - full)) < 1e-13
    # Truncation drops the early terms of the back-propagated sum: a different
    # estimate.
    truncated = _unrolled_hypergradient(bench, x, 20, truncate=2)
    assert relative_error(truncated, full) > 1e-3


def test_unrolled_solve_reaches_optimum(bench):
    solver = bl.solvers.Unrolled(inner_steps=80, inner_lr=0.2, outer_lr=1.0)
    result = bl.solve(
        bench.problem,
        solver,
        bench.x0,
        bench.y0,
        bench.data,
        num_steps=300,
        log_every=50,
        progress=False,
    )
    # With a warm start y0 = y*(x) treated as a constant, ITD's gradient is the K-term
    # Neumann sum: its bias is ~ (1 - 0.2 * lambda_min(A))^K <= 0.8^80 ~ 2e-8 (A >= I).
    assert float(jnp.linalg.norm(result.x - bench.solution)) < 1e-4


def test_nonfinite_state_stops_with_last_finite_state():
    # f = sqrt(2 - x): gradient descent pushes x past 2, where the gradient is NaN.
    problem = bl.BilevelProblem(
        upper=lambda x, y, batch: jnp.sqrt(2.0 - x[0]) + jnp.sum((y - x) ** 2),
        lower=lambda x, y, batch: 0.5 * jnp.sum((y - x) ** 2),
    )
    solver = bl.solvers.ImplicitDiff(inner_steps=5, inner_lr=0.5, outer_lr=0.5)
    x0, y0 = jnp.zeros(1), jnp.zeros(1)
    result = bl.solve(
        problem, solver, x0, y0, num_steps=100, log_every=10, progress=False
    )
    assert result.status == bl.Status.nonfinite
    assert 0 < result.num_steps < 100
    # it may have jumped past 2: still finite
    assert bool(jnp.all(jnp.isfinite(result.x)))
    state, _ = bl.run(problem, solver, x0, y0, None, result.num_steps, jr.PRNGKey(0))
    assert np.max(np.abs(state.x - result.x)) < 1e-14  # exactly the last finite iterate


def test_stochastic_implicit_diff_improves_with_batch_size():
    # Minibatch noise biases/blurs the fixed point; averaged over 8 seeds (vmap over
    # keys: one compilation) the final error must fall as the batch grows, and the
    # full batch must be exact. Measured means (standard errors): 0.099 (0.014) at
    # batch 2, 0.049 (0.007) at batch 16 of 32 samples: 3 standard errors apart.
    errors = []
    for batch_size in (2, 16, None):
        bench = bl.problems.quadratic(
            dim_x=3, dim_y=6, seed=1, num_samples=32, batch_size=batch_size
        )
        solver = bl.solvers.ImplicitDiff(inner_steps=10, inner_lr=0.1, outer_lr=0.3)

        def run(k):
            return bl.run(bench.problem, solver, bench.x0, bench.y0, bench.data, 300, k)

        states, _ = jax.vmap(run)(jr.split(jr.PRNGKey(0), 8))
        distances = jnp.linalg.norm(states.x - bench.solution[None, :], axis=1)
        errors.append(float(jnp.mean(distances)))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-3


def test_minibatch_epoch_sampling_visits_every_sample_once():
    data = bl.Minibatch(upper=None, lower=jnp.arange(12.0), batch_size=4, seed=3)
    draw = jax.jit(lambda d: data.lower_batch(jr.PRNGKey(0), d))
    for epoch in range(2):
        seen = jnp.concatenate([draw(jnp.array(3 * epoch + k)) for k in range(3)])
        assert sorted(np.asarray(seen).tolist()) == list(range(12))
    # Determinism, and distinct permutations across epochs and streams.
    assert np.array_equal(draw(jnp.array(1)), draw(jnp.array(1)))
    assert not np.array_equal(draw(jnp.array(0)), draw(jnp.array(3)))
    other_stream = data.lower_batch(jr.PRNGKey(0), jnp.array(0), stream=1)
    assert not np.array_equal(draw(jnp.array(0)), other_stream)


@pytest.mark.parametrize("sampling", ["with_replacement", "without_replacement"])
def test_minibatch_random_sampling(sampling):
    data = bl.Minibatch(
        upper=jnp.arange(10.0),
        lower=jnp.arange(10.0),
        batch_size=6,
        sampling=sampling,
    )
    a = data.lower_batch(jr.PRNGKey(1), jnp.array(0))
    # deterministic
    assert np.array_equal(a, data.lower_batch(jr.PRNGKey(1), jnp.array(0)))
    # independent
    assert not np.array_equal(a, data.upper_batch(jr.PRNGKey(1), jnp.array(0)))
    assert a.shape == (6,)
    if sampling == "without_replacement":
        assert len(set(np.asarray(a).tolist())) == 6


def test_bad_inputs_get_clear_errors(bench):
    solver = bl.solvers.ImplicitDiff(inner_steps=2)

    def run(problem, x0, y0, data=bench.data):
        return bl.solve(problem, solver, x0, y0, data, num_steps=2, progress=False)

    with pytest.raises(ValueError, match="upper"):
        run(bench.problem, {"w": bench.x0}, bench.y0)  # pytree mismatch with f
    with pytest.raises(ValueError, match=r"failed .* float64\[4\]"):
        # wrong shape of y: named in the error
        run(bench.problem, bench.x0, jnp.zeros(4))
    with pytest.raises(ValueError, match="non-finite"):
        run(bench.problem, bench.x0.at[0].set(jnp.nan), bench.y0)
    with pytest.raises(TypeError, match="floating"):
        run(bench.problem, jnp.zeros(3, dtype=jnp.int32), bench.y0)
    vector_upper = bl.BilevelProblem(lambda x, y, b: y - 1.0, bench.problem.lower)
    with pytest.raises(ValueError, match="scalar"):
        run(vector_upper, bench.x0, bench.y0)
    bad_condition = bl.BilevelProblem(
        bench.problem.upper, bench.problem.lower, optimality=lambda x, y, b: y[:2]
    )
    with pytest.raises(ValueError, match="structure and shapes of y"):
        run(bad_condition, bench.x0, bench.y0)
    constrained = bl.BilevelProblem(
        bench.problem.upper, bench.problem.lower, lower_constraints=lambda x, y: y
    )
    with pytest.raises(ValueError, match="projection"):
        run(constrained, bench.x0, bench.y0)
    with pytest.raises(TypeError, match="upper"):
        bl.BilevelProblem(upper=3.0, lower=bench.problem.lower)
    with pytest.raises(ValueError, match="inner_steps"):
        bl.solvers.ImplicitDiff(inner_steps=0)
    with pytest.raises(ValueError, match="truncate"):
        bl.solvers.Unrolled(inner_steps=5, truncate=6)
    with pytest.raises(ValueError, match="num_steps"):
        bl.solve(bench.problem, solver, bench.x0, bench.y0, bench.data, num_steps=0)
    with pytest.raises(ValueError, match="tol_metric"):
        bl.solve(
            bench.problem,
            solver,
            bench.x0,
            bench.y0,
            bench.data,
            num_steps=2,
            progress=False,
            tol=1.0,
            tol_metric="nope",
        )
    with pytest.raises(ValueError, match="leading sample axis"):
        bl.Minibatch(
            upper=None, lower={"a": jnp.zeros(3), "b": jnp.zeros(4)}, batch_size=2
        )


def test_solver_state_is_a_pytree_of_arrays(bench):
    solver = bl.solvers.ImplicitDiff(inner_steps=2)
    state = solver.init(bench.problem, bench.x0, bench.y0, jr.PRNGKey(0))
    dynamic, static = eqx.partition(state, eqx.is_array)
    assert jax.tree_util.tree_leaves(static) == []
