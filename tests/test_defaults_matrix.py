"""Every registry problem x every solver that applies to it, with the solver's defaults
(no settings at all): the run ends finite and not diverged, and the problem's own
evaluation metric beats the problem's baseline.

Small instances of each problem (fewer samples or tasks) keep the matrix within the CI
budget; `benchmarks/defaults.py` runs the full-size matrix for 2000 steps."""

import jax.random as jr
import numpy as np
import pytest

import bilevel as bl
from bilevel._solver import check_supported


NUM_STEPS = 500

# Registry name -> the small instance's parameters (the problem's real data, fewer
# samples or tasks).
SMALL = {
    "quadratic": {},
    "ridge_hpo": {"num_train": 60, "num_val": 40},
    "logreg_hpo": {"num_train": 60, "num_val": 40},
    "hypercleaning": {"num_train": 100, "num_val": 50},
    "distillation": {"num_train": 100},
    "imaml": {"num_tasks": 8, "num_eval_tasks": 10},
    "svm_hpo": {"num_train": 60, "num_val": 40},
    "hyper_representation": {"num_tasks": 6, "num_test_tasks": 10},
    "multiblock_quadratic": {},
    "multiblock_hpo": {},
}


def test_every_registry_problem_has_a_small_instance():
    assert sorted(SMALL) == sorted(bl.problems.registry)


SOLVERS = sorted(name for name in vars(bl.solvers) if name[0].isupper())
_BENCHES: dict = {}


def _bench(name):
    if name not in _BENCHES:
        _BENCHES[name] = bl.problems.make(name, **SMALL[name])
    return _BENCHES[name]


def _cases():
    cases = []
    for name in SMALL:
        bench = _bench(name)
        for solver_name in SOLVERS:
            try:
                check_supported(
                    getattr(bl.solvers, solver_name)(), bench.problem, bench.data
                )
            except (TypeError, ValueError):
                continue
            cases.append((name, solver_name))
    return cases


def _baseline(bench, scores) -> float:
    if bench.baseline is not None:
        return float(scores[bench.baseline])
    return float(bench.evaluate(bench.x0, bench.y0)[bench.metric])


@pytest.mark.parametrize("name, solver_name", _cases())
def test_defaults_beat_the_baseline(name, solver_name):
    bench = _bench(name)
    solver = getattr(bl.solvers, solver_name)()
    state, history = bl.run(
        bench.problem, solver, bench.x0, bench.y0, bench.data, NUM_STEPS, jr.PRNGKey(0)
    )
    assert bool(history["finite"][-1]) and not bool(history["diverged"][-1])
    x, y = solver.params(state)
    scores = bench.evaluate(x, y)
    value, baseline = float(scores[bench.metric]), _baseline(bench, scores)
    assert np.isfinite(value)
    better = value > baseline if bench.maximize else value < baseline
    assert better, f"{bench.metric} = {value:.4g}, baseline {baseline:.4g}"
