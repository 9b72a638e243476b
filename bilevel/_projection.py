r"""Projections onto sets that may depend on the upper variable.

A problem's `project_y` is a Euclidean projection $P_Y(y)$. When the set depends on the
upper variable, $Y(x)$ (an $\ell_2$ ball whose radius is the hyperparameter, a box whose
bounds are learned: jaxopt's `hyperparams_proj`), wrap the map in
[`bilevel.projection`][] so that every solver, and the projected-gradient condition,
calls it with $x$; derivatives then flow through the set's parameters as well.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
from jaxtyping import PyTree


class Projection(eqx.Module):
    r"""A projection $P_{Y(x)}(y)$ that depends on the upper variable, built by
    [`bilevel.projection`][]. Call it as `projection(x, y)`."""

    fn: Callable[[Any, Any], Any]

    def __call__(self, *args: Any) -> PyTree:
        if len(args) != 2:
            raise TypeError(
                "this projection depends on the upper variable: call it as "
                "`projection(x, y)` (solvers do so through "
                "`apply_project_y(problem, x, y)`), not `projection(y)`"
            )
        return self.fn(*args)


def projection(fn: Callable, *, uses_x: bool = True) -> Callable:
    r"""Declare a projection onto a set $Y(x)$ that depends on the upper variable.

    `fn(x, y)` returns $P_{Y(x)}(y)$. Use the result as a problem's `project_y` or in
    [`bilevel.projected_gradient_condition`][]; every solver then calls it with the
    current $x$. For example an $\ell_2$ ball whose radius is the hyperparameter, with
    `optax.projections`:

    ```python
    project = bl.projection(
        lambda x, y: optax.projections.projection_l2_ball(y, scale=x["radius"])
    )
    ```

    With `uses_x=False`, `fn` is returned unchanged (a projection of $y$ alone, the
    plain `project_y` convention).
    """
    if not callable(fn):
        raise TypeError(f"projection: `fn` must be callable, got {type(fn).__name__}")
    return Projection(fn) if uses_x else fn


def project_at(project: Callable, x: PyTree, y: PyTree) -> PyTree:
    """Apply a projection at upper variable `x`: `project(x, y)` for a
    [`bilevel.projection`][], `project(y)` otherwise."""
    return project(x, y) if isinstance(project, Projection) else project(y)
