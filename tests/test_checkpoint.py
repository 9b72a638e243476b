"""Checkpoint / resume of bl.solve: identical histories, crash safety, corruption errors."""

import os

import numpy as np
import pytest

import bilevel as bl
from bilevel import _checkpoint


@pytest.fixture(scope="module")
def setup():
    bench = bl.problems.quadratic(dim_x=3, dim_y=6, seed=1, num_samples=24, batch_size=6)
    # Momentum carries a trace in the state: it must survive a resume too. (optax.adam
    # fails under the strict dtype promotion of our tests: optax mixes float and int32.)
    import optax

    solver = bl.solvers.ImplicitDiff(inner_steps=3, outer_optimizer=optax.sgd(0.05, momentum=0.9))
    return bench, solver


def _solve(setup, num_steps, **kwargs):
    bench, solver = setup
    return bl.solve(
        bench.problem, solver, bench.x0, bench.y0, bench.data, num_steps=num_steps,
        log_every=5, progress=False, **kwargs,
    )


def _assert_same(a, b):
    assert set(a.history) == set(b.history)
    for name in a.history:
        np.testing.assert_array_equal(a.history[name], b.history[name])
    np.testing.assert_array_equal(np.asarray(a.x), np.asarray(b.x))


def test_resumed_run_equals_uninterrupted_run(setup, tmp_path):
    uninterrupted = _solve(setup, 20)
    _solve(setup, 10, checkpoint=tmp_path)  # "killed" after 10 steps
    resumed = _solve(setup, 20, checkpoint=tmp_path, resume=True)
    _assert_same(resumed, uninterrupted)
    assert resumed.num_steps == 20


def test_crash_mid_write_keeps_the_last_good_checkpoint(setup, tmp_path, monkeypatch):
    uninterrupted = _solve(setup, 20)
    real_replace, calls = os.replace, {"n": 0}

    def crashing_replace(src, dst):
        # The third checkpoint (after step 15) dies after its temporary file was written.
        if str(src).endswith(".tmp"):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(_checkpoint.os, "replace", crashing_replace)
    with pytest.raises(KeyboardInterrupt):
        _solve(setup, 20, checkpoint=tmp_path)
    monkeypatch.setattr(_checkpoint.os, "replace", real_replace)
    resumed = _solve(setup, 20, checkpoint=tmp_path, resume=True)
    _assert_same(resumed, uninterrupted)


def test_corrupted_checkpoint_is_a_clear_error_and_previous_is_kept(setup, tmp_path):
    _solve(setup, 10, checkpoint=tmp_path)
    (tmp_path / _checkpoint.CURRENT).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupted.*previous checkpoint is kept"):
        _solve(setup, 20, checkpoint=tmp_path, resume=True)
    assert (tmp_path / _checkpoint.PREVIOUS).exists()


def test_resume_needs_a_directory_and_the_same_log_every(setup, tmp_path):
    with pytest.raises(ValueError, match="checkpoint"):
        _solve(setup, 5, resume=True)
    _solve(setup, 5, checkpoint=tmp_path)
    bench, solver = setup
    with pytest.raises(ValueError, match="log_every"):
        bl.solve(bench.problem, solver, bench.x0, bench.y0, bench.data, num_steps=10,
                 log_every=2, progress=False, checkpoint=tmp_path, resume=True)
