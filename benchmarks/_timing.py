"""Side-by-side timing helpers for the benchmarks (no asserts, printed tables only)."""

import statistics
import time

import jax

from bilevel.cli import format_table


def median_time(fn, *args, repeats: int = 7) -> float:
    """Median wall time (s) of `fn(*args)` over `repeats` runs, after one warm-up call
    (which compiles); results are blocked on so asynchronous dispatch is counted."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_median_times(fns: dict, repeats: int = 7) -> dict:
    """Median times of several zero-argument callables, run round-robin so that machine
    load drifts affect all of them alike. Each is called once first to compile."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def print_table(title: str, rows: list[dict]) -> None:
    """Print a titled table with the shared printer (`bilevel.cli.format_table`)."""
    print(f"\n## {title}")
    if rows:
        print(format_table(rows))


def interleaved_cpu_times(fns: dict, repeats: int = 7) -> dict:
    """Like `interleaved_median_times`, with the process CPU time (all threads) instead
    of wall time: on a loaded machine the wall time mostly measures the other
    processes, the CPU time much less so."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.process_time()
            jax.block_until_ready(fn())
            samples[name].append(time.process_time() - start)
    return {name: statistics.median(values) for name, values in samples.items()}
