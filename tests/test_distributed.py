"""Multi-process runs (`jax.distributed`, coordinator on 127.0.0.1, gloo CPU
collectives) give the single-process results: data-parallel ImplicitDiff, BSVRB with
blocks sharded over processes, a killed run resumed from its checkpoint; only process 0
prints and writes. The runs are in tests/_distributed_cases.py; every launch is shared
by several tests (they are the slowest we have) and bounded by a timeout."""

import contextlib
import json
import os
import pathlib
import re

import numpy as np
import pytest

from bilevel import _checkpoint

from . import _distributed_cases as cases
from .multiprocess import launch


ROOT = str(pathlib.Path(__file__).resolve().parents[1])
PAGE = pathlib.Path(ROOT) / "docs" / "scaling-out.md"
SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
import bilevel as bl
bl.distributed.initialize()  # before any other JAX work
import jax
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
from tests import _distributed_cases as cases
cases.main(sys.argv[2:])
"""
TIMEOUT = 120  # seconds per launch; a launch takes 10-30 s on a loaded 2-core machine


def _launch(processes: int, devices: int, *args: str) -> list[dict]:
    return launch(SCRIPT, processes, devices, timeout=TIMEOUT, args=(ROOT, *args))


# --------------------------------------------------------------------------------------
# The launches (module fixtures, each shared by the tests that read it).


@pytest.fixture(scope="module")
def reference():
    """One process, one device, nothing sharded; BSVRB with the 4 shards of the
    4-device runs (the same draws, see the BSVRB docstring)."""
    return {
        "ridge": cases.summary(cases.solve_ridge()),
        "blocks": cases.summary(cases.solve_blocks(num_shards=cases.SHARDS)),
    }


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """2 processes x 2 devices: the comparison (Explicit data mesh, Auto block mesh),
    the command line with --distributed, then the same processes killed at a log
    point of a checkpointed run."""
    out = tmp_path_factory.mktemp("cli") / "out"
    directory = tmp_path_factory.mktemp("killed")
    answers = _launch(
        2, 2, "compare+cli+kill", "explicit,auto", str(out), str(directory)
    )
    return answers, directory, out


@pytest.fixture(scope="module")
def four_processes():
    """4 processes x 1 device: the comparison (Auto data mesh, Explicit block mesh)."""
    return _launch(4, 1, "compare", "auto,explicit")


@pytest.fixture(scope="module")
def one_process():
    """1 process x 4 devices, meshes from `jax.make_mesh` (Explicit axes) for both."""
    return _launch(1, 4, "compare", "explicit,explicit")


# --------------------------------------------------------------------------------------
# Equal to the single-process run.


def _assert_close(run: dict, reference: dict) -> None:
    # Sharded batch means and block sums are reduced across devices in another order
    # than on one device: float64 rounding (1e-16 relative per step) amplified over 20
    # steps of a well-conditioned problem stays far below 1e-10.
    for name in ("x", "y"):
        np.testing.assert_allclose(run[name], reference[name], rtol=1e-10, atol=1e-12)
    for name, column in reference["history"].items():
        np.testing.assert_allclose(
            run["history"][name], column, rtol=1e-10, atol=1e-12, err_msg=name
        )


def _check_compare(answers: list[dict], reference: dict, processes: int) -> None:
    assert [a["process"] for a in answers] == list(range(processes))
    for answer in answers:
        assert answer["processes"] == processes and answer["devices"] == cases.SHARDS
        run = answer["compare"]
        _assert_close(run["ridge"], reference["ridge"])
        _assert_close(run["blocks"], reference["blocks"])
        # the blocks really are spread over the devices of every process
        assert run["block_spec"] == [["blocks"], cases.SHARDS]
    for run in reference.values():  # runs that moved: worth comparing
        losses = run["history"]["upper_loss"]
        assert abs(losses[-1] - losses[0]) > 1e-3 * abs(losses[0])


def test_two_processes_equal_one(two_processes, reference):
    _check_compare(two_processes[0], reference, 2)


def test_four_processes_equal_one(four_processes, reference):
    _check_compare(four_processes, reference, 4)


def test_one_process_with_explicit_meshes_equals_one_device(one_process, reference):
    _check_compare(one_process, reference, 1)


# --------------------------------------------------------------------------------------
# Checkpoints: written once by process 0, read by every process on resume.


def test_killed_run_resumes_to_the_uninterrupted_history(two_processes):
    answers, directory, _ = two_processes
    # the lock names the writer: process 0 (the others never open the directory)
    pids = {a["pid"] for a in answers}
    (writer,) = [a["pid"] for a in answers if a["process"] == 0]
    assert int((directory / _checkpoint.LOCK).read_text()) == writer
    assert len(pids) == 2
    # killed at the log point of step KILL_AT, after its checkpoint was written
    meta = _checkpoint._read(directory / _checkpoint.CURRENT)["meta"]
    assert meta["done"] == cases.KILL_AT
    resumed = _launch(2, 2, "resume", str(directory))
    for answer in resumed:
        runs = answer["resume"]
        # same processes, devices and compiled chunks: identical, not just close
        assert runs["resumed"] == runs["uninterrupted"]
        assert (
            len(runs["resumed"]["history"]["step"])
            == cases.NUM_STEPS // cases.LOG_EVERY
        )


# --------------------------------------------------------------------------------------
# Process 0 alone prints and writes.


def test_only_process_zero_prints_progress(two_processes):
    answers, _, _ = two_processes
    lines = [a["compare"]["progress"].splitlines() for a in answers]
    log_points = cases.NUM_STEPS // cases.LOG_EVERY
    assert len([s for s in lines[0] if s.startswith("step ")]) == log_points
    assert lines[1] == []


def test_cli_distributed_writes_once_from_process_zero(two_processes):
    answers, _, out = two_processes
    assert [a["cli"]["code"] for a in answers] == [0, 0]
    assert "results: " in answers[0]["cli"]["stdout"]
    assert all(a["cli"]["stdout"] == "" for a in answers[1:])
    rows = (out / "history.csv").read_text().splitlines()
    assert len(rows) == 1 + 4  # header and one row per step (4 steps, log every 1)
    assert json.loads((out / "config.json").read_text())["state"] == "finished"


# --------------------------------------------------------------------------------------
# docs/scaling-out.md: its CPU example runs as written, in two processes and alone.

_CONFIG = """
import os, sys
os.chdir(sys.argv[1])
import jax
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
"""
_ANSWER = """
import json
print(json.dumps({"x": float(result.x), "steps": result.num_steps}))
"""


def _page_example() -> str:
    """The page's Python block that runs `bl.solve` (the `train.py` example)."""
    blocks = re.findall(r"^```python\n(.*?)^```", PAGE.read_text(), re.M | re.S)
    (example,) = [code for code in blocks if "bl.solve(" in code]
    return example


@contextlib.contextmanager
def _working_directory(path):
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def test_scaling_out_example_runs_as_written(tmp_path):
    example = _page_example()
    two = launch(
        _CONFIG + example + _ANSWER, 2, 1, timeout=TIMEOUT, args=(str(tmp_path),)
    )
    (tmp_path / "alone").mkdir()
    namespace: dict = {}
    with _working_directory(tmp_path / "alone"):
        exec(compile(example, str(PAGE), "exec"), namespace)
    alone = namespace["result"]
    assert alone.num_steps == 40 and float(alone.x) != 0.0
    for answer in two:
        assert answer["steps"] == 40
        # two devices sum each batch mean in another order than one: float64 rounding,
        # amplified over 40 steps of a well-conditioned problem, stays below 1e-10
        np.testing.assert_allclose(answer["x"], float(alone.x), rtol=1e-10)
    # its checkpoint was written (by process 0) where the page says
    assert (tmp_path / "checkpoints" / "train" / _checkpoint.CURRENT).exists()
