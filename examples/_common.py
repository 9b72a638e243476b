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


def print_table(rows):
    """Print a list of dicts as an aligned table (floats to 4 decimals)."""
    columns = list(rows[0])
    cells = [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in r.values()] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
