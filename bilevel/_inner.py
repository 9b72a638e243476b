r"""The inner loop: optimizer steps on the lower objective $g(x, \cdot)$, written once
for every solver that takes inner steps (ImplicitDiff, Unrolled, the penalty and
BOREP solvers).

Step $k$ of a loop started at draw $d$ uses the lower batch
`data.lower_batch(fold_in(key, k), d + k)`, so two solvers given the same key and draw
see the same batches. Each step is
$y \leftarrow P_Y(y + \text{update}(\nabla_y g(x, y)))$ with any optax transformation;
transformations that need the objective (line searches, `optax.lbfgs`) get it through
optax's extra arguments (`value`, `grad`, `value_fn`), and on deterministic data the
value and gradient they store are reused, so each iteration costs one gradient.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import optax
import optimistix as optx
from jaxtyping import Array, Int, PRNGKeyArray, PyTree, Scalar

from ._data import AbstractData
from ._misc import tree_norm
from ._problem import apply_project_y


def _stores_value(problem: Any, opt_state: Any, deterministic: bool) -> bool:
    """Whether the optimizer keeps the objective's value and gradient at its new iterate
    (optax line searches) and these may be reused at the next step: same batch, and no
    projection moving the iterate after the update."""
    return (
        deterministic
        and problem.project_y is None
        and optax.tree.get(opt_state, "value") is not None
    )


def _forget_value(opt_state: Any) -> Any:
    """Mark a stored value as stale (e.g. `x` changed): the next step recomputes it."""
    stored = optax.tree.get(opt_state, "value")
    return optax.tree.set(opt_state, value=jnp.full_like(stored, jnp.inf))


def _value_and_grad(fn: Callable, y: PyTree, opt_state: Any, reuse: bool):
    if reuse:
        return optax.value_and_grad_from_state(fn)(y, state=opt_state)
    return jax.value_and_grad(fn)(y)


def inner_update(
    problem: Any,
    optimizer: optax.GradientTransformationExtraArgs,
    x: PyTree[Array],
    y: PyTree[Array],
    opt_state: Any,
    batch: Any,
    reuse: bool = False,
) -> tuple[PyTree[Array], Any]:
    r"""One projected optimizer step on $g(x, \cdot\,; \text{batch})$: the new `y` and
    optimizer state. With `reuse`, the value and gradient stored by the optimizer at
    its last iterate are used instead of being recomputed."""

    def fn(v):
        return problem.lower(x, v, batch)

    value, grad = _value_and_grad(fn, y, opt_state, reuse)
    updates, opt_state = _update(optimizer, opt_state, y, value, grad, fn)
    return apply_project_y(problem, x, optax.apply_updates(y, updates)), opt_state


def _update(optimizer, opt_state, y, value, grad, fn):
    # Standard promotion while tracing the optimizer: optax.lbfgs adds int32 and
    # default-int arrays, which strict promotion (as in our tests) rejects under x64.
    with jax.numpy_dtype_promotion("standard"):
        return optimizer.update(grad, opt_state, y, value=value, grad=grad, value_fn=fn)


def inner_steps(
    problem: Any,
    optimizer: optax.GradientTransformation,
    x: PyTree[Array],
    y: PyTree[Array],
    opt_state: Any,
    data: AbstractData,
    key: PRNGKeyArray,
    num_steps: int,
    first_draw: Int[Array, ""] | int,
    *,
    truncate: int | None = None,
    checkpoint: bool = False,
) -> tuple[PyTree[Array], Any]:
    r"""`num_steps` projected optimizer steps on $g(x, \cdot)$ from `y` (a warm start),
    step $k$ on the lower batch of draw `first_draw + k`; returns `(y, opt_state)`.

    Differentiable in `x` (reverse mode through all steps: unrolled differentiation).
    With `truncate=T`, only the last $T$ steps are differentiated (the earlier ones run
    under `stop_gradient`); `checkpoint=True` rematerialises each step in the backward
    pass (`jax.checkpoint`), so memory holds one carry per step.
    """
    optimizer = optax.with_extra_args_support(optimizer)
    reuse = _stores_value(problem, opt_state, data.deterministic)
    if reuse:
        opt_state = _forget_value(opt_state)

    def body(carry, k):
        y, opt_state = carry
        batch = data.lower_batch(jr.fold_in(key, k), first_draw + k)
        return inner_update(problem, optimizer, x, y, opt_state, batch, reuse), None

    if checkpoint:
        body = jax.checkpoint(body)
    first_draw = jnp.asarray(first_draw)
    steps = jnp.arange(num_steps, dtype=first_draw.dtype)
    skip = num_steps - (num_steps if truncate is None else truncate)
    carry = (y, opt_state)
    if skip:
        carry, _ = lax.scan(body, carry, steps[:skip])
        carry = lax.stop_gradient(carry)
    carry, _ = lax.scan(body, carry, steps[skip:])
    return carry


def inner_steps_until(
    problem: Any,
    optimizer: optax.GradientTransformation,
    x: PyTree[Array],
    y: PyTree[Array],
    opt_state: Any,
    batch: Any,
    max_steps: int,
    tol: float | Scalar,
) -> tuple[PyTree[Array], Any, Int[Array, ""]]:
    r"""Optimizer steps on $g(x, \cdot\,; \text{batch})$ (deterministic) until
    $\|\Phi(x, y)\| \le$ `tol` or `max_steps`; returns `(y, opt_state, steps)`.

    One gradient per iteration: for the stationarity condition $\Phi = \nabla_y g$ the
    stopping test reuses the gradient of the next update (any other condition costs one
    evaluation of $\Phi$ per iteration). Not differentiable (a while loop).
    """
    optimizer = optax.with_extra_args_support(optimizer)
    reuse = _stores_value(problem, opt_state, True)
    if reuse:
        opt_state = _forget_value(opt_state)
    plain = problem.project_y is None and not problem.has_custom_condition

    def fn(v):
        return problem.lower(x, v, batch)

    def residual(y, grad):
        return tree_norm(grad) if plain else tree_norm(problem.condition(x, y, batch))

    def cond(carry):
        _, _, k, res, _ = carry
        return (k < max_steps) & (res > tol)

    def body(carry):
        y, opt_state, k, _, (value, grad) = carry
        updates, opt_state = _update(optimizer, opt_state, y, value, grad, fn)
        y = apply_project_y(problem, x, optax.apply_updates(y, updates))
        value, grad = _value_and_grad(fn, y, opt_state, reuse)
        return y, opt_state, k + 1, residual(y, grad), (value, grad)

    value, grad = _value_and_grad(fn, y, opt_state, reuse)
    carry = (y, opt_state, jnp.array(0), residual(y, grad), (value, grad))
    y, opt_state, steps, _, _ = lax.while_loop(cond, body, carry)
    return y, opt_state, steps


def minimise_inner(
    problem: Any,
    solver: optx.AbstractMinimiser,
    x: PyTree[Array],
    y: PyTree[Array],
    batch: Any,
    max_steps: int,
) -> tuple[PyTree[Array], optx.RESULTS, Int[Array, ""]]:
    r"""$\arg\min_y g(x, y; \text{batch})$ by an optimistix minimiser (e.g.
    `optx.LBFGS(rtol, atol)`) from the warm start `y`, at most `max_steps` iterations;
    returns the solution, its status and the iterations taken. Never raises:
    hitting `max_steps` is reported in the status."""
    solution = optx.minimise(
        _lower_of_y,
        solver,
        y,
        args=(problem.lower, x, batch),
        max_steps=max_steps,
        throw=False,
    )
    return solution.value, solution.result, solution.stats["num_steps"]


def _lower_of_y(y, args):
    lower, x, batch = args
    return lower(x, y, batch)
