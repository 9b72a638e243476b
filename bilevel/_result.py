"""Outcome of a bilevel run: final iterates, history and a status code."""

import enum
from typing import Any

import equinox as eqx
from jaxtyping import Array, PyTree


class Status(str, enum.Enum):
    """Why a run of [`bilevel.solve`][] stopped.

    - `converged`: the tracked stationarity measure fell below `tol`.
    - `max_steps`: the step budget ran out (not an error: inspect the history).
    - `nonfinite`: a NaN or inf appeared in the solver state or its metrics; the result
      holds the last good state and the step at which the problem appeared.
    - `diverged`: the run blew up while staying finite (the upper loss or the lower
      residual grew past the documented factor of its start); the result holds the last
      good state.
    """

    converged = "converged"
    max_steps = "max_steps"
    nonfinite = "nonfinite"
    diverged = "diverged"

    def __str__(self) -> str:
        return self.value


class Result(eqx.Module):
    """What [`bilevel.solve`][] returns.

    **Fields:**

    - `x`, `y`: final upper and lower iterates (the last finite ones on `nonfinite`).
    - `state`: the full solver state, for warm-starting another run.
    - `history`: dict of 1-D arrays, one row per log point; always has `"step"`.
    - `status`: a [`bilevel.Status`][].
    - `num_steps`: the number of steps actually taken.
    """

    x: PyTree[Array]
    y: PyTree[Array]
    state: Any
    history: dict[str, Array]
    status: Status = eqx.field(static=True)
    num_steps: int = eqx.field(static=True)
