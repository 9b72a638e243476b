"""The interface every bilevel solver implements, what each solver declares it supports,
and the one shared check of problems, data and hyperparameters."""

import abc
import dataclasses
import inspect
import math
from typing import Any, ClassVar, Generic, TypeVar

import equinox as eqx
import jax
import numpy as np
from jaxtyping import Array, PRNGKeyArray, PyTree, Scalar

from ._data import AbstractData, as_data
from ._misc import Frozen, merge_variable, split_variable
from ._problem import BilevelProblem, MultiBlockProblem, lift_problem


SolverState = TypeVar("SolverState")

FEATURES: dict[str, str] = {
    "single_block": "a single lower problem (`bl.BilevelProblem`)",
    "multi_block": "multi-block problems (`bl.MultiBlockProblem`)",
    "project_x": "a constraint set X on the upper variable (`project_x`)",
    "project_y": "a simple constraint set Y on the lower variable (`project_y`)",
    "lower_constraints": "lower-level constraints h(x, y) <= 0 (`lower_constraints`, "
    "`project_feasible`)",
    "optimality": "an optimality condition other than grad_y g = 0 (`optimality`)",
    "stochastic": "stochastic data (minibatches)",
}
"""What a problem or its data may ask of a solver, with the words used in errors."""

METRICS: dict[str, str] = {
    "upper_loss": "f(x_k, y_k) on the step's upper batch, at the iterate the step used",
    "grad_norm": (
        "norm of the solver's estimate of the hypergradient grad F(x_k) that drives "
        "the x update (the projected gradient mapping when X is constrained; for "
        "penalty methods the penalised gradient), before momentum or optimizer "
        "transforms"
    ),
    "lower_residual": (
        "||Phi(x_k, y_k)||: the problem's optimality condition (grad_y g by default, "
        "the projected-gradient fixed point with a set Y) at the lower iterate, on the "
        "step's lower batch"
    ),
}
"""The metric contract: every solver reports these three with exactly this meaning;
solver-specific quantities get names of their own (see each solver's page)."""


def problem_features(problem: Any) -> frozenset[str]:
    """The features of `problem` a solver must support."""
    if isinstance(problem, MultiBlockProblem):
        features = {"multi_block"}
    elif isinstance(problem, BilevelProblem):
        features = {"single_block"}
        if problem.project_y is not None:
            features.add("project_y")
        if (
            problem.lower_constraints is not None
            or problem.project_feasible is not None
        ):
            features.add("lower_constraints")
        if problem.has_custom_condition:
            features.add("optimality")
    else:
        raise TypeError(
            "`problem` must be a bl.BilevelProblem or bl.MultiBlockProblem, got "
            f"{type(problem).__name__}"
        )
    if problem.project_x is not None:
        features.add("project_x")
    return frozenset(features)


def data_features(data: Any) -> frozenset[str]:
    """`{"stochastic"}` for data whose draws differ, else nothing."""
    return frozenset() if as_data(data).deterministic else frozenset({"stochastic"})


def _public_solvers() -> list[type]:
    found, stack = [], list(AbstractBilevelSolver.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if not inspect.isabstract(cls) and cls.__module__.startswith("bilevel.solvers"):
            found.append(cls)
    return sorted(found, key=lambda cls: cls.__name__)


def check_supported(
    solver: "AbstractBilevelSolver", problem: Any, data: Any = None
) -> None:
    """Raise when `problem` (and `data`, if given) need a feature that `solver` does not
    support, naming the solvers that do: a `TypeError` for the wrong kind of problem
    (single- vs multi-block), a `ValueError` otherwise."""
    needed = problem_features(problem)
    if data is not None:
        needed |= data_features(data)
    missing = sorted(needed - solver.supported_features())
    if not missing:
        return
    feature = missing[0]
    others = ", ".join(
        cls.__name__ for cls in _public_solvers() if feature in cls.supports
    )
    name = type(solver).__name__
    if feature in ("single_block", "multi_block"):
        wanted = "MultiBlockProblem" if feature == "single_block" else "BilevelProblem"
        raise TypeError(
            f"{name} needs a bl.{wanted}, got {type(problem).__name__}. Solvers for "
            f"{FEATURES[feature]}: {others or 'none'}."
        )
    reason = solver.unsupported_reason(feature)
    raise ValueError(
        f"{name} does not support {FEATURES[feature]}"
        + (f" ({reason})" if reason else "")
        + f". Solvers that do: {others or 'none'}."
    )


# --------------------------------------------------------------------------------------
# Hyperparameters: declared bounds, checked once for every solver.


@dataclasses.dataclass(frozen=True)
class Bounds:
    """What a numeric hyperparameter may be: an interval, `None` (meaning "derived from
    the problem") when `optional`, and a few named strings such as `"auto"`."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    optional: bool = False
    words: tuple[str, ...] = ()

    def describe(self) -> str:
        kind = "an int" if self.integer else "a finite number"
        parts = [kind]
        if self.low > -math.inf or self.high < math.inf:
            left = "(" if self.low_open else "["
            right = ")" if self.high_open else "]"
            parts.append(f"in {left}{self.low:g}, {self.high:g}{right}")
        alternatives = [repr(w) for w in self.words]
        alternatives += ["None"] if self.optional else []
        if alternatives:
            parts.append("or " + " or ".join(alternatives))
        return " ".join(parts)

    def accepts(self, value: Any) -> bool | None:
        """True/False for a concrete value; None when it cannot be known (a tracer)."""
        if value is None:
            return self.optional
        if isinstance(value, str):
            return value in self.words
        if isinstance(value, bool):
            return False
        if isinstance(value, jax.core.Tracer):
            return None
        try:
            array = np.asarray(value)
        except Exception:
            return False
        if array.shape != ():
            return None  # a batch of values (e.g. one per vmapped run) is not checked
        if not np.issubdtype(array.dtype, np.number):
            return False
        number = float(array)
        if self.integer and not np.issubdtype(array.dtype, np.integer):
            return False
        if not math.isfinite(number):
            return False
        low_ok = number > self.low if self.low_open else number >= self.low
        high_ok = number < self.high if self.high_open else number <= self.high
        return low_ok and high_ok


def hyperparameter(default: Any, bounds: Bounds, *, static: bool = False, **kwargs):
    """A solver field whose value is checked against `bounds` at construction."""
    return eqx.field(
        default=default, static=static, metadata={"bounds": bounds}, **kwargs
    )


def positive(default: Any, *, optional: bool = False, words: tuple[str, ...] = ()):
    """A step size, scale or tolerance: a finite number > 0."""
    bounds = Bounds(0.0, low_open=True, optional=optional, words=words)
    return hyperparameter(default, bounds)


def nonnegative(default: Any, *, optional: bool = False, words: tuple[str, ...] = ()):
    """A finite number >= 0."""
    return hyperparameter(default, Bounds(0.0, optional=optional, words=words))


def fraction(default: Any, *, optional: bool = False, words: tuple[str, ...] = ()):
    """A weight in (0, 1] (momentum, averaging)."""
    return hyperparameter(
        default, Bounds(0.0, 1.0, low_open=True, optional=optional, words=words)
    )


def count(default: Any, *, minimum: int = 1, optional: bool = False):
    """A static number of steps, terms or blocks: an int >= `minimum`."""
    return hyperparameter(
        default, Bounds(minimum, integer=True, optional=optional), static=True
    )


def choice(default: Any, options: tuple):
    """A static option among `options`."""
    return eqx.field(default=default, static=True, metadata={"options": tuple(options)})


def check_hyperparameters(module: eqx.Module) -> None:
    """Check every field declared with `hyperparameter`/`choice` (and the helpers
    above); raise a `ValueError` naming the class, the field, what it must be and what
    it got."""
    owner = type(module).__name__
    for field in dataclasses.fields(module):
        value = getattr(module, field.name)
        bounds = field.metadata.get("bounds")
        if bounds is not None and bounds.accepts(value) is False:
            raise ValueError(
                f"{owner}: `{field.name}` must be {bounds.describe()}, got {value!r}"
            )
        options = field.metadata.get("options")
        if options is not None and value not in options:
            raise ValueError(
                f"{owner}: `{field.name}` must be one of {list(options)}, got {value!r}"
            )


# --------------------------------------------------------------------------------------
# The solver interface.


class _SplitState(eqx.Module):
    """A solver's state together with the parts of `x` and `y` it never updates."""

    state: Any
    x_frozen: Frozen
    y_frozen: Frozen


class AbstractBilevelSolver(eqx.Module, Generic[SolverState]):
    """A bilevel algorithm as three pure functions; hyperparameters are Module fields.

    - `init(problem, x0, y0, key) -> state` checks that the solver supports the problem
      (constraints, projections, multi-block, ...; see `supports`), validates `x0` and
      `y0`, and builds the state (iterates, estimator states, warm starts, a counter).
    - `step(problem, state, data, key) -> (state, metrics)` performs one outer
      iteration; `metrics` is a dict of scalars with at least `upper_loss`, `grad_norm`
      and `lower_residual`, whose meaning is the same for every solver
      (`bilevel.METRICS`, the table in the docs' concepts page).
    - `params(state) -> (x, y)`.

    All three are jit-able; [`bilevel.run`][] scans `step`.

    `x` and `y` may be any pytrees, including equinox Modules such as `eqx.nn.MLP`:
    solvers differentiate and update their floating-point leaves only and carry the rest
    (activation functions, flags, integer arrays) unchanged.

    **Writing a solver.** Subclass, set the class variable `supports` (a subset of
    `bilevel.FEATURES`), declare numeric fields with the bound helpers of this module
    (so that they are checked at construction), and implement `_init`, `_step` and
    `_params`, which only ever see the floating-point parts of `x` and `y`.
    """

    supports: ClassVar[frozenset[str]] = frozenset({"single_block"})

    init_needs_data: ClassVar[bool] = False
    """True for solvers whose state depends on the data (one memory per batch, step
    sizes estimated on a first batch): their `_init` takes the data as a fifth
    argument."""

    def __check_init__(self):
        check_hyperparameters(self)

    def supported_features(self) -> frozenset[str]:
        """What this configured instance supports (`supports` unless a setting, e.g. an
        inner tolerance that needs exact oracles, rules something out)."""
        return self.supports

    def unsupported_reason(self, feature: str) -> str:
        """Why `feature` is not supported (shown in the error), or ''."""
        return ""

    def init(
        self,
        problem: Any,
        x0: PyTree,
        y0: PyTree,
        key: PRNGKeyArray | None = None,
        data: Any = None,
    ) -> SolverState:
        """Initial state (pure). `data` is the data the run will step on (as given to
        `step`); solvers with `init_needs_data` size their memories or estimate their
        step sizes from it, the others ignore it."""
        check_supported(self, problem)
        problem.check_variables(x0, y0)
        x0, x_frozen = split_variable(x0)
        y0, y_frozen = split_variable(y0)
        key = jax.random.PRNGKey(0) if key is None else key
        extra = (as_data(data),) if self.init_needs_data else ()
        if x_frozen.is_empty and y_frozen.is_empty:
            return self._init(problem, x0, y0, key, *extra)
        lifted = lift_problem(problem, x_frozen, y_frozen)
        state = self._init(lifted, x0, y0, key, *extra)
        return _SplitState(state, x_frozen, y_frozen)

    def step(
        self, problem: Any, state: SolverState, data: Any, key: PRNGKeyArray
    ) -> tuple[SolverState, dict[str, Scalar]]:
        """One outer iteration (pure, jit-able)."""
        data = as_data(data)
        check_supported(self, problem, data)
        if not isinstance(state, _SplitState):
            return self._step(problem, state, data, key)
        lifted = lift_problem(problem, state.x_frozen, state.y_frozen)
        inner, metrics = self._step(lifted, state.state, data, key)
        return _SplitState(inner, state.x_frozen, state.y_frozen), metrics

    def params(self, state: SolverState) -> tuple[PyTree, PyTree]:
        """The current `(x, y)`."""
        if not isinstance(state, _SplitState):
            return self._params(state)
        x, y = self._params(state.state)
        return merge_variable(x, state.x_frozen), merge_variable(y, state.y_frozen)

    @abc.abstractmethod
    def _init(
        self, problem: Any, x0: PyTree[Array], y0: PyTree[Array], key: PRNGKeyArray
    ) -> Any:
        """Initial state, for floating-point `x0`, `y0`."""

    @abc.abstractmethod
    def _step(
        self, problem: Any, state: Any, data: AbstractData, key: PRNGKeyArray
    ) -> tuple[Any, dict[str, Scalar]]:
        """One outer iteration."""

    @abc.abstractmethod
    def _params(self, state: Any) -> tuple[PyTree[Array], PyTree[Array]]:
        """The current floating-point `(x, y)`."""
