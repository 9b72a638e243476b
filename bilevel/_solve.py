"""The bilevel loop: `run` (pure, one `lax.scan`) and `solve` (host driver)."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, PRNGKeyArray, PyTree

from . import _checkpoint
from ._data import as_data, bind_run_key
from ._misc import tree_all_finite, tree_where
from ._problem import check_finite
from ._result import Result, Status
from ._solver import AbstractBilevelSolver


def _step_keys(key: PRNGKeyArray, start, num: int) -> PRNGKeyArray:
    steps = start + jnp.arange(num)
    return jax.vmap(jr.fold_in, in_axes=(None, 0))(key, steps)


def validate(problem: Any, x0: PyTree, y0: PyTree, data: Any) -> None:
    """Check `x0`, `y0` and the shapes of the data's batches against the problem."""
    key = jr.PRNGKey(0)
    upper = jax.eval_shape(data.upper_batch, key, jnp.array(0))
    lower = jax.eval_shape(data.lower_batch, key, jnp.array(0))
    problem.check(x0, y0, upper, lower)


def _guarded_scan(problem, solver, state, finite, data, keys):
    """Scan `solver.step`; once the state turns non-finite keep the last finite one."""

    def body(carry, key):
        state, finite = carry
        new_state, metrics = solver.step(problem, state, data, key)
        finite = finite & tree_all_finite(new_state)
        state = tree_where(finite, new_state, state)
        return (state, finite), {**metrics, "finite": finite}

    return lax.scan(body, (state, finite), keys)


@eqx.filter_jit
def run(
    problem: Any,
    solver: AbstractBilevelSolver,
    x0: PyTree[Array],
    y0: PyTree[Array],
    data: Any = None,
    num_steps: int = 1000,
    key: PRNGKeyArray | None = None,
) -> tuple[Any, dict[str, Array]]:
    """Run `num_steps` solver steps as one compiled `lax.scan`.

    Pure and jit-compiled: `jax.vmap` it over seeds or initial points. Once the state
    becomes non-finite it is frozen at the last finite state; the history's `finite`
    column says which steps were finite.

    **Returns:** `(final_state, history)`, the history holding every step's metrics
    (arrays of length `num_steps`). Use `solver.params(final_state)` for `(x, y)`.
    """
    key = jr.PRNGKey(0) if key is None else key
    data = as_data(data)
    validate(problem, x0, y0, data)
    init_key, loop_key = jr.split(key)
    data = bind_run_key(data, loop_key)
    state = solver.init(problem, x0, y0, init_key, data)
    (state, _), history = _guarded_scan(
        problem, solver, state, jnp.array(True), data, _step_keys(loop_key, 0, num_steps)
    )
    return state, history


@eqx.filter_jit
def _init(problem, solver, x0, y0, key, data):
    return solver.init(problem, x0, y0, key, data)


@eqx.filter_jit
def _chunk(problem, solver, state, finite, data, loop_key, start, num: int):
    data = bind_run_key(data, loop_key)
    (state, finite), metrics = _guarded_scan(
        problem, solver, state, finite, data, _step_keys(loop_key, start, num)
    )
    last = jax.tree_util.tree_map(lambda m: m[-1], metrics)
    return state, finite, last, jnp.sum(metrics["finite"])


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
    tol: float | None = None,
    tol_metric: str = "grad_norm",
    callback: Callable[[int, dict[str, np.ndarray], PyTree, PyTree], None] | None = None,
) -> Result:
    """Run a solver with host-side logging: compiled chunks of `log_every` steps, a
    progress bar, a history, and early stopping.

    **Arguments:**

    - `problem`, `solver`, `x0`, `y0`, `data`, `num_steps`, `key`: as in
      [`bilevel.run`][]; the trajectory is identical to `run`'s (same per-step keys).
    - `log_every`: steps per compiled chunk; one history row per chunk.
    - `progress`: show a tqdm bar with the live upper loss.
    - `checkpoint`: a directory; after every chunk the full state (solver state with its
      estimator memories and warm starts, the PRNG key, the step, the history) is
      written there atomically.
    - `resume`: continue from the checkpoint in `checkpoint` if there is one. A resumed
      run produces the same history as an uninterrupted one (same `log_every`); the
      checkpoint's PRNG key and state replace `key`, `x0` and `y0`.
    - `tol`: stop with status `converged` once `metrics[tol_metric] <= tol` at a log point.
    - `callback`: `callback(step, metrics, x, y)`, called on the host after every log
      point (once its checkpoint is written) with the steps done, that point's metrics
      (NumPy scalars) and the current iterates; for custom logging or evaluation.

    **Returns:** a [`bilevel.Result`][]. A non-finite state stops the run with status
    `nonfinite` and the last finite state.
    """
    if resume and checkpoint is None:
        raise ValueError("`resume=True` needs a `checkpoint` directory")
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"`num_steps` must be a positive int, got {num_steps!r}")
    if not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"`log_every` must be a positive int, got {log_every!r}")
    check_finite("x0", x0)
    check_finite("y0", y0)
    key = jr.PRNGKey(0) if key is None else key
    data = as_data(data)
    validate(problem, x0, y0, data)
    init_key, loop_key = jr.split(key)
    state = _init(problem, solver, x0, y0, init_key, bind_run_key(data, loop_key))
    finite = jnp.array(True)
    rows: list[dict[str, Any]] = []
    status = Status.max_steps
    done = 0
    if resume and _checkpoint.exists(checkpoint):
        (state, finite, loop_key), rows, meta = _checkpoint.load(
            checkpoint, (state, finite, loop_key)
        )
        if meta["log_every"] != log_every:
            raise ValueError(
                f"the checkpoint in {checkpoint} was written with log_every="
                f"{meta['log_every']}; resume with the same value"
            )
        done, status = meta["done"], Status(meta["status"])
    bar = _progress_bar(progress, num_steps)
    if bar is not None:
        bar.update(done)
    while done < num_steps and status == Status.max_steps:
        num = min(log_every, num_steps - done)
        state, finite, last, num_finite = _chunk(
            problem, solver, state, finite, data, loop_key, jnp.asarray(done), num
        )
        done += int(num_finite)
        row = {name: np.asarray(value) for name, value in last.items()}
        row["step"] = np.asarray(done)
        rows.append(row)
        if bar is not None:
            bar.update(num)
            bar.set_postfix({k: f"{float(row[k]):.4g}" for k in ("upper_loss", tol_metric) if k in row})
        status = _status(finite, row, tol, tol_metric, solver)
        if checkpoint is not None:
            meta = {"done": done, "status": status.value, "log_every": log_every}
            _checkpoint.save(checkpoint, (state, finite, loop_key), rows, meta)
        if callback is not None:
            callback(done, row, *solver.params(state))
    if bar is not None:
        bar.close()
    history = {name: np.stack([row[name] for row in rows]) for name in rows[0]}
    x, y = solver.params(state)
    return Result(x=x, y=y, state=state, history=history, status=status, num_steps=done)


def _status(finite, row, tol, tol_metric, solver) -> Status:
    if not bool(finite):
        return Status.nonfinite
    if tol is not None and tol_metric not in row:
        raise ValueError(
            f"`tol_metric={tol_metric!r}` is not a metric of {type(solver).__name__}; "
            f"available: {sorted(row)}"
        )
    if tol is not None and float(row[tol_metric]) <= tol:
        return Status.converged
    return Status.max_steps


def _progress_bar(progress: bool, total: int):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="step", dynamic_ncols=True)
