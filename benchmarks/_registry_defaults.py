"""A solver with its defaults on every registry problem it applies to, judged by each
problem's own evaluation (`bench.metric` against `bench.baseline`)."""

import time

import jax
import jax.random as jr

import bilevel as bl
from bilevel._solver import check_supported


def timed_default_solve(bench, solver_name: str, steps: int, **options):
    """`bl.solve` of `bl.solvers.<solver_name>(**options)` (defaults, unless `options`
    names some) on `bench` for `steps` steps, 10 log points: `(result, seconds)`,
    compilation included."""
    solver = getattr(bl.solvers, solver_name)(**options)
    start = time.perf_counter()
    result = bl.solve(
        bench.problem,
        solver,
        bench.x0,
        bench.y0,
        bench.data,
        num_steps=steps,
        key=jr.PRNGKey(0),
        log_every=max(1, steps // 10),
        progress=False,
    )
    jax.block_until_ready(result.x)
    return result, time.perf_counter() - start


# Registry name -> a small instance's parameters (the problem's real data, fewer
# samples or tasks): the matrix on these runs in minutes on a laptop CPU.
SMALL = {
    "ridge_hpo": {"num_train": 60, "num_val": 40},
    "logreg_hpo": {"num_train": 60, "num_val": 40},
    "hypercleaning": {"num_train": 100, "num_val": 50},
    "distillation": {"num_train": 100},
    "imaml": {"num_tasks": 8, "num_eval_tasks": 10},
    "svm_hpo": {"num_train": 60, "num_val": 40},
    "hyper_representation": {"num_tasks": 6, "num_test_tasks": 10},
}


def defaults_rows(solver_class, num_steps=2000, seed=0, names=None, small=False):
    """One row per applicable registry problem (multi-block ones excluded): the metric
    after `num_steps` steps of `solver_class()`, the baseline, whether the run is better
    and finite, and the wall time of the run (compilation included). `small`: the
    instances of `SMALL` instead of the registry's default sizes."""
    rows = []
    for name in names or bl.problems.registry:
        bench = bl.problems.make(name, **(SMALL.get(name, {}) if small else {}))
        solver = solver_class()
        try:
            check_supported(solver, bench.problem, bench.data)
        except (TypeError, ValueError):
            continue
        start = time.perf_counter()
        state, history = bl.run(
            bench.problem,
            solver,
            bench.x0,
            bench.y0,
            bench.data,
            num_steps,
            jr.PRNGKey(seed),
        )
        jax.block_until_ready(state)
        seconds = time.perf_counter() - start
        x, y = solver.params(state)
        scores = bench.evaluate(x, y)
        # Every run compiles new programs: without clearing, a long matrix exhausts
        # the process's memory maps and LLVM fails with "Cannot allocate memory".
        jax.clear_caches()
        value, baseline = float(scores[bench.metric]), bench.baseline_value(scores)
        rows.append(
            {
                "problem": name,
                "metric": bench.metric + (" (max)" if bench.maximize else " (min)"),
                "value": value,
                "baseline": baseline,
                "better": bench.improves(value, baseline),
                "finite": bool(history["finite"][-1]),
                "steps": num_steps,
                "s (incl. compile)": seconds,
            }
        )
    return rows
