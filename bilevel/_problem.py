r"""Problem definitions: $\min_x f(x, y^*(x))$, $y^*(x) \in \arg\min_{y} g(x, y)$."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from ._conditions import (
    OptimalityCondition,
    as_condition,
    is_stationarity_of,
    projected_gradient_condition,
    stationarity_condition,
)
from ._misc import Frozen, merge_variable, split_variable
from ._projection import Projection, project_at


def _describe(tree: PyTree) -> str:
    def describe_leaf(u):
        if eqx.is_array_like(u):
            return f"{jnp.result_type(u).name}{list(jnp.shape(u))}"
        return type(u).__name__

    return str(jtu.tree_map(describe_leaf, tree))


def _check_callable(name: str, fn, optional: bool = True) -> None:
    if fn is None and optional:
        return
    if not callable(fn):
        raise TypeError(f"`{name}` must be callable, got {type(fn).__name__}")


def check_floating(name: str, tree: PyTree) -> None:
    """Raise a clear error unless `tree` has floating-point leaves (the variables) and
    no complex ones. Other leaves (functions, flags, integer arrays, as in an
    `eqx.nn.MLP`) are allowed: solvers carry them unchanged."""
    leaves = jtu.tree_leaves(tree)
    if not leaves:
        raise ValueError(f"`{name}` has no array leaves")
    complex_leaves = [
        leaf
        for leaf in leaves
        if eqx.is_array_like(leaf)
        and jnp.issubdtype(jnp.result_type(leaf), jnp.complexfloating)
    ]
    if complex_leaves:
        raise TypeError(
            f"`{name}` must contain only real floating-point arrays as its variables; "
            f"got a complex leaf in {_describe(tree)}"
        )
    params, _ = split_variable(tree)
    if not jtu.tree_leaves(params):
        raise TypeError(
            f"`{name}` must contain only real floating-point arrays as its variables; "
            f"got {_describe(tree)}, which has none (use e.g. jnp.asarray(v, float))"
        )


def check_finite(name: str, tree: PyTree) -> None:
    """Raise if a concrete (non-traced) `tree` holds NaN or inf values."""
    for leaf in jtu.tree_leaves(tree):
        if isinstance(leaf, jax.core.Tracer):
            return
        if not eqx.is_array_like(leaf) or not jnp.issubdtype(
            jnp.result_type(leaf), jnp.inexact
        ):
            continue
        if not bool(jnp.all(jnp.isfinite(leaf))):
            raise ValueError(f"`{name}` contains non-finite values (NaN or inf)")


def _eval_scalar(name: str, fn: Callable, *args) -> None:
    try:
        out = eqx.filter_eval_shape(fn, *args)
    except Exception as err:  # re-raised with the argument structures named
        shapes = ", ".join(_describe(a) for a in args)
        raise ValueError(
            f"`{name}` failed when called with arguments of structure ({shapes}): {err}"
        ) from err
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != ():
        raise ValueError(
            f"`{name}` must return a scalar, got {_describe(out)}; reduce it (e.g. "
            "with jnp.mean) before returning"
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(
            f"`{name}` must return a floating-point scalar, got {out.dtype}"
        )


class BilevelProblem(eqx.Module):
    r"""A bilevel problem
    $\min_{x \in X} f(x, y^*(x))$ s.t. $y^*(x) \in \arg\min_{y \in Y,\, h(x,y) \le 0}
    g(x, y)$.

    **Arguments:**

    - `upper`: $f(x, y, \text{batch}) \to$ scalar.
    - `lower`: $g(x, y, \text{batch}) \to$ scalar.
    - `optimality`: $\Phi(x, y, \text{batch}) \to$ pytree like $y$, zero at $y^*(x)$.
      Default: $\nabla_y g$, or the projected-gradient fixed point when `project_y` is
      given. A plain callable is treated as a general (non-symmetric) map; wrap it in
      [`bilevel.OptimalityCondition`][] to declare symmetry.
    - `lower_constraints`: $h(x, y) \to$ 1-D array, feasible where $\le 0$.
    - `project_x`, `project_y`: Euclidean projections onto simple sets $X$ and $Y$
      (e.g. functions of `optax.projections`). A set that depends on $x$, $Y(x)$, is
      declared with [`bilevel.projection`][]: `project_y=bl.projection(fn)` with
      `fn(x, y)`.
    - `project_feasible`: $(x, y) \mapsto (x, y)$, projection onto
      $\{x \in X, y \in Y, h(x, y) \le 0\}$.

    $x$ and $y$ may be any pytrees of floating arrays (dicts, tuples, equinox Modules).
    Everything differentiable must be in $x$, $y$ or the batch: values closed over by
    `upper`/`lower` are treated as constants.
    """

    upper: Callable[..., Array]
    lower: Callable[..., Array]
    optimality: Callable | None = None
    lower_constraints: Callable | None = None
    project_x: Callable | None = None
    project_y: Callable | None = None
    project_feasible: Callable | None = None
    # Decided once at construction: under `jit` the problem is rebuilt from its leaves
    # and `lower` is no longer the same object as the condition's.
    _custom_condition: bool = eqx.field(static=True, init=False, repr=False)

    def __post_init__(self):
        self._custom_condition = self.optimality is not None and not is_stationarity_of(
            self.optimality, self.lower
        )

    def __check_init__(self):
        _check_callable("upper", self.upper, optional=False)
        _check_callable("lower", self.lower, optional=False)
        for name in (
            "optimality",
            "lower_constraints",
            "project_x",
            "project_y",
            "project_feasible",
        ):
            _check_callable(name, getattr(self, name))

    @property
    def condition(self) -> OptimalityCondition:
        """The optimality condition used for implicit differentiation."""
        if self.optimality is not None:
            return as_condition(self.optimality)
        if self.project_y is not None:
            return projected_gradient_condition(self.lower, self.project_y)
        return stationarity_condition(self.lower)

    @property
    def has_custom_condition(self) -> bool:
        """True when `optimality` is given and is not the stationarity condition of
        `lower` (re-tagged conditions such as `OptimalityCondition(
        stationarity_condition(lower).fn, symmetric=True)` do not count)."""
        return self._custom_condition

    def check_variables(self, x: PyTree, y: PyTree) -> None:
        """Validate `x` and `y` alone: floating-point pytrees."""
        check_floating("x", x)
        check_floating("y", y)

    def check(self, x: PyTree, y: PyTree, upper_batch: Any, lower_batch: Any) -> None:
        """Validate `x`, `y` and the batches against the problem's functions, by shape
        only (no computation). Raises `TypeError`/`ValueError` naming the argument."""
        self.check_variables(x, y)
        _eval_scalar("upper(x, y, batch)", self.upper, x, y, upper_batch)
        _eval_scalar("lower(x, y, batch)", self.lower, x, y, lower_batch)
        if self.optimality is not None:
            out = eqx.filter_eval_shape(self.condition, x, y, lower_batch)
            if eqx.tree_equal(
                jtu.tree_structure(out), jtu.tree_structure(y)
            ) is not True or any(
                o.shape != jnp.shape(u)
                for o, u in zip(jtu.tree_leaves(out), jtu.tree_leaves(y))
            ):
                raise ValueError(
                    "`optimality(x, y, batch)` must return a pytree with the structure "
                    f"and shapes of y: got {_describe(out)} for y {_describe(y)}"
                )
        if self.lower_constraints is not None:
            out = eqx.filter_eval_shape(self.lower_constraints, x, y)
            if not isinstance(out, jax.ShapeDtypeStruct) or len(out.shape) != 1:
                raise ValueError(
                    "`lower_constraints(x, y)` must return a 1-D array of constraint "
                    f"values, got {_describe(out)}"
                )
            if self.project_feasible is None and self.project_y is None:
                raise ValueError(
                    "`lower_constraints` is given but neither `project_feasible` nor "
                    "`project_y` is: constrained solvers need a projection onto the "
                    "feasible set"
                )


class MultiBlockProblem(eqx.Module):
    r"""A multi-block bilevel problem
    $\min_x \frac1m \sum_{i=1}^m f_i(x, y_i^*(x))$,
    $y_i^*(x) = \arg\min_{y_i} g_i(x, y_i)$.

    **Arguments:**

    - `upper`: $f_i(x, y_i, \text{batch}, i) \to$ scalar, for one block $i$.
    - `lower`: $g_i(x, y_i, \text{batch}, i) \to$ scalar.
    - `num_blocks`: $m$. $y$ is a pytree whose leaves all have a leading axis of size
      $m$; the batch for block $i$ is whatever the data yields for that block.
    - `project_x`: optional projection onto $X$.
    """

    upper: Callable[..., Array]
    lower: Callable[..., Array]
    num_blocks: int = eqx.field(static=True)
    project_x: Callable | None = None

    def __check_init__(self):
        _check_callable("upper", self.upper, optional=False)
        _check_callable("lower", self.lower, optional=False)
        _check_callable("project_x", self.project_x)
        if not isinstance(self.num_blocks, int) or self.num_blocks < 1:
            raise ValueError(
                f"`num_blocks` must be a positive int, got {self.num_blocks}"
            )

    def check_variables(self, x: PyTree, y: PyTree) -> None:
        """Validate `x` and `y` alone: floating pytrees, `y` with a leading block
        axis."""
        check_floating("x", x)
        check_floating("y", y)
        for leaf in jtu.tree_leaves(y):
            if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != self.num_blocks:
                raise ValueError(
                    f"every leaf of `y` needs a leading block axis of size "
                    f"num_blocks={self.num_blocks}; got {_describe(y)}"
                )

    def check(self, x: PyTree, y: PyTree, upper_batch: Any, lower_batch: Any) -> None:
        """Validate shapes: leading block axis of `y` and scalar block objectives."""
        self.check_variables(x, y)
        y0 = jtu.tree_map(lambda u: u[0], y)
        index = jnp.zeros((), jnp.int32)
        _eval_scalar("upper(x, y_i, batch, i)", self.upper, x, y0, upper_batch, index)
        _eval_scalar("lower(x, y_i, batch, i)", self.lower, x, y0, lower_batch, index)


def apply_project_x(problem: Any, x: PyTree) -> PyTree:
    """`problem.project_x(x)`, or `x` when the problem has no set X."""
    return x if problem.project_x is None else problem.project_x(x)


def apply_project_y(problem: Any, x: PyTree, y: PyTree) -> PyTree:
    """$P_{Y(x)}(y)$: `problem.project_y(y)`, or `project_y(x, y)` for a set that
    depends on `x` (declared with [`bilevel.projection`][]); `y` when the problem has
    no set Y."""
    return y if problem.project_y is None else project_at(problem.project_y, x, y)


class _OnParams(eqx.Module):
    """`fn` of the full variables, called with their floating-point parts only (see
    `split_variable`); its output is reduced the same way when it is a variable."""

    fn: Callable
    x_frozen: Frozen
    y_frozen: Frozen
    inputs: str = eqx.field(static=True)
    output: str = eqx.field(static=True, default="value")

    def __call__(self, *args):
        count = len(self.inputs)
        full = [
            merge_variable(arg, self.x_frozen if name == "x" else self.y_frozen)
            for name, arg in zip(self.inputs, args[:count])
        ]
        out = self.fn(*full, *args[count:])
        if self.output == "value":
            return out
        if self.output == "xy":
            return split_variable(out[0])[0], split_variable(out[1])[0]
        return split_variable(out)[0]


def _lift_project_y(project_y: Callable | None, lift: Callable) -> Callable | None:
    if isinstance(project_y, Projection):
        return Projection(lift(project_y.fn, "xy", "y"))
    return lift(project_y, "y", "y")


def lift_problem(problem: Any, x_frozen: Frozen, y_frozen: Frozen) -> Any:
    """The same problem seen as a function of the floating-point parts of `x` and `y`
    only, so that solvers never touch activation functions, flags or integer arrays."""

    def lift(fn, inputs, output="value"):
        return None if fn is None else _OnParams(fn, x_frozen, y_frozen, inputs, output)

    upper, lower = lift(problem.upper, "xy"), lift(problem.lower, "xy")
    project_x = lift(problem.project_x, "x", "x")
    if isinstance(problem, MultiBlockProblem):
        return MultiBlockProblem(upper, lower, problem.num_blocks, project_x=project_x)
    optimality = problem.optimality
    if optimality is not None:
        condition = as_condition(optimality)
        fn = (
            stationarity_condition(lower).fn
            if is_stationarity_of(condition, problem.lower)
            else lift(condition.fn, "xy", "y")
        )
        optimality = OptimalityCondition(
            fn, condition.symmetric, condition.positive_semidefinite
        )
    return BilevelProblem(
        upper,
        lower,
        optimality=optimality,
        lower_constraints=lift(problem.lower_constraints, "xy"),
        project_x=project_x,
        project_y=_lift_project_y(problem.project_y, lift),
        project_feasible=lift(problem.project_feasible, "xy", "xy"),
    )
