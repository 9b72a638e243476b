"""The loop (bl.init / bl.run_from / bl.run / bl.solve): continuation with the same
trajectory, failure detection inside the compiled loop (nonfinite, diverged) keeping the
last good state, one compilation per solve, warnings and progress output."""

import io
import logging
import warnings
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import pytest

import bilevel as bl
from bilevel import _progress
from bilevel._data import bind_run_key
from bilevel._solve import WARMUP


@pytest.fixture(scope="module")
def bench():
    return bl.problems.quadratic(dim_x=3, dim_y=6, seed=1)


def _solver(outer_lr):
    # Unrolled with 3 inner steps: quick to compile. The step size as an array: one
    # compilation serves every value, and it can be vmapped.
    return bl.solvers.Unrolled(
        inner_steps=3, inner_lr=0.2, outer_lr=jnp.asarray(outer_lr)
    )


def _assert_trees_equal(a, b):
    assert jtu.tree_structure(a) == jtu.tree_structure(b)
    for u, v in zip(jtu.tree_leaves(a), jtu.tree_leaves(b)):
        if jnp.issubdtype(u.dtype, jax.dtypes.prng_key):
            u, v = jr.key_data(u), jr.key_data(v)
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


# ------------------------------------------------------------------ continuation


def test_chunked_runs_are_bit_identical_to_one_shot():
    # Minibatches: every step draws from its own key, so a wrong key in any chunk
    # shows.
    stochastic = bl.problems.quadratic(
        dim_x=3, dim_y=6, seed=1, num_samples=24, batch_size=6
    )
    problem, data = stochastic.problem, stochastic.data
    solver = _solver(0.3)
    key = jr.key(5)  # a new-style key
    loop = bl.init(problem, solver, stochastic.x0, stochastic.y0, data, key)
    one_shot, history = bl.run_from(problem, solver, loop, data, 30)
    chunked, parts, states = loop, [], []
    for _ in range(3):
        chunked, part = bl.run_from(problem, solver, chunked, data, 10)
        parts.append(part)
        states.append(chunked.state)
    _assert_trees_equal(chunked, one_shot)
    for name in history:
        np.testing.assert_array_equal(
            np.concatenate([p[name] for p in parts]), history[name]
        )
    assert int(one_shot.step) == 30 and int(one_shot.status) == 0
    # bl.run is init + run_from, and step k receives loop.step_key(k).
    state, _ = bl.run(problem, solver, stochastic.x0, stochastic.y0, data, 30, key)
    _assert_trees_equal(state, one_shot.state)
    # The loop draws epoch permutations from its run key: bind it as the loop does.
    bound = bind_run_key(data, loop.key)
    step = jax.jit(lambda state, key: solver.step(problem, state, bound, key)[0])
    manual = loop.state
    for k in range(10):
        manual = step(manual, loop.step_key(k))
    # step by step outside the scan: the same keys, equal to rounding
    np.testing.assert_allclose(manual.x, states[0].x, rtol=1e-13)


def test_run_from_under_jit_matches_eager(bench):
    solver = _solver(0.5)
    loop = bl.init(bench.problem, solver, bench.x0, bench.y0, bench.data, jr.PRNGKey(2))
    eager, history = bl.run_from(bench.problem, solver, loop, bench.data, 20)
    jitted, jitted_history = jax.jit(
        lambda loop: bl.run_from(bench.problem, solver, loop, bench.data, 20)
    )(loop)
    # Same arithmetic in one program instead of two: equal to rounding.
    np.testing.assert_allclose(jitted.state.x, eager.state.x, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(jitted_history["finite"], history["finite"])


# ------------------------------------------------------------------ divergence


def _expected_kept(history, divergence):
    """NumPy transcription of the documented rule on an unchecked history: the first
    failing step j (non-finite metric; |upper_loss| from step 1, lower_residual from
    step WARMUP, above `divergence` times the largest value of the first WARMUP steps
    before it); the state kept is the one before step j's iterate."""
    f = np.abs(np.asarray(history["upper_loss"], dtype=np.float64))
    r = np.asarray(history["lower_residual"], dtype=np.float64)
    for j in range(len(f)):
        if not (np.isfinite(f[j]) and np.isfinite(r[j])):
            return max(j - 1, 0)
        ref_f, ref_r = f[: min(j, WARMUP)].max(initial=0), r[:WARMUP].max()
        if j >= 1 and ref_f > 0 and f[j] > divergence * ref_f:
            return j - 1
        if j >= WARMUP and ref_r > 0 and r[j] > divergence * ref_r:
            return j - 1
    return None


@pytest.mark.parametrize("divergence", [1e6, 1e3])
def test_diverging_run_stops_with_the_last_good_state(bench, divergence, tmp_path):
    # Gradient descent with step 4 on F (lambda_max(hess F) = 1.18, and the 3-step
    # unrolled estimate is close): the iterates grow geometrically, staying finite for
    # hundreds of steps.
    solver = _solver(4.0)
    _, unchecked = bl.run(
        bench.problem, solver, bench.x0, bench.y0, bench.data, 60, divergence=None
    )
    assert np.all(np.isfinite(unchecked["upper_loss"]))
    kept = _expected_kept(unchecked, divergence)
    assert kept is not None and kept > WARMUP  # the rule fires, after the warm-up

    state, history = bl.run(
        bench.problem, solver, bench.x0, bench.y0, bench.data, 60, divergence=divergence
    )
    assert int(np.sum(history["finite"] & ~history["diverged"])) == kept
    assert np.all(history["finite"]) and history["diverged"][-1]
    reference, _ = bl.run(
        bench.problem, solver, bench.x0, bench.y0, bench.data, kept, divergence=None
    )
    _assert_trees_equal(state, reference)  # exactly the last good state

    for checkpoint in (None, tmp_path):  # the re-run starts from the last checkpoint
        result = bl.solve(
            bench.problem,
            solver,
            bench.x0,
            bench.y0,
            bench.data,
            num_steps=60,
            log_every=7,
            progress=False,
            divergence=divergence,
            checkpoint=checkpoint,
        )
        assert result.status == bl.Status.diverged
        assert result.num_steps == kept == int(result.history["step"][-1])
        _assert_trees_equal(result.state, reference)
        # the last row shows the step that failed, not a finite-looking old row
        assert result.history["upper_loss"][-1] == unchecked["upper_loss"][kept + 1]


def test_unrolled_with_inner_lr_one_is_reported_diverged(bench):
    # The example (it used to end `max_steps` with x ~ 1e280): inner gradient
    # steps of size 1 on a lower Hessian with eigenvalues above 2 blow y up, and the
    # upper loss jumps ~1e32-fold at step 1. Step 0's metrics are those of the start
    # (its blown-up y is only seen by step 1), so the start is the last good state.
    result = bl.solve(
        bench.problem,
        bl.solvers.Unrolled(inner_lr=1.0),
        bench.x0,
        bench.y0,
        bench.data,
        num_steps=50,
        log_every=10,
        progress=False,
    )
    assert result.status == bl.Status.diverged and result.num_steps == 0
    np.testing.assert_array_equal(result.x, bench.x0)
    start = bench.evaluate(bench.x0, bench.y0)["hyper_objective"]  # f(x0, y0): y0 = y*
    assert result.history["upper_loss"][-1] > 1e6 * float(start)  # the failing row


def test_divergence_is_detected_per_run_under_vmap(bench):
    rates = jnp.array([0.5, 4.0])
    run = jax.vmap(
        lambda lr: bl.run(
            bench.problem, _solver(lr), bench.x0, bench.y0, bench.data, 60
        )
    )
    states, history = run(rates)
    assert history["diverged"].shape == (2, 60)
    assert not history["diverged"][0].any() and history["diverged"][1, -1]
    for i, lr in enumerate(rates):
        single, single_history = bl.run(
            bench.problem, _solver(lr), bench.x0, bench.y0, bench.data, 60
        )
        np.testing.assert_allclose(states.x[i], single.x, rtol=1e-12)
        np.testing.assert_array_equal(
            history["diverged"][i], single_history["diverged"]
        )


def test_divergence_argument_is_checked(bench):
    with pytest.raises(ValueError, match="divergence"):
        bl.run(
            bench.problem,
            _solver(0.5),
            bench.x0,
            bench.y0,
            bench.data,
            5,
            divergence=0.5,
        )


# ------------------------------------------------------------------ non-finite states


class _Poisoned(bl.AbstractBilevelSolver):
    """x <- x / 2, with a buffer that turns NaN at step `poison` (invisible in the
    metrics) and reaches x one step later; reports `hypergradient_status` 1 at steps
    3 and 7."""

    supports: ClassVar[frozenset[str]] = frozenset({"single_block"})
    poison: int = eqx.field(static=True, default=10**9)

    def _init(self, problem, x0, y0, key):
        return {
            "x": x0,
            "y": y0,
            "buffer": jnp.zeros_like(x0),
            "step": jnp.zeros((), jnp.int32),
        }

    def _step(self, problem, state, data, key):
        x, step = state["x"], state["step"]
        buffer = jnp.where(step == self.poison, jnp.nan, state["buffer"])
        metrics = {
            "upper_loss": problem.upper(x, state["y"], None),
            "grad_norm": jnp.linalg.norm(x),
            "lower_residual": jnp.zeros(()),
            "hypergradient_status": jnp.where((step == 3) | (step == 7), 1, 0),
        }
        new = {
            "x": 0.5 * x + state["buffer"],
            "y": state["y"],
            "buffer": buffer,
            "step": step + 1,
        }
        return new, metrics

    def _params(self, state):
        return state["x"], state["y"]


@pytest.mark.parametrize("poison", [5, 11])
def test_nan_hidden_from_the_metrics_is_rolled_back(bench, poison):
    # Step `poison` puts a NaN in the buffer (the state after it is bad although its
    # metrics are not); step poison+1 moves it into x; step poison+2's metrics are NaN.
    # With 12 steps, poison = 11 is only seen in the end state. Either way the run
    # keeps `poison` steps: x0 / 2**poison exactly.
    solver = _Poisoned(poison=poison)
    x0 = jnp.ones(3)
    expected = x0 / 2.0**poison
    state, history = bl.run(bench.problem, solver, x0, bench.y0, bench.data, 12)
    np.testing.assert_array_equal(state["x"], expected)
    assert int(np.sum(history["finite"])) == poison and not history["finite"][-1]
    traced, traced_history = jax.jit(
        lambda x0: bl.run(bench.problem, solver, x0, bench.y0, bench.data, 12)
    )(x0)
    np.testing.assert_array_equal(traced["x"], expected)
    np.testing.assert_array_equal(traced_history["finite"], history["finite"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # hypergradient_status
        result = bl.solve(
            bench.problem,
            solver,
            x0,
            bench.y0,
            bench.data,
            num_steps=12,
            log_every=4,
            progress=False,
        )
    assert result.status == bl.Status.nonfinite and result.num_steps == poison
    np.testing.assert_array_equal(result.x, expected)


def test_run_is_differentiable(bench):
    # x_12 = x0 / 2**12 for the toy solver: d sum(x_12) / d x0 = 2**-12 exactly; a
    # failure-free run stays reverse-differentiable (the recovery is not traced into
    # the gradient).
    def final(x0):
        state, _ = bl.run(bench.problem, _Poisoned(), x0, bench.y0, bench.data, 12)
        return jnp.sum(state["x"])

    np.testing.assert_array_equal(jax.grad(final)(jnp.ones(3)), jnp.full(3, 2.0**-12))


def test_nonzero_hypergradient_status_warns_once(bench):
    with pytest.warns(RuntimeWarning, match="hypergradient_status 1 at step 4.*trunc"):
        bl.solve(
            bench.problem,
            _Poisoned(),
            jnp.ones(3),
            bench.y0,
            bench.data,
            num_steps=12,
            log_every=1,
            progress=False,
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bl.solve(
            bench.problem,
            _Poisoned(),
            jnp.ones(3),
            bench.y0,
            bench.data,
            num_steps=12,
            log_every=1,
            progress=False,
        )
    assert len([w for w in caught if "hypergradient_status" in str(w.message)]) == 1


# ------------------------------------------------------------------ compilation


def test_solve_compiles_its_chunk_once(caplog):
    # A size no other test uses. With chunks of 5, 5, 5, 5 and a shorter last one of
    # 3, the chunk function compiles exactly once; a second solve compiles nothing at
    # all, nor does one with another key. Chunks that all have log_every steps (20
    # steps) use a scan of known length: again one compilation.
    small = bl.problems.quadratic(dim_x=2, dim_y=5, seed=4)
    solver = _solver(0.5)

    def compiled(num_steps=23, **kwargs):
        caplog.clear()
        with caplog.at_level(logging.WARNING), jax.log_compiles():
            result = bl.solve(
                small.problem,
                solver,
                small.x0,
                small.y0,
                small.data,
                num_steps=num_steps,
                log_every=5,
                progress=False,
                **kwargs,
            )
        assert result.num_steps == num_steps
        return [
            r.getMessage().split(" with ")[0]
            for r in caplog.records
            if r.getMessage().startswith("Compiling")
        ]

    first = compiled()
    assert sum("_chunk" in name for name in first) == 1, first
    assert compiled() == []
    assert compiled(key=jr.PRNGKey(3)) == []  # another key: same compiled function
    exact = compiled(num_steps=20)
    assert sum("_chunk" in name for name in exact) == 1, exact
    assert compiled(num_steps=30) == []


# ------------------------------------------------------------------ progress output


def test_progress_prints_plain_lines_when_not_a_terminal(bench, capsys):
    bl.solve(
        bench.problem,
        _solver(0.5),
        bench.x0,
        bench.y0,
        bench.data,
        num_steps=20,
        log_every=5,
        progress=True,
    )
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4  # one per log point, no carriage-return bar
    assert lines[-1].startswith("step 20/20")
    assert all("upper_loss" in line and "lower_residual" in line for line in lines)
    assert max(len(line) for line in lines) <= 80
    assert "\r" not in capsys.readouterr().err


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_fits_80_columns():
    stream = _Terminal()
    bar = _progress.display(True, 100000, 0, None, "grad_norm", stream=stream)
    assert isinstance(bar, _progress.Bar)
    row = {"upper_loss": np.float64(-1.234567e-3), "lower_residual": np.float64(2.5e7)}
    for done in (1000, 50000, 100000):
        bar.update(done, row)
    bar.close()
    frames = [f.strip("\n") for f in stream.getvalue().split("\r") if f.strip()]
    assert frames and all(len(frame) <= 80 for frame in frames), frames
    assert "-1.235e-03" in frames[-1] and "2.500e+07" in frames[-1]  # numbers not cut
    assert "lower_res" in frames[-1]
