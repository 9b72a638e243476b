"""The bilevel loop.

- `init`, `run_from`, `run`: pure and jit/vmap-able; one `lax.scan` of `solver.step`.
- `solve`: the host driver (compiled chunks of `log_every` steps, progress, history,
  early stopping, checkpoints).

The compiled loop body is `solver.step` alone. Failures are found from the metrics the
steps return, judged after the loop (non-finite, or `upper_loss` / `lower_residual` past
`divergence` times their size at the start), and from one finiteness check of the state
at the end of a compiled call. The last good state is then recovered by re-running from
a good state with the same per-step keys: a failure costs one more pass, a run that does
not fail nothing.
"""

import functools as ft
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from . import _checkpoint, _progress, distributed
from ._data import as_data, bind_run_key
from ._misc import tree_all_finite
from ._problem import check_finite
from ._result import Result, Status
from ._solver import AbstractBilevelSolver


DIVERGENCE = 1e6
"""Default `divergence` factor of `init` / `run` / `solve`."""

WARMUP = 10
"""Steps over which the divergence references are measured (their largest values)."""

_OK, _NONFINITE, _DIVERGED = (
    Status.max_steps.code,
    Status.nonfinite.code,
    Status.diverged.code,
)

_HYPERGRADIENT_STATUS = {
    1: "the adjoint linear solve stopped before its tolerance (a truncated "
    "hypergradient)",
    2: "non-finite values in the hypergradient computation",
}


class LoopState(eqx.Module):
    """Where a run is: what [`bilevel.init`][] returns and [`bilevel.run_from`][]
    continues from (a pytree: `jax.vmap`, `jax.jit` and checkpoints handle it).

    **Fields:**

    - `state`: the solver state (`solver.params(loop.state)` gives `(x, y)`).
    - `step`: steps done. Step `k` uses the key `loop.step_key(k)`, so chunked and
      one-shot runs follow the same trajectory.
    - `key`: the loop's PRNG key (per-step keys are folded from it).
    - `status`: `Status.code` of the run: 0 while it runs; 1 (`nonfinite`) or
      2 (`diverged`) once a step failed, after which the loop takes no more steps.
    - `reference`: the largest `|upper_loss|` and `lower_residual` over the first 10
      steps, the sizes divergence is measured against (see [`bilevel.run`][]).
    - `divergence`: the divergence factor (`inf`: off).
    """

    state: Any
    step: Int[Array, ""]
    key: PRNGKeyArray
    status: Int[Array, ""]
    reference: Float[Array, "2"]
    divergence: Float[Array, ""]

    def step_key(self, step: Any) -> PRNGKeyArray:
        """The key of step `step` (what `solver.step` receives)."""
        return jr.fold_in(self.key, step)


class _Outcome(NamedTuple):
    failure: Int[Array, ""]  # a status code; _OK when the steps succeeded
    failed_at: Int[Array, ""]  # the failing step, -1 if none or only the end state


# --------------------------------------------------------------------------------------
# Judging steps by their metrics: after the loop, vectorised over the steps, so that the
# compiled loop body is `solver.step` and nothing else.


def _traced(*trees) -> bool:
    return any(isinstance(u, jax.core.Tracer) for u in jtu.tree_leaves(trees))


def _judge(rows: dict, steps, valid, reference, divergence):
    """`(failure code, failing step or -1, reference)` of a block of steps from their
    metrics (`rows`: arrays with a leading step axis; `valid` masks steps not taken).

    A step fails when a metric is non-finite, or when `|upper_loss|` (from step 1) or
    `lower_residual` (from step `WARMUP`) exceeds `divergence` times the largest value
    of the first `WARMUP` steps before it (the steps before it, during those). The
    residual waits for the warm-up as it may start at (numerically) zero when `y0`
    solves the lower problem; the loss is checked early to catch a blow-up at once.
    """
    num = steps.shape[0]
    finite = jnp.ones(num, bool)
    for value in rows.values():
        if jnp.issubdtype(value.dtype, jnp.inexact):
            finite = finite & jnp.all(jnp.isfinite(value.reshape(num, -1)), axis=1)
    sizes = jnp.stack(
        [
            jnp.abs(rows[name]).reshape(num).astype(reference.dtype)
            if name in rows
            else jnp.zeros(num, reference.dtype)
            for name in ("upper_loss", "lower_residual")
        ],
        axis=1,
    )
    warm = valid & (steps < WARMUP)
    counted = lax.cummax(jnp.where(warm[:, None], sizes, 0), axis=0)
    seen = jnp.maximum(reference[None, :], counted)
    before = jnp.concatenate([reference[None, :], seen[:-1]], axis=0)
    checked = steps[:, None] >= jnp.array([[1, WARMUP]], steps.dtype)
    grown = checked & (before > 0) & (sizes > divergence * before)
    failing = valid & (~finite | jnp.any(grown, axis=1))
    first = jnp.argmax(failing)
    failure = jnp.where(
        failing[first], jnp.where(finite[first], _DIVERGED, _NONFINITE), _OK
    )
    failed_at = jnp.where(failing[first], steps[first], -1)
    return failure.astype(jnp.int32), failed_at.astype(jnp.int32), seen[-1]


def _finish(loop: LoopState, state, step, reference, failure, failed_at):
    """The loop after a pass, with the end state's finiteness checked once, and the
    pass's outcome. A loop that had failed before fails at once."""
    before = loop.status != _OK
    failure = jnp.where(before, loop.status, failure)
    failed_at = jnp.where(before, loop.step, failed_at)
    hidden = (failure == _OK) & ~tree_all_finite(state)
    failure = jnp.where(hidden, _NONFINITE, failure).astype(jnp.int32)
    end = LoopState(state, step, loop.key, failure, reference, loop.divergence)
    return end, _Outcome(failure, failed_at.astype(jnp.int32))


def _metric_rows(problem, solver, loop: LoopState, data, size: int) -> dict:
    shapes = jax.eval_shape(
        lambda: solver.step(problem, loop.state, data, loop.step_key(loop.step))[1]
    )
    return {name: jnp.zeros((size, *s.shape), s.dtype) for name, s in shapes.items()}


# --------------------------------------------------------------------------------------
# Passes: a scan recording every step (run), a while loop of at most `size` steps to a
# dynamic stop (solve's chunks), a while loop judging each step (the recovery).


def _scan_pass(problem, solver, loop: LoopState, data, num_steps: int):
    data = bind_run_key(data, loop.key)
    steps = loop.step + jnp.arange(num_steps, dtype=loop.step.dtype)

    def body(state, step):
        return solver.step(problem, state, data, loop.step_key(step))

    state, history = lax.scan(body, loop.state, steps)
    failure, failed_at, reference = _judge(
        history, steps, jnp.ones(num_steps, bool), loop.reference, loop.divergence
    )
    end, outcome = _finish(
        loop, state, loop.step + num_steps, reference, failure, failed_at
    )
    return end, history, outcome


def _chunk(problem, solver, loop: LoopState, data, stop, size: int, exact: bool):
    """Steps from `loop.step` to `stop`, at most `size` of them (exactly `size` if
    `exact`: a scan of known length, which XLA may compile better than a loop of
    unknown length): the loop after them, the metrics of the last step (of the failing
    step if one failed), and the outcome."""
    data = bind_run_key(data, loop.key)
    if exact:
        steps = loop.step + jnp.arange(size, dtype=loop.step.dtype)

        def scan_body(state, step):
            return solver.step(problem, state, data, loop.step_key(step))

        state, rows = lax.scan(scan_body, loop.state, steps)
        step = loop.step + size
    else:
        rows = _metric_rows(problem, solver, loop, data, size)

        def body(carry):
            state, step, rows = carry
            state, metrics = solver.step(problem, state, data, loop.step_key(step))
            index = step - loop.step
            rows = {name: rows[name].at[index].set(metrics[name]) for name in rows}
            return state, step + 1, rows

        stop = jnp.asarray(stop, loop.step.dtype)
        state, step, rows = lax.while_loop(
            lambda carry: carry[1] < stop, body, (loop.state, loop.step, rows)
        )
    index = jnp.arange(size, dtype=loop.step.dtype)
    failure, failed_at, reference = _judge(
        rows,
        loop.step + index,
        index < step - loop.step,
        loop.reference,
        loop.divergence,
    )
    shown = jnp.where(failed_at >= 0, failed_at - loop.step, step - loop.step - 1)
    last = {name: rows[name][shown] for name in rows}
    end, outcome = _finish(loop, state, step, reference, failure, failed_at)
    return end, last, outcome


def _advance(problem, solver, loop: LoopState, data, stop):
    """Steps from `loop.step` to `stop`, each judged as it is taken, stopping at the
    first failing one (for the recovery, where speed matters less than stopping)."""
    data = bind_run_key(data, loop.key)

    class Carry(NamedTuple):
        state: Any
        step: Int[Array, ""]
        reference: Float[Array, "2"]
        failure: Int[Array, ""]
        failed_at: Int[Array, ""]

    def body(carry: Carry) -> Carry:
        state, metrics = solver.step(
            problem, carry.state, data, loop.step_key(carry.step)
        )
        failure, failed_at, reference = _judge(
            {name: value[None] for name, value in metrics.items()},
            carry.step[None],
            jnp.ones(1, bool),
            carry.reference,
            loop.divergence,
        )
        return Carry(state, carry.step + 1, reference, failure, failed_at)

    start = Carry(
        loop.state,
        loop.step,
        loop.reference,
        jnp.zeros((), jnp.int32),
        -jnp.ones((), jnp.int32),
    )
    stop = jnp.asarray(stop, loop.step.dtype)
    carry = lax.while_loop(lambda c: (c.step < stop) & (c.failure == _OK), body, start)
    fresh = eqx.tree_at(lambda loop: loop.status, loop, jnp.zeros((), jnp.int32))
    return _finish(
        fresh, carry.state, carry.step, carry.reference, carry.failure, carry.failed_at
    )


def _recover(problem, solver, source: LoopState, data, end: LoopState, outcome):
    """The last good loop state between `source` (assumed good) and a pass that ended
    at `end` with `outcome` (returned unchanged if the pass succeeded).

    A step whose metrics fail describes a bad state (metrics are taken at the step's
    iterate), so the candidate is the state before it; a failure seen only in the end
    state makes the state before the end the candidate. Candidates are reached by
    re-running from `source` with the same per-step keys, stepping back (twice) or
    bisecting until a candidate is good and the next one is not.
    """

    class Search(NamedTuple):
        loop: LoopState
        lo: Int[Array, ""]  # largest known-good step
        hi: Int[Array, ""]  # smallest known-bad step
        target: Int[Array, ""]
        failure: Int[Array, ""]
        passes: Int[Array, ""]
        done: Any

    def body(s: Search) -> Search:
        loop, result = _advance(problem, solver, source, data, s.target)
        ok = result.failure == _OK
        lo = jnp.where(ok, s.target, s.lo)
        hi = jnp.where(
            ok, s.hi, jnp.where(result.failed_at >= 0, result.failed_at, s.target)
        )
        linear = (result.failed_at >= 0) | (s.passes < 2)
        target = jnp.where(
            lo >= hi - 1, lo, jnp.where(ok | ~linear, (lo + hi) // 2, hi - 1)
        )
        failure = jnp.where(ok, s.failure, result.failure)
        done = (ok & (lo >= hi - 1)) | (s.target <= s.lo)
        return Search(loop, lo, hi, target, failure, s.passes + 1, done)

    lo = source.step
    hi = jnp.where(outcome.failed_at >= 0, outcome.failed_at, end.step)
    start = Search(
        end,
        lo,
        hi,
        jnp.maximum(hi - 1, lo),
        outcome.failure,
        jnp.zeros((), jnp.int32),
        outcome.failure == _OK,
    )
    found = lax.while_loop(lambda s: ~s.done, body, start)
    status = jnp.where(outcome.failure == _OK, end.status, found.failure)
    return eqx.tree_at(lambda loop: loop.status, found.loop, status.astype(jnp.int32))


def _mark(history: dict, start, end: LoopState) -> dict:
    """Add the `finite` / `diverged` columns: False / True from the failing step on."""
    num_steps = len(next(iter(history.values()))) if history else 0
    failed = start + jnp.arange(num_steps, dtype=end.step.dtype) >= end.step
    return {
        **history,
        "finite": ~(failed & (end.status == _NONFINITE)),
        "diverged": failed & (end.status == _DIVERGED),
    }


def _marked_pass(problem, solver, loop, data, num_steps):
    end, history, outcome = _scan_pass(problem, solver, loop, data, num_steps)
    return end, _mark(history, loop.step, end), outcome


_marked_pass_jit = eqx.filter_jit(_marked_pass)
_recover_jit = eqx.filter_jit(_recover)
_mark_jit = eqx.filter_jit(_mark)


def _hashable_partition(tree):
    dynamic, static = eqx.partition(tree, eqx.is_array)
    leaves, treedef = jtu.tree_flatten(static)
    return dynamic, (tuple(leaves), treedef)


def _hashable_combine(dynamic, static):
    leaves, treedef = static
    return eqx.combine(dynamic, jtu.tree_unflatten(treedef, leaves))


@ft.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(5,))
def _chunk_compiled(static, loop_static, size, exact, arguments, loop, stop):
    problem, solver, data = _hashable_combine(arguments, static)
    loop = _hashable_combine(loop, loop_static)
    end, last, outcome = _chunk(problem, solver, loop, data, stop, size, exact)
    return eqx.partition(end, eqx.is_array)[0], last, outcome


class _Chunks:
    """`solve`'s compiled chunk, one compilation per run. What `eqx.filter_jit` does at
    every call (split the arrays from the rest) is done once, so that a chunk costs one
    dispatch; the loop's arrays are donated (a chunk's input is never used again).
    When every chunk has `size` steps (`start` and `stop` multiples of it) the chunk is
    a scan of known length; otherwise one loop of variable length serves all chunks,
    a shorter last one included."""

    def __init__(self, problem, solver, data, size: int, loop: LoopState, start, stop):
        self.arguments, self.static = _hashable_partition((problem, solver, data))
        _, self.loop_static = _hashable_partition(loop)
        self.size = size
        self.exact = start % size == 0 and stop % size == 0

    def __call__(self, loop: LoopState, stop) -> tuple[LoopState, dict, _Outcome]:
        dynamic = eqx.partition(loop, eqx.is_array)[0]
        end, last, outcome = _chunk_compiled(
            self.static,
            self.loop_static,
            self.size,
            self.exact,
            self.arguments,
            dynamic,
            stop,
        )
        return _hashable_combine(end, self.loop_static), last, outcome


# --------------------------------------------------------------------------------------
# Public loop.


def validate(problem: Any, x0: PyTree, y0: PyTree, data: Any) -> None:
    """Check `x0`, `y0` and the shapes of the data's batches against the problem."""
    key = jr.PRNGKey(0)
    upper = jax.eval_shape(data.upper_batch, key, jnp.array(0))
    lower = jax.eval_shape(data.lower_batch, key, jnp.array(0))
    problem.check(x0, y0, upper, lower)


def _init(problem, solver, x0, y0, data, key, divergence):
    validate(problem, x0, y0, data)
    init_key, loop_key = jr.split(key)
    state = solver.init(problem, x0, y0, init_key, bind_run_key(data, loop_key))
    float_dtype = jnp.result_type(float)
    loop = LoopState(
        state=state,
        step=jnp.zeros((), jnp.int32),
        key=loop_key,
        status=jnp.zeros((), jnp.int32),
        reference=jnp.zeros(2, float_dtype),
        divergence=divergence,
    )
    # Fresh, strongly typed buffers: the state never aliases the caller's x0 / y0 (solve
    # donates it), and its types are those `step` returns (one compilation per chunk).
    return jtu.tree_map(_strong_copy, loop)


def _strong_copy(leaf):
    if isinstance(leaf, jax.Array) and not jnp.issubdtype(
        leaf.dtype, jax.dtypes.prng_key
    ):
        return jnp.array(leaf, dtype=leaf.dtype, copy=True)
    return leaf


_init_jit = eqx.filter_jit(_init)


def _divergence(divergence: float | None) -> float:
    if divergence is None:
        return float("inf")
    if not isinstance(divergence, int | float) or not divergence > 1:
        raise ValueError(
            f"`divergence` must be a number > 1 or None, got {divergence!r}"
        )
    return float(divergence)


def init(
    problem: Any,
    solver: AbstractBilevelSolver,
    x0: PyTree[Array],
    y0: PyTree[Array],
    data: Any = None,
    key: PRNGKeyArray | None = None,
    *,
    divergence: float | None = DIVERGENCE,
) -> LoopState:
    """Start a run: check `x0`, `y0` and the data against the problem and build the
    [`bilevel.LoopState`][] that [`bilevel.run_from`][] continues.

    `key` (default `jax.random.PRNGKey(0)`; new-style `jax.random.key` keys work too)
    is split into the solver's init key and the loop key, exactly as in
    [`bilevel.run`][] and [`bilevel.solve`][]. `divergence`: see [`bilevel.run`][].
    """
    key = jr.PRNGKey(0) if key is None else key
    data = as_data(data)
    divergence = _divergence(divergence)
    divergence = np.asarray(divergence, jnp.result_type(float))
    if _traced(problem, solver, x0, y0, data, key):
        return _init(problem, solver, x0, y0, data, key, divergence)
    return _init_jit(problem, solver, x0, y0, data, key, divergence)


def run_from(
    problem: Any,
    solver: AbstractBilevelSolver,
    loop: LoopState,
    data: Any = None,
    num_steps: int = 1000,
) -> tuple[LoopState, dict[str, Array]]:
    """Continue a run by `num_steps` steps from `loop` (from [`bilevel.init`][] or an
    earlier `run_from`), with the same per-step keys as one long run: chunks of any
    sizes give bit-identical states and histories.

    Pure: `jax.vmap` / `jax.jit` it. Called outside a transformation it compiles one
    `lax.scan` (cached per shapes), plus, only when a step fails, the re-run that
    recovers the last good state.

    **Returns:** `(loop, history)`; `history` as in [`bilevel.run`][]. A failed loop
    (`loop.status` nonzero) takes no more steps.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"`num_steps` must be a positive int, got {num_steps!r}")
    data = as_data(data)
    if _traced(problem, solver, loop, data):
        end, history, outcome = _scan_pass(problem, solver, loop, data, num_steps)
        # Without a failure the recovery is skipped: the loop stays differentiable
        # (`jax.grad` through `run`); a recovered state carries no gradient.
        end = lax.cond(
            outcome.failure == _OK,
            lambda: end,
            lambda: lax.stop_gradient(
                _recover(problem, solver, loop, data, end, outcome)
            ),
        )
        return end, _mark(history, loop.step, end)
    end, history, outcome = _marked_pass_jit(problem, solver, loop, data, num_steps)
    if int(outcome.failure) != _OK:
        end = _recover_jit(problem, solver, loop, data, end, outcome)
        history = _mark_jit(history, loop.step, end)
    return end, history


def run(
    problem: Any,
    solver: AbstractBilevelSolver,
    x0: PyTree[Array],
    y0: PyTree[Array],
    data: Any = None,
    num_steps: int = 1000,
    key: PRNGKeyArray | None = None,
    *,
    divergence: float | None = DIVERGENCE,
) -> tuple[Any, dict[str, Array]]:
    """Run `num_steps` solver steps as one compiled `lax.scan`.

    Pure: `jax.vmap` it over seeds or initial points. Equivalent to
    `loop = bl.init(...); loop, history = bl.run_from(..., loop, ..., num_steps)`,
    returning `loop.state`.

    A step fails when one of its metrics is NaN or inf (or, checked once at the end,
    the state is): status `nonfinite`; or when `|upper_loss|` (from step 1) or
    `lower_residual` (from step 10) exceeds `divergence` times its largest value over
    the first 10 steps (over the steps before, during those): status `diverged`
    (`divergence=None`: never). Metrics are taken at a step's iterate, so the run keeps
    the state before that iterate, the last good one, and takes no more steps. This is
    decided inside the compiled loop, so it works under `jax.vmap` too.

    **Returns:** `(final_state, history)`: `history` holds every step's metrics (arrays
    of length `num_steps`) and the columns `finite` (False from a non-finite step on)
    and `diverged` (True from a diverging step on); the steps kept are
    `sum(finite & ~diverged)`. Use `solver.params(final_state)` for `(x, y)`.
    """
    loop = init(problem, solver, x0, y0, data, key, divergence=divergence)
    loop, history = run_from(problem, solver, loop, data, num_steps)
    return loop.state, history


# --------------------------------------------------------------------------------------
# The host driver.


def solve(
    problem: Any,
    solver: AbstractBilevelSolver,
    x0: PyTree[Array],
    y0: PyTree[Array],
    data: Any = None,
    num_steps: int = 1000,
    key: PRNGKeyArray | None = None,
    log_every: int = 50,
    progress: bool = True,
    checkpoint: str | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    tol: float | None = None,
    tol_metric: str = "grad_norm",
    divergence: float | None = DIVERGENCE,
    callback: Callable[[int, dict[str, np.ndarray], PyTree, PyTree], None]
    | None = None,
) -> Result:
    """Run a solver with host-side logging: compiled chunks of `log_every` steps, a
    progress display, a history, early stopping and checkpoints.

    **Arguments:**

    - `problem`, `solver`, `x0`, `y0`, `data`, `num_steps`, `key`, `divergence`: as in
      [`bilevel.run`][]; the trajectory is identical to `run`'s (same per-step keys).
    - `log_every`: steps per compiled chunk; one history row per chunk. Every chunk,
      including a shorter last one, runs the same compiled function.
    - `progress`: on a terminal (or in Jupyter) a progress bar with the upper loss and
      the lower residual; otherwise (a log file, a pipe) one plain line per log point,
      on standard error.
    - `checkpoint`: a directory; after every chunk the full run (solver state with its
      estimator memories and warm starts, PRNG key, step, history) is written there
      atomically, the previous checkpoint kept as a fallback. The directory is locked
      while the run writes to it: a second run on it fails at once.
    - `resume`: continue from the checkpoint in `checkpoint` if there is one (the
      previous one if the last is missing or damaged). A resumed run produces the same
      history as an uninterrupted one. The checkpoint records what it belongs to
      (solver and hyperparameters, problem, x0/y0 structure, data, `log_every`); a
      resume with anything else is refused with the differences named. A finished run
      continues when `num_steps` is larger, or when a new `tol` is no longer met.
    - `overwrite`: with `resume=False`, replace an existing checkpoint (refused
      otherwise).
    - `tol`: stop with status `converged` once `metrics[tol_metric] <= tol` at a log
      point.
    - `callback`: `callback(step, metrics, x, y)`, called on the host after every log
      point (once its checkpoint is written) with the steps done, that point's metrics
      (NumPy scalars) and the current iterates; for custom logging or evaluation.

    **Several processes** (`jax.distributed`, see
    [`bilevel.distributed.initialize`][]): call `solve` with the same arguments in
    every process. Each process computes the same
    trajectory and returns the same `Result` (arrays sharded over processes stay
    sharded: [`bilevel.distributed.gather`][] reads them); only process 0 shows
    progress and writes the checkpoint (gathering sharded state first); on resume
    every process reads it from the shared directory. `callback` runs in every process.

    **Returns:** a [`bilevel.Result`][]. A failing step (non-finite or diverging, see
    [`bilevel.run`][]) stops the run with status `nonfinite` or `diverged` and the last
    good state. A nonzero `hypergradient_status` metric gives one warning per call.
    """
    _check_solve_arguments(num_steps, log_every, checkpoint, resume, overwrite)
    divergence = _divergence(divergence)
    check_finite("x0", x0)
    check_finite("y0", y0)
    key = jr.PRNGKey(0) if key is None else key
    data = as_data(data)
    writer = None
    if checkpoint is not None:
        fingerprint = _checkpoint.fingerprint(problem, solver, x0, y0, data, log_every)
        writer = _checkpoint.Writer(
            checkpoint, fingerprint, resume=resume, overwrite=overwrite
        )
    try:
        return _drive(
            problem,
            solver,
            x0,
            y0,
            data,
            key,
            divergence,
            num_steps,
            log_every,
            progress,
            writer,
            tol,
            tol_metric,
            callback,
        )
    finally:
        if writer is not None:
            writer.close()


def _check_solve_arguments(num_steps, log_every, checkpoint, resume, overwrite):
    if resume and checkpoint is None:
        raise ValueError("`resume=True` needs a `checkpoint` directory")
    if overwrite and resume:
        raise ValueError("`overwrite=True` starts afresh: it excludes `resume=True`")
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"`num_steps` must be a positive int, got {num_steps!r}")
    if not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"`log_every` must be a positive int, got {log_every!r}")


def _drive(
    problem,
    solver,
    x0,
    y0,
    data,
    key,
    divergence,
    num_steps,
    log_every,
    progress,
    writer,
    tol,
    tol_metric,
    callback,
) -> Result:
    loop = init(problem, solver, x0, y0, data, key, divergence=divergence)
    rows: list[dict[str, Any]] = []
    status = Status.max_steps
    if writer is not None and writer.resumable:
        loop, rows, status = _resume(writer, loop, num_steps, tol, tol_metric, solver)
    done = int(loop.step)
    main = distributed.is_main_process()
    display = _progress.display(progress and main, num_steps, done, tol, tol_metric)
    chunks = _Chunks(problem, solver, data, log_every, loop, done, num_steps)
    warned = False
    try:
        while done < num_steps and status == Status.max_steps:
            stop = np.int32(min(done + log_every, num_steps))
            loop, last, outcome = chunks(loop, stop)
            row, failure, done = jax.device_get((last, outcome.failure, loop.step))
            if failure != _OK:
                source = _rollback_source(
                    writer,
                    problem,
                    solver,
                    x0,
                    y0,
                    data,
                    key,
                    divergence,
                    outcome,
                    loop,
                )
                loop = _recover_jit(problem, solver, source, data, loop, outcome)
                done, failure = jax.device_get((loop.step, loop.status))
            row = {**row, "step": np.asarray(done, np.int32)}
            rows.append(row)
            status = _status(failure, row, tol, tol_metric, solver)
            # a failed run reports its failure as its status: no second warning;
            # warnings come from process 0 alone
            warned = warned or (main and failure == _OK and _warn_hypergradient(row))
            if writer is not None:
                writer.save(loop, rows, status)
            if display is not None:
                display.update(int(done), row)
            if callback is not None:
                x, y = jtu.tree_map(_copy, solver.params(loop.state))
                callback(int(done), row, x, y)
    finally:
        if display is not None:
            display.close()
    history = (
        {name: np.stack([row[name] for row in rows]) for name in rows[0]}
        if rows
        else {}
    )
    x, y = solver.params(loop.state)
    return Result(
        x=x, y=y, state=loop.state, history=history, status=status, num_steps=int(done)
    )


def _copy(leaf):
    # The loop's buffers are donated to the next chunk: hand out copies.
    return jnp.copy(leaf) if isinstance(leaf, jax.Array) else leaf


def _resume(writer, like, num_steps, tol, tol_metric, solver):
    loop, rows, status = writer.load(like)
    loop = eqx.tree_at(lambda loop: loop.divergence, loop, like.divergence)
    done = int(loop.step)
    if done > num_steps:
        raise ValueError(
            f"the checkpoint in {writer.directory} has {done} steps done, more than "
            f"num_steps={num_steps}; pass num_steps >= {done} to continue it, or "
            "resume=False, overwrite=True to start over"
        )
    if status == Status.converged:
        status = _status(_OK, rows[-1], tol, tol_metric, solver)
    elif status != Status.max_steps:
        warnings.warn(
            f"the run checkpointed in {writer.directory} stopped with status {status}: "
            "nothing to continue (overwrite=True starts over)",
            stacklevel=4,
        )
    return loop, rows, status


def _rollback_source(
    writer, problem, solver, x0, y0, data, key, divergence, outcome, failed
):
    """A loop state before the failed one: the latest checkpoint old enough, else the
    run's start. (A failing step's metrics condemn the state it started from, which
    may be the chunk's start, the latest checkpoint.)"""
    bad = int(outcome.failed_at) if int(outcome.failed_at) >= 0 else int(failed.step)
    start = init(problem, solver, x0, y0, data, key, divergence=divergence)
    if writer is not None:
        for source in writer.sources(start):
            if int(source.step) < bad:
                return source
    return start


def _status(failure, row, tol, tol_metric, solver) -> Status:
    """The status after a log point: the failure code's, else converged or not."""
    if failure != _OK:
        return Status.from_code(failure)
    if tol is not None and tol_metric not in row:
        raise ValueError(
            f"`tol_metric={tol_metric!r}` is not a metric of {type(solver).__name__}; "
            f"available: {sorted(row)}"
        )
    if tol is not None and float(row[tol_metric]) <= tol:
        return Status.converged
    return Status.max_steps


def _warn_hypergradient(row) -> bool:
    code = int(row.get("hypergradient_status", 0))
    if code == 0:
        return False
    meaning = _HYPERGRADIENT_STATUS.get(code, "see the solver's documentation")
    warnings.warn(
        f"hypergradient_status {code} at step {int(row['step'])}: {meaning}. The "
        "hypergradient may be inaccurate (this warning is shown once per run).",
        RuntimeWarning,
        stacklevel=4,
    )
    return True
