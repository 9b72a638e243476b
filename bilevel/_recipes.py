"""Solver settings known to work per problem, used by the `bilevel` command as defaults
(problems describe only mathematics and data; these are run choices, overridable with
`--set`). Missing pairs fall back to the solver's own defaults."""

_RECIPES: dict[tuple[str, str], dict] = {
    ("quadratic", "implicitdiff"): {"inner_steps": 10, "outer_lr": 1.0},
    ("quadratic", "unrolled"): {"inner_steps": 80, "inner_lr": 0.2, "outer_lr": 1.0},
}


def recipe(problem: str, solver: str) -> dict:
    """Default solver keyword arguments for `solver` (lower-case name) on `problem`."""
    return dict(_RECIPES.get((problem, solver), {}))
