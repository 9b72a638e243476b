"""The bundle every problem constructor returns."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
from jaxtyping import Array, PyTree


class Benchmark(eqx.Module):
    """A ready-to-run bilevel task.

    **Fields:**

    - `name`: registry name.
    - `problem`: a [`bilevel.BilevelProblem`][] (or `MultiBlockProblem`).
    - `x0`, `y0`: initial points.
    - `data`: what solvers draw batches from (an `AbstractData`, a pytree, or `None`).
    - `evaluate`: `evaluate(x, y) -> dict` of the metrics reported for this task.
    - `solution`: the optimal `x*` when known (closed form), else `None`.
    - `lower_solution`: `x -> y*(x)` in closed form or by an accurate numerical solve
      (documented per problem), else `None`.
    - `hypergradient`: `x -> grad F(x)` in closed form or to solver accuracy, else
      `None`.
    - `metric`: the key of `evaluate`'s output by which runs on this task are compared
      (a hyper-objective at $y^*(x)$ or a held-out metric, never a solver's own loss).
    - `maximize`: whether larger values of `metric` are better.
    - `baseline`: the key of `evaluate`'s output holding a baseline's value of `metric`
      (e.g. a grid search over one global hyperparameter), or `None` when the baseline
      is `metric` at the initial point `(x0, y0)`.
    """

    name: str = eqx.field(static=True)
    problem: Any
    x0: PyTree[Array]
    y0: PyTree[Array]
    data: Any
    evaluate: Callable[..., dict]
    solution: PyTree[Array] | None = None
    lower_solution: Callable | None = None
    hypergradient: Callable | None = None
    metric: str = eqx.field(static=True, default="hyper_objective")
    maximize: bool = eqx.field(static=True, default=False)
    baseline: str | None = eqx.field(static=True, default=None)

    def baseline_value(self, scores: dict) -> float:
        """The baseline's value of `metric`, given `scores = evaluate(x, y)` of a run:
        `scores[baseline]`, or `metric` at the initial point when `baseline` is `None`.
        """
        if self.baseline is not None:
            return float(scores[self.baseline])
        return float(self.evaluate(self.x0, self.y0)[self.metric])

    def improves(self, value: float, baseline: float) -> bool:
        """Whether `value` of `metric` is strictly better than `baseline` (larger when
        `maximize`, else smaller)."""
        return value > baseline if self.maximize else value < baseline

    def beats_baseline(self, scores: dict) -> bool:
        """Whether `scores[metric]` is strictly better than `baseline_value(scores)`."""
        return self.improves(float(scores[self.metric]), self.baseline_value(scores))
