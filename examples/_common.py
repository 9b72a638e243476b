"""Helpers shared by the example scripts (run as `python examples/<name>.py`)."""

import time

import jax

import bilevel as bl


def timed_run(bench, solver, num_steps):
    """`bl.run` on a Benchmark; returns `((x, y), seconds)`, compilation included."""
    start = time.perf_counter()
    state, _ = bl.run(bench.problem, solver, bench.x0, bench.y0, bench.data, num_steps)
    state = jax.block_until_ready(state)
    return solver.params(state), time.perf_counter() - start
