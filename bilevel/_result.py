"""Outcome of a bilevel run: final iterates, history and a status code."""

import enum
from typing import Any

import equinox as eqx
from jaxtyping import Array, PyTree


class Status(enum.StrEnum):
    """Why a run stopped.

    - `converged`: the tracked stationarity measure fell below `tol`
      ([`bilevel.solve`][] only).
    - `max_steps`: the step budget ran out (not an error: inspect the history).
    - `nonfinite`: a step produced a NaN or inf (in a metric, or in the state at the end
      of a compiled chunk); the result holds the last good state.
    - `diverged`: the run blew up while staying finite: `|upper_loss|` or
      `lower_residual` grew past `divergence` (default $10^6$) times its size at the
      start (the largest value over the first 10 steps; see [`bilevel.run`][]); the
      result holds the last good state.

    Inside compiled code (the `status` of a [`bilevel.LoopState`][]) a status is an
    integer [`code`][bilevel.Status.code]; `Status.from_code` converts it back.
    """

    converged = "converged"
    max_steps = "max_steps"
    nonfinite = "nonfinite"
    diverged = "diverged"

    @property
    def code(self) -> int:
        """The integer stored in a [`bilevel.LoopState`][]: 0 `max_steps` (running,
        no failure), 1 `nonfinite`, 2 `diverged`, 3 `converged`."""
        return _CODES[self]

    @classmethod
    def from_code(cls, code: Any) -> "Status":
        """The status of an integer code (a Python int or a scalar array)."""
        return _STATUSES[int(code)]


_CODES = {
    Status.max_steps: 0,
    Status.nonfinite: 1,
    Status.diverged: 2,
    Status.converged: 3,
}
_STATUSES = {code: status for status, code in _CODES.items()}


class Result(eqx.Module):
    """What [`bilevel.solve`][] returns.

    **Fields:**

    - `x`, `y`: final upper and lower iterates (the last good ones on `nonfinite` or
      `diverged`).
    - `state`: the full solver state, for warm-starting another run.
    - `history`: dict of 1-D arrays, one row per log point; always has `"step"` (the
      steps done at that point). On `nonfinite` / `diverged` the last row holds the
      metrics of the step that failed (the NaN or the blow-up), its `step` the steps
      kept.
    - `status`: a [`bilevel.Status`][].
    - `num_steps`: the number of steps actually taken (kept).
    """

    x: PyTree[Array]
    y: PyTree[Array]
    state: Any
    history: dict[str, Array]
    status: Status = eqx.field(static=True)
    num_steps: int = eqx.field(static=True)
