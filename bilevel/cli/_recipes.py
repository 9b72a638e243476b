"""Run choices of the `bilevel` command for a problem and solver pair, applied under
the user's `--set` values (problems describe only mathematics and data; solvers carry
their own defaults). Each entry is listed in docs/cli.md; pairs without one use the
solver's defaults."""

import lineax as lx


# Hyper-cleaning (`make demo`): 20 inner gradient steps per outer step for the nested
# solvers, and for ImplicitDiff a 20-step CG budget, the same number of inner products
# as Unrolled's 20 backward steps. Step sizes measured in benchmarks/slbamm.py (digits,
# 30% corrupted); the solvers' own defaults reach only 0.76 test accuracy in the
# demo's 1000 steps (0.74 at the start), these 0.91-0.93.
_HYPERCLEANING_NESTED = {"inner_steps": 20, "inner_lr": 1.0, "outer_lr": 100.0}

_RECIPES: dict[tuple[str, str], dict] = {
    ("hypercleaning", "implicitdiff"): {
        **_HYPERCLEANING_NESTED,
        "linear_solver": lx.CG(rtol=1e-5, atol=1e-5, max_steps=20),
    },
    ("hypercleaning", "unrolled"): _HYPERCLEANING_NESTED,
    ("hypercleaning", "slbamm"): {"s": 1.0, "x_lr": 100.0},
}


def recipe(problem: str, solver: str) -> dict:
    """The command's run choices for `solver` (lower-case name) on `problem`."""
    return dict(_RECIPES.get((problem, solver), {}))
