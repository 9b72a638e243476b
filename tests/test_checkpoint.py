"""Checkpoint / resume of bl.solve: identical histories across kills, crash windows and
damaged files, refusal of another run's checkpoint (naming what differs), one writer
per directory, and resumes that do what they are asked."""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel as bl
from bilevel import _checkpoint


def _setup(lr=0.05, seed=1):
    bench = bl.problems.quadratic(
        dim_x=3, dim_y=6, seed=seed, num_samples=24, batch_size=6
    )
    # Momentum carries a trace in the state: it must survive a resume too. (optax.adam
    # fails under the strict dtype promotion of our tests: optax mixes float and int32.)
    import optax

    solver = bl.solvers.ImplicitDiff(
        inner_steps=3, outer_optimizer=optax.sgd(lr, momentum=0.9)
    )
    return bench, solver


@pytest.fixture(scope="module")
def setup():
    return _setup()


def _solve(setup, num_steps, log_every=5, **kwargs):
    bench, solver = setup
    return bl.solve(
        bench.problem,
        solver,
        bench.x0,
        bench.y0,
        bench.data,
        num_steps=num_steps,
        log_every=log_every,
        progress=False,
        **kwargs,
    )


@pytest.fixture(scope="module")
def uninterrupted(setup):
    return _solve(setup, 20)


def _assert_same(a, b):
    assert set(a.history) == set(b.history)
    for name in a.history:
        np.testing.assert_array_equal(a.history[name], b.history[name])
    np.testing.assert_array_equal(np.asarray(a.x), np.asarray(b.x))
    assert a.status == b.status and a.num_steps == b.num_steps


def test_resumed_run_equals_uninterrupted_run(setup, uninterrupted, tmp_path):
    _solve(setup, 10, checkpoint=tmp_path)  # "killed" after 10 steps
    resumed = _solve(setup, 20, checkpoint=tmp_path, resume=True)
    _assert_same(resumed, uninterrupted)
    assert not list(tmp_path.glob("*.tmp"))  # temporary files never stay behind


def _crash_on(monkeypatch, target: str, call: int):
    """Make the `call`-th os.replace onto `target` die (as a kill would)."""
    real_replace, calls = os.replace, {"n": 0}

    def crashing_replace(src, dst):
        if str(dst).endswith(target):
            calls["n"] += 1
            if calls["n"] == call:
                raise KeyboardInterrupt("simulated kill")
        return real_replace(src, dst)

    monkeypatch.setattr(_checkpoint.os, "replace", crashing_replace)


@pytest.mark.parametrize("target", [_checkpoint.CURRENT, _checkpoint.PREVIOUS])
def test_kill_while_writing_keeps_a_complete_checkpoint(
    setup, uninterrupted, tmp_path, monkeypatch, target
):
    # The third checkpoint (after step 15) dies after its temporary file was written:
    # before it replaces the current file, or before the previous one is updated.
    _crash_on(monkeypatch, target, 3 if target == _checkpoint.CURRENT else 2)
    with pytest.raises(KeyboardInterrupt):
        _solve(setup, 20, checkpoint=tmp_path)
    monkeypatch.undo()
    assert (tmp_path / _checkpoint.CURRENT).exists()  # never a window without one
    _assert_same(_solve(setup, 20, checkpoint=tmp_path, resume=True), uninterrupted)


def test_missing_or_damaged_checkpoint_falls_back_to_the_previous(
    setup, uninterrupted, tmp_path
):
    _solve(setup, 10, checkpoint=tmp_path)  # checkpoints at 5 (previous) and 10
    current = tmp_path / _checkpoint.CURRENT
    current.unlink()  # what a kill between two renames used to leave
    with pytest.warns(UserWarning, match="missing: resuming from .*prev"):
        resumed = _solve(setup, 20, checkpoint=tmp_path, resume=True)
    _assert_same(resumed, uninterrupted)

    current.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="corrupted .*resuming from .*prev"):
        resumed = _solve(setup, 20, checkpoint=tmp_path, resume=True)
    _assert_same(resumed, uninterrupted)

    current.write_bytes(b"not a checkpoint")
    (tmp_path / _checkpoint.PREVIOUS).write_bytes(b"damaged too")
    with pytest.raises(ValueError, match="no usable checkpoint.*corrupted"):
        _solve(setup, 20, checkpoint=tmp_path, resume=True)


def test_a_state_of_another_layout_is_named_not_called_corrupted(setup, tmp_path):
    """A checkpoint read intact whose solver state does not fit the one this run builds
    (saved by another version of a solver whose state gained a field) is refused at
    once with that reason, not reported as damaged and not replaced by the previous
    checkpoint (which has the same layout)."""
    _solve(setup, 10, checkpoint=tmp_path)
    other_layout = {"step": jnp.zeros((), jnp.int32), "extra": jnp.zeros(3)}
    with pytest.raises(_checkpoint.CheckpointError, match="laid out differently"):
        _checkpoint.load(tmp_path, other_layout)


def test_missing_metadata_is_reported_as_corruption(setup, tmp_path):
    _solve(setup, 5, checkpoint=tmp_path)
    path = tmp_path / _checkpoint.CURRENT
    with np.load(path) as archive:
        arrays = dict(archive)
    meta = {"format": _checkpoint.FORMAT, "done": 5, "status": "max_steps"}
    arrays["meta"] = np.array(__import__("json").dumps(meta))
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    with pytest.raises(
        ValueError, match=r"corrupted \(metadata without \['fingerprint'\]"
    ):
        _solve(setup, 10, checkpoint=tmp_path, resume=True)


def _changed(setup, change):
    bench, solver = setup
    kwargs = {
        "problem": bench.problem,
        "solver": solver,
        "x0": bench.x0,
        "y0": bench.y0,
        "data": bench.data,
        "log_every": 5,
    }
    if change == "solver":
        kwargs["solver"] = _setup(lr=0.06)[1]
    elif change == "data":
        lower = jax.tree_util.tree_map(lambda a: a.at[0].add(1.0), bench.data.lower)
        kwargs["data"] = bl.Minibatch(upper=bench.data.upper, lower=lower, batch_size=6)
    elif change == "problem":
        other = _setup(seed=2)[0]  # same shapes, other matrices
        kwargs["problem"], kwargs["data"] = other.problem, other.data
    elif change == "x0":
        kwargs["x0"] = jnp.zeros(3, jnp.float32)
    elif change == "log_every":
        kwargs["log_every"] = 2
    return kwargs


@pytest.mark.parametrize(
    "change, named",
    [
        ("solver", r"solver\.outer_optimizer"),
        ("data", r"data\.lower"),
        ("problem", r"problem\.(upper|lower)"),
        ("x0", r"x0: float64\[3\] \(checkpoint\) vs float32\[3\]"),
        ("log_every", r"log_every: 5 \(checkpoint\) vs 2"),
    ],
)
def test_resume_of_another_run_is_refused_naming_what_differs(
    setup, tmp_path, change, named
):
    _solve(setup, 5, checkpoint=tmp_path)
    kwargs = _changed(setup, change)
    with pytest.raises(ValueError, match=f"belongs to another run(.|\n)*{named}"):
        bl.solve(
            num_steps=10, progress=False, checkpoint=tmp_path, resume=True, **kwargs
        )


_KILLED_RUN = """
import os, signal, sys
import jax
jax.config.update("jax_enable_x64", True)
sys.path.insert(0, {tests!r})
from test_checkpoint import _setup
import bilevel as bl

bench, solver = _setup()

def kill(step, metrics, x, y):  # after the checkpoint of step 10 is written
    if step == 10:
        os.kill(os.getpid(), signal.SIGKILL)

bl.solve(bench.problem, solver, bench.x0, bench.y0, bench.data, num_steps=20,
         log_every=5, progress=False, checkpoint={directory!r}, callback=kill)
"""


def test_killed_process_resumes_exactly_and_refuses_another_config(
    setup, uninterrupted, tmp_path
):
    tests = str(pathlib.Path(__file__).parent)
    script = _KILLED_RUN.format(tests=tests, directory=str(tmp_path))
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(tests).parent)}
    process = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert process.returncode == -signal.SIGKILL, process.stderr
    with pytest.raises(ValueError, match="solver.outer_optimizer"):
        bl.solve(
            setup[0].problem,
            _setup(lr=0.06)[1],
            setup[0].x0,
            setup[0].y0,
            setup[0].data,
            num_steps=20,
            log_every=5,
            progress=False,
            checkpoint=tmp_path,
            resume=True,
        )
    resumed = _solve(setup, 20, checkpoint=tmp_path, resume=True)
    _assert_same(resumed, uninterrupted)


def test_a_second_writer_fails_fast(setup, uninterrupted, tmp_path):
    errors = []

    def second_run(step, metrics, x, y):
        if step == 10:
            with pytest.raises(
                ValueError, match=f"in use by another run .*{os.getpid()}"
            ):
                _solve(setup, 20, checkpoint=tmp_path, resume=True)
            errors.append(step)

    first = _solve(setup, 20, checkpoint=tmp_path, callback=second_run)
    assert errors == [10]
    _assert_same(first, uninterrupted)  # the first run was not disturbed
    _assert_same(_solve(setup, 20, checkpoint=tmp_path, resume=True), uninterrupted)


def test_existing_checkpoint_needs_resume_or_overwrite(setup, tmp_path):
    _solve(setup, 20, checkpoint=tmp_path)
    with pytest.raises(ValueError, match="already holds a checkpoint.*overwrite=True"):
        _solve(setup, 10, checkpoint=tmp_path)
    fresh = _solve(setup, 10, checkpoint=tmp_path, overwrite=True)
    _assert_same(fresh, _solve(setup, 10))  # a new run, nothing of the old one
    _assert_same(_solve(setup, 10, checkpoint=tmp_path, resume=True), fresh)
    with pytest.raises(ValueError, match="resume"):
        _solve(setup, 10, checkpoint=tmp_path, resume=True, overwrite=True)


def test_resume_does_what_is_asked(setup, uninterrupted, tmp_path):
    _solve(setup, 20, checkpoint=tmp_path)
    with pytest.raises(ValueError, match="20 steps done, more than num_steps=10"):
        _solve(setup, 10, checkpoint=tmp_path, resume=True)
    _assert_same(_solve(setup, 20, checkpoint=tmp_path, resume=True), uninterrupted)

    # A run that converged under a loose tol continues under a tighter one, and
    # ends where an uninterrupted run with the tight tol ends.
    grad_norms = uninterrupted.history["grad_norm"]
    loose, tight = float(grad_norms[1]), 0.5 * float(np.min(grad_norms))
    other = tmp_path / "converged"
    converged = _solve(setup, 20, checkpoint=other, tol=loose)
    assert converged.status == bl.Status.converged
    assert converged.num_steps == 5 * (np.argmax(grad_norms <= loose) + 1) < 20
    _assert_same(
        _solve(setup, 20, checkpoint=other, resume=True, tol=loose), converged
    )  # still met: nothing to do
    tighter = _solve(setup, 20, checkpoint=other, resume=True, tol=tight)
    _assert_same(tighter, _solve(setup, 20, tol=tight))
    assert tighter.status == bl.Status.max_steps and tighter.num_steps == 20
    # without tol, a run that converged continues to num_steps
    _solve(setup, 20, checkpoint=tmp_path / "c2", tol=loose)
    _assert_same(
        _solve(setup, 20, checkpoint=tmp_path / "c2", resume=True), uninterrupted
    )


def test_new_style_keys(setup, tmp_path):
    key = jax.random.key(3)
    whole = _solve(setup, 20, key=key)
    _solve(setup, 10, key=key, checkpoint=tmp_path)
    _assert_same(_solve(setup, 20, key=key, checkpoint=tmp_path, resume=True), whole)


def test_resume_needs_a_directory(setup):
    with pytest.raises(ValueError, match="checkpoint"):
        _solve(setup, 5, resume=True)
