r"""Differentiable inner solvers: maintained solvers (optimistix, optax) and proximal /
projected gradient loops, wrapped in [`bilevel.implicit_diff`][].

Each constructor returns `solution(x, *args, y0=None, **kwargs)`, the inner solution
$y^*(x)$, differentiable in $x$ and in every floating array of `args`/`kwargs` by the
implicit function theorem (forward and reverse mode), never through `y0`. The forward
solve is never differentiated, so its length does not matter.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import optax
import optimistix as optx
from jaxtyping import Array, PyTree, Scalar

from ._conditions import (
    OptimalityCondition,
    as_condition,
    projected_gradient_condition,
    proximal_gradient_condition,
    stationarity_condition,
)
from ._implicit import OnFailure, apply_failure_policy, implicit_diff
from ._misc import default_tolerance, tree_axpy, tree_dot, tree_norm, tree_sub
from ._stepsize import operator_norm
from .prox import from_projection


DEFAULT_MAX_STEPS = 1000
"""Iteration cap of the inner solvers when `max_steps` is not given."""


def argmin(
    fn: Callable[..., Scalar],
    solver: optx.AbstractMinimiser | optax.GradientTransformation | None = None,
    *,
    y0: PyTree | Callable | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
    has_aux: bool = False,
    linear_solver: lx.AbstractLinearSolver | None = None,
    ridge: float = 0.0,
    on_failure: OnFailure = "warn",
    options: dict[str, Any] | None = None,
) -> Callable:
    r"""$y^*(x) = \arg\min_y g(x, y, *\text{args})$ by an optimistix minimiser or an
    optax transformation, differentiated through $\nabla_y g = 0$.

    ```python
    solution = bl.argmin(g, optx.LBFGS(rtol=1e-8, atol=1e-8), y0=jnp.zeros(d))
    jax.grad(lambda x: f(x, solution(x, data)))(x)
    ```

    **Arguments:**

    - `fn`: $g(x, y, *\text{args}, **\text{kwargs}) \to$ scalar (or `(scalar, aux)` with
      `has_aux`).
    - `solver`: an `optimistix` minimiser (`optx.LBFGS`, `optx.BFGS`,
      `optx.NonlinearCG`, `optx.GradientDescent`, `optx.OptaxMinimiser`, ...), run until
      its tolerances or `max_steps`; or an `optax.GradientTransformation`, run for
      exactly `max_steps` steps. Default: `optx.LBFGS` with `rtol = atol` = $10^{-10}$
      (float64) or $10^{-5}$ (float32).
    - `y0`: the starting point, or a function `y0(x, *args, **kwargs)`; the solution
      function also takes `y0=` per call (e.g. a warm start).
    - `max_steps`: iteration cap (optimistix) or number of steps (optax).
    - `has_aux`: `fn` returns `(value, aux)`; the solution function then returns
      `(y, aux)`, `aux` with zero derivative.
    - `linear_solver`, `ridge`, `on_failure`: as in [`bilevel.implicit_diff`];
      `on_failure` also applies to an optimistix solve that fails (at run time: a
      `RuntimeWarning`, NaN, or an error).
    - `options`: passed to `optx.minimise`.
    """
    condition = stationarity_condition(_value_only(fn, has_aux))
    if isinstance(solver, optax.GradientTransformation):
        run = _OptaxRun(fn, solver, max_steps, has_aux)
    elif solver is None or isinstance(solver, optx.AbstractMinimiser):
        run = _OptimistixRun(
            optx.minimise,
            fn,
            solver,
            optx.LBFGS,
            options,
            max_steps,
            has_aux,
            on_failure,
        )
    else:
        raise TypeError(
            "argmin: `solver` must be an optimistix minimiser or an optax "
            f"GradientTransformation, got {type(solver).__name__}"
        )
    return _solution(condition, run, y0, has_aux, linear_solver, ridge, on_failure)


def root(
    fn: Callable[..., PyTree[Array]],
    solver: optx.AbstractRootFinder | None = None,
    *,
    y0: PyTree | Callable | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
    symmetric: bool = False,
    linear_solver: lx.AbstractLinearSolver | None = None,
    ridge: float = 0.0,
    on_failure: OnFailure = "warn",
    options: dict[str, Any] | None = None,
) -> Callable:
    r"""$y^*(x)$ with $F(x, y^*, *\text{args}) = 0$ by an optimistix root finder
    (`optx.Newton`, `optx.Chord`, `optx.Bisection` with `options={"lower": ..,
    "upper": ..}`, ...), differentiated through $F = 0$ (jaxopt's `custom_root`).

    `fn` is $F(x, y, *\text{args}, **\text{kwargs})$, a pytree like $y$; declare
    `symmetric=True` when $\partial_y F$ is symmetric (MINRES instead of GMRES for the
    adjoint). Default solver: `optx.Newton` with dtype tolerances. Other arguments as in
    [`bilevel.argmin`][].
    """
    condition = OptimalityCondition(fn, symmetric=symmetric)
    run = _OptimistixRun(
        optx.root_find, fn, solver, optx.Newton, options, max_steps, False, on_failure
    )
    return _solution(condition, run, y0, False, linear_solver, ridge, on_failure)


def fixed_point(
    fn: Callable[..., PyTree[Array]],
    solver: optx.AbstractFixedPointSolver | optx.AbstractRootFinder | None = None,
    *,
    y0: PyTree | Callable | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
    linear_solver: lx.AbstractLinearSolver | None = None,
    ridge: float = 0.0,
    on_failure: OnFailure = "warn",
    options: dict[str, Any] | None = None,
) -> Callable:
    r"""$y^* = T(x, y^*, *\text{args})$ by an optimistix fixed-point solver (default
    `optx.FixedPointIteration` with dtype tolerances), differentiated through
    $\Phi = y - T(x, y)$ (jaxopt's `custom_fixed_point`; note the sign: our
    $\partial_y\Phi = I - \partial_y T$). Other arguments as in [`bilevel.argmin`][].
    """
    condition = OptimalityCondition(_FixedPointResidual(fn))
    default = optx.FixedPointIteration
    run = _OptimistixRun(
        optx.fixed_point, fn, solver, default, options, max_steps, False, on_failure
    )
    return _solution(condition, run, y0, False, linear_solver, ridge, on_failure)


def least_squares(
    fn: Callable[..., PyTree[Array]],
    solver: optx.AbstractLeastSquaresSolver | optx.AbstractMinimiser | None = None,
    *,
    y0: PyTree | Callable | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
    linear_solver: lx.AbstractLinearSolver | None = None,
    ridge: float = 0.0,
    on_failure: OnFailure = "warn",
    options: dict[str, Any] | None = None,
) -> Callable:
    r"""$y^*(x) = \arg\min_y \frac12\|r(x, y, *\text{args})\|^2$ by an optimistix
    least-squares solver (`optx.GaussNewton`, `optx.LevenbergMarquardt` (default, dtype
    tolerances), `optx.Dogleg`, ...), differentiated through the gradient of
    $\frac12\|r\|^2$ (symmetric, not necessarily positive definite away from a
    zero-residual fit: MINRES). Other arguments as in [`bilevel.argmin`][].
    """
    objective = _HalfSquaredNorm(fn)
    condition = OptimalityCondition(
        stationarity_condition(objective).fn, symmetric=True
    )

    default = optx.LevenbergMarquardt
    run = _OptimistixRun(
        optx.least_squares, fn, solver, default, options, max_steps, False, on_failure
    )
    return _solution(condition, run, y0, False, linear_solver, ridge, on_failure)


def proximal_gradient(
    smooth: Callable[..., Scalar],
    prox: Callable,
    *,
    y0: PyTree | Callable | None = None,
    step: float | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
    tol: float | None = None,
    accelerate: bool = True,
    linear_solver: lx.AbstractLinearSolver | None = None,
    ridge: float = 0.0,
    on_failure: OnFailure = "warn",
) -> Callable:
    r"""$y^*(x) = \arg\min_y s(x, y, *\text{args}) + r(x, y)$ by proximal gradient
    (FISTA when `accelerate`, Beck and Teboulle, 2009, with the adaptive restart of
    O'Donoghue and Candes, 2015), differentiated through the
    proximal-gradient fixed point (jaxopt's `ProximalGradient(implicit_diff=True)`).

    - `smooth`: $s(x, y, *\text{args}, **\text{kwargs})$.
    - `prox`: `prox(x, v, step)`, e.g. from `bl.prox`.
    - `step`: a fixed step $\eta$; default: $1/L$ from a power-iteration estimate of the
      curvature of $s$ at the starting point, then halved whenever the sufficient
      decrease test $s(y^+) \le s(z) + \langle\nabla s(z), y^+ - z\rangle +
      \|y^+ - z\|^2/(2\eta)$ fails.
    - `tol`: stop when the gradient mapping $\|y^+ - z\|/\eta \le$ `tol` (default
      $10^{-8}$ in float64, $10^{-4}$ in float32), at most `max_steps` iterations.

    The implicit condition uses the fixed step if given, else $\eta = 1$ (the fixed
    points do not depend on it). Other arguments as in [`bilevel.argmin`][]; a run that
    ends at `max_steps` above `tol` counts as a failure for `on_failure`.
    """
    condition = proximal_gradient_condition(smooth, prox, 1.0 if step is None else step)
    run = _ProximalRun(smooth, prox, step, max_steps, tol, accelerate, on_failure)
    return _solution(condition, run, y0, False, linear_solver, ridge, on_failure)


def projected_gradient(
    lower: Callable[..., Scalar],
    project: Callable,
    *,
    y0: PyTree | Callable | None = None,
    step: float | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
    tol: float | None = None,
    accelerate: bool = True,
    linear_solver: lx.AbstractLinearSolver | None = None,
    ridge: float = 0.0,
    on_failure: OnFailure = "warn",
) -> Callable:
    r"""$y^*(x) = \arg\min_{y \in Y(x)} g(x, y, *\text{args})$ by projected gradient
    (accelerated), differentiated through the projected-gradient fixed point (jaxopt's
    `ProjectedGradient`, whose hyperparams_proj is $x$ here).

    `project` is a projection of $y$ (e.g. `optax.projections.projection_simplex`), or
    a set depending on $x$ built with [`bilevel.projection`][]. Other arguments as in
    [`bilevel.proximal_gradient`][].
    """
    condition = projected_gradient_condition(
        lower, project, 1.0 if step is None else step
    )
    prox = from_projection(project)
    run = _ProximalRun(lower, prox, step, max_steps, tol, accelerate, on_failure)
    return _solution(condition, run, y0, False, linear_solver, ridge, on_failure)


# --------------------------------------------------------------------------------------
# The proximal-gradient loop (also usable on its own, e.g. as an inner loop).


class ProximalGradientStats(eqx.Module):
    """Diagnostics of `proximal_gradient_solve`."""

    num_steps: Array
    residual: Scalar  # gradient-mapping norm ||y+ - z|| / step at the last iteration
    step: Scalar  # final step size
    converged: Array


def proximal_gradient_solve(
    smooth: Callable,
    prox: Callable,
    x: PyTree,
    y0: PyTree,
    args: tuple = (),
    kwargs: dict | None = None,
    step: float | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
    tol: float | None = None,
    accelerate: bool = True,
) -> tuple[PyTree, ProximalGradientStats]:
    r"""Proximal gradient / FISTA on $s(x, \cdot) + r(x, \cdot)$ from `y0`, with a
    backtracking step when `step` is None (see [`bilevel.proximal_gradient`][]).
    Returns the last iterate and its statistics; not differentiable by itself (wrap it
    in [`bilevel.implicit_diff`][] or use `bl.proximal_gradient`)."""
    kwargs = {} if kwargs is None else kwargs
    dtype = jnp.result_type(*jtu.tree_leaves(y0))
    tol = default_tolerance(dtype, 1e-8, 1e-4) if tol is None else tol

    def value_and_grad(y):
        return jax.value_and_grad(lambda v: smooth(x, v, *args, **kwargs))(y)

    one = jnp.ones((), dtype)
    if step is None:
        _, hvp = jax.linearize(lambda v: value_and_grad(v)[1], y0)
        curvature = operator_norm(hvp, y0, jax.random.PRNGKey(0))
        eta0 = 1 / jnp.maximum(curvature, jnp.finfo(dtype).tiny)
    else:
        eta0 = jnp.asarray(step, dtype)

    def candidate(z, eta):
        value, grad = value_and_grad(z)
        moved = tree_axpy(-eta, grad, z)
        return prox(x, moved, eta), value, grad

    def sufficient_decrease(z, y_new, value, grad, eta):
        diff = tree_sub(y_new, z)
        model = value + tree_dot(grad, diff) + tree_dot(diff, diff) / (2 * eta)
        # Rounding slack: near the minimum both sides agree to a few ulps, and a strict
        # test would shrink the step towards zero.
        slack = 10 * jnp.finfo(dtype).eps * jnp.abs(value)
        return smooth(x, y_new, *args, **kwargs) <= model + slack

    def backtrack(z, eta):
        if step is not None:
            y_new, _, _ = candidate(z, eta)
            return y_new, eta

        def cond(carry):
            _, eta_, ok, k = carry
            return ~ok & (k < 30)

        def body(carry):
            _, eta_, _, k = carry
            eta_ = eta_ / 2
            y_new, value, grad = candidate(z, eta_)
            return y_new, eta_, sufficient_decrease(z, y_new, value, grad, eta_), k + 1

        y_new, value, grad = candidate(z, eta)
        ok = sufficient_decrease(z, y_new, value, grad, eta)
        y_new, eta, _, _ = lax.while_loop(cond, body, (y_new, eta, ok, 0))
        return y_new, eta

    def body(carry):
        y, z, t, eta, _, k = carry
        y_new, eta = backtrack(z, eta)
        residual = tree_norm(tree_sub(y_new, z)) / eta
        if accelerate:
            # Gradient-based adaptive restart (O'Donoghue and Candes, 2015): drop the
            # momentum when it points against the last step; linear convergence on
            # strongly convex problems.
            restart = tree_dot(tree_sub(z, y_new), tree_sub(y_new, y)) > 0
            t_new = jnp.where(restart, one, (1 + jnp.sqrt(1 + 4 * t**2)) / 2)
            beta = jnp.where(restart, 0, (t - 1) / t_new)
            z_new = tree_axpy(beta, tree_sub(y_new, y), y_new)
        else:
            t_new, z_new = t, y_new
        return y_new, z_new, t_new, eta, residual, k + 1

    def cond(carry):
        *_, residual, k = carry
        return (k < max_steps) & ~(residual <= tol)

    init = (y0, y0, one, eta0, jnp.full((), jnp.inf, dtype), jnp.array(0))
    y, _, _, eta, residual, steps = lax.while_loop(cond, body, init)
    return y, ProximalGradientStats(steps, residual, eta, residual <= tol)


# --------------------------------------------------------------------------------------
# Plumbing shared by the constructors.


def _solution(condition, run, y0, has_aux, linear_solver, ridge, on_failure):
    """The user-facing solution function: `implicit_diff` around `run`, with the
    starting point as an input that the condition does not see."""
    condition = as_condition(condition)
    without_start = OptimalityCondition(
        _DropStart(condition.fn), condition.symmetric, condition.positive_semidefinite
    )

    @implicit_diff(
        without_start,
        linear_solver,
        has_aux=has_aux,
        ridge=ridge,
        on_failure=on_failure,
    )
    def inner(x, start, *args, **kwargs):
        y, aux = run(x, start, args, kwargs)
        return (y, aux) if has_aux else y

    def solution(x, *args, y0: PyTree | None = None, **kwargs):
        start = _start(default_y0 if y0 is None else y0, x, args, kwargs)
        return inner(x, jax.lax.stop_gradient(start), *args, **kwargs)

    default_y0 = y0
    return solution


class _DropStart(eqx.Module):
    fn: Callable

    def __call__(self, x, y, start, *args, **kwargs):
        return self.fn(x, y, *args, **kwargs)


def _start(y0, x, args, kwargs):
    if y0 is None:
        raise ValueError(
            "no starting point: pass `y0=` to the constructor (an array, a pytree or a "
            "function y0(x, *args)) or to the solution function"
        )
    return y0(x, *args, **kwargs) if callable(y0) and not eqx.is_array(y0) else y0


def _optx_fn(fn: Callable) -> Callable:
    """optimistix's `fn(y, args)` for our `fn(x, y, *args, **kwargs)`."""

    def wrapped(y, inputs):
        x, args, kwargs = inputs
        return fn(x, y, *args, **kwargs)

    return wrapped


def _value_only(fn: Callable, has_aux: bool) -> Callable:
    return _FirstOutput(fn) if has_aux else fn


class _FirstOutput(eqx.Module):
    fn: Callable

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)[0]


class _FixedPointResidual(eqx.Module):
    fn: Callable

    def __call__(self, x, y, *args, **kwargs):
        return tree_sub(y, self.fn(x, y, *args, **kwargs))


class _HalfSquaredNorm(eqx.Module):
    fn: Callable

    def __call__(self, x, y, *args, **kwargs):
        residual = self.fn(x, y, *args, **kwargs)
        return 0.5 * sum(jnp.sum(u**2) for u in jtu.tree_leaves(residual))


class _OptimistixRun(eqx.Module):
    """An optimistix entry point (`optx.minimise`, `root_find`, ...) as an inner solve
    `run(x, y0, args, kwargs) -> (y, aux)`; failures go to the `on_failure` policy."""

    entry: Callable = eqx.field(static=True)
    fn: Callable
    solver: Any
    default: type = eqx.field(static=True)
    options: dict | None
    max_steps: int = eqx.field(static=True)
    has_aux: bool = eqx.field(static=True)
    on_failure: str = eqx.field(static=True)

    def __call__(self, x, y, args, kwargs):
        if self.solver is None:
            tol = default_tolerance(jnp.result_type(*jtu.tree_leaves(y)))
            solver = self.default(rtol=tol, atol=tol)
        else:
            solver = self.solver
        sol = self.entry(
            _optx_fn(self.fn),
            solver,
            y,
            (x, args, kwargs),
            self.options,
            has_aux=self.has_aux,
            max_steps=self.max_steps,
            throw=False,
        )
        value = _checked(sol.value, sol.result, self.on_failure)
        return value, (sol.aux if self.has_aux else None)


class _OptaxRun(eqx.Module):
    """An optax transformation run for exactly `num_steps` steps."""

    fn: Callable
    optimizer: optax.GradientTransformation
    num_steps: int = eqx.field(static=True)
    has_aux: bool = eqx.field(static=True)

    def __call__(self, x, y, args, kwargs):
        def value(u):
            out = self.fn(x, u, *args, **kwargs)
            return out[0] if self.has_aux else out

        def body(_, carry):
            v, state = carry
            updates, state = self.optimizer.update(jax.grad(value)(v), state, v)
            return optax.apply_updates(v, updates), state

        init = (y, self.optimizer.init(y))
        y, _ = lax.fori_loop(0, self.num_steps, body, init)
        aux = self.fn(x, y, *args, **kwargs)[1] if self.has_aux else None
        return y, aux


class _ProximalRun(eqx.Module):
    """`proximal_gradient_solve` as an inner solve; not reaching `tol` is a failure."""

    smooth: Callable
    prox: Callable
    step: Any
    max_steps: int = eqx.field(static=True)
    tol: Any
    accelerate: bool = eqx.field(static=True)
    on_failure: str = eqx.field(static=True)

    def __call__(self, x, y, args, kwargs):
        y, stats = proximal_gradient_solve(
            self.smooth,
            self.prox,
            x,
            y,
            args,
            kwargs,
            self.step,
            self.max_steps,
            self.tol,
            self.accelerate,
        )
        result = optx.RESULTS.where(
            stats.converged, optx.RESULTS.successful, optx.RESULTS.max_steps_reached
        )
        return _checked(y, result, self.on_failure), None


def _checked(y, result, on_failure):
    """Apply the failure policy to an inner solve (primal pass)."""
    failed = result != optx.RESULTS.successful
    return apply_failure_policy(y, failed, on_failure, "the inner solve")
