"""The interface every bilevel solver implements."""

import abc
from typing import Any, Generic, TypeVar

import equinox as eqx
from jaxtyping import Array, PRNGKeyArray, PyTree, Scalar


SolverState = TypeVar("SolverState")


class AbstractBilevelSolver(eqx.Module, Generic[SolverState]):
    """A bilevel algorithm as three pure functions; hyperparameters are Module fields.

    - `init(problem, x0, y0, key) -> state` validates the inputs against the problem and
      builds the state (iterates, optimizer states, warm starts, a step counter).
    - `step(problem, state, data, key) -> (state, metrics)` performs one outer
      iteration; `metrics` is a dict of scalars with at least `upper_loss`, `grad_norm`
      (hypergradient or update norm) and `lower_residual`.
    - `params(state) -> (x, y)`.

    All three are jit-able; [`bilevel.run`][] scans `step`.
    """

    @abc.abstractmethod
    def init(self, problem: Any, x0: PyTree[Array], y0: PyTree[Array], key: PRNGKeyArray) -> SolverState:
        """Initial state."""

    @abc.abstractmethod
    def step(
        self, problem: Any, state: SolverState, data: Any, key: PRNGKeyArray
    ) -> tuple[SolverState, dict[str, Scalar]]:
        """One outer iteration."""

    @abc.abstractmethod
    def params(self, state: SolverState) -> tuple[PyTree[Array], PyTree[Array]]:
        """The current `(x, y)`."""
