"""Solver settings known to work per problem, used by the `bilevel` command as defaults
(problems describe only mathematics and data; these are run choices, overridable with
`--set`). Missing pairs fall back to the solver's own defaults."""

import lineax as lx


_HYPERCLEANING_NESTED = {"inner_steps": 20, "inner_lr": 1.0, "outer_lr": 100.0}

_RECIPES: dict[tuple[str, str], dict] = {
    ("quadratic", "implicitdiff"): {"inner_steps": 10, "outer_lr": 1.0},
    ("quadratic", "unrolled"): {"inner_steps": 80, "inner_lr": 0.2, "outer_lr": 1.0},
    # Hyper-cleaning settings measured in benchmarks/slbamm.py (digits, 30% corrupted).
    ("hypercleaning", "implicitdiff"): {
        **_HYPERCLEANING_NESTED,
        "linear_solver": lx.CG(rtol=1e-5, atol=1e-5, max_steps=20),
    },
    ("hypercleaning", "unrolled"): _HYPERCLEANING_NESTED,
    ("hypercleaning", "slbamm"): {"s": 1.0, "x_lr": 100.0},
}


def recipe(problem: str, solver: str) -> dict:
    """Default solver keyword arguments for `solver` (lower-case name) on `problem`."""
    return dict(_RECIPES.get((problem, solver), {}))
