r"""Implicit differentiation through the implicit function theorem.

For $\Phi(x, y^*(x)) = 0$ with $A = \partial_y\Phi$ invertible,
$\partial y^*(x)\,t = -A^{-1}\,\partial_x\Phi\, t$ (Blondel et al., 2022, "Efficient and
Modular Implicit Differentiation", NeurIPS). The rule is written once, as a JVP whose
linear solve is a `jax.lax.custom_linear_solve`; reverse mode follows by transposition,
so `jax.grad`, `jax.jvp`, `jax.jacfwd`, `jax.jacrev`, `jax.vmap` and `jax.jit` all work,
and a failed linear solve is handled the same way in both modes.
"""

import enum
import functools as ft
import warnings
from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.flatten_util
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
from jaxtyping import Array, Int, PyTree, Scalar

from ._conditions import OptimalityCondition, as_condition
from ._linear import adjoint_solve, condition_tags, linear_failed, solve_linear
from ._misc import default_tolerance, split_variable, structure_of, tree_norm, tree_sub
from ._problem import BilevelProblem, lift_problem


OnFailure = Literal["warn", "nan", "raise", "ignore"]
_ON_FAILURE = ("warn", "nan", "raise", "ignore")


def implicit_diff(
    optimality: Callable | OptimalityCondition,
    linear_solver: lx.AbstractLinearSolver | None = None,
    *,
    has_aux: bool = False,
    ridge: float = 0.0,
    on_failure: OnFailure = "warn",
) -> Callable[[Callable], Callable]:
    r"""Make an inner solver differentiable by the implicit function theorem.

    ```python
    @bl.implicit_diff(bl.stationarity_condition(g))
    def inner_solve(x, data, num_steps=100):
        ...  # any algorithm; it is never differentiated
        return y

    jax.grad(lambda x: f(x, inner_solve(x, data)))(x)
    ```

    **Arguments:**

    - `optimality`: $\Phi(x, y, *\text{args}, **\text{kwargs}) \to$ pytree like $y$,
      zero at the solution. A plain callable is treated as a general map (GMRES by
      default); an [`bilevel.OptimalityCondition`][] declares symmetry (MINRES by
      default; see [`bilevel.hypergradient`][] for the rule).
    - `linear_solver`: any lineax solver for $(\partial_y\Phi + \rho I)\,u =
      -\partial_x\Phi\, t$.
    - `has_aux`: the solver returns `(y, aux)`; `aux` is passed through with zero
      derivative (jaxopt's `has_aux`).
    - `ridge`: $\rho \ge 0$, a damping of the linear system for singular or nearly
      singular $\partial_y\Phi$ (jaxopt's `ridge`); it biases the derivative by
      $O(\rho/\lambda_{\min})$. Our fixed-point conditions are written $y - T$, so
      $\rho > 0$ moves the spectrum away from zero for them too.
    - `on_failure`: what a failed linear solve (tolerance not met, singular system,
      NaN) does, identically in forward and reverse mode: `"warn"` (default: return
      the truncated derivative and emit a `RuntimeWarning` at run time), `"nan"`
      (replace the derivative by NaN, so a training loop stops with status
      `nonfinite`), `"raise"` (a runtime error through `equinox.error_if`; see
      `EQX_ON_ERROR` in the FAQ), `"ignore"` (return the truncated derivative
      silently).

    The decorated function `inner_solve(x, *args, **kwargs)` is differentiable with
    respect to `x` and every floating array in `args` and `kwargs`; other values (Python
    ints such as a number of steps, strings, functions) are static. $x$ and $y$ may be
    equinox Modules such as `eqx.nn.MLP`: only their floating-point leaves are
    differentiated. Arrays closed over by `optimality` or by the solver (including the
    fields of an `OptimalityCondition` Module) are converted to explicit inputs
    (closure conversion), so a hyperparameter captured from an enclosing `jax.grad` gets
    its true derivative, not a silent zero. Derivatives never flow through the solver's
    starting point.

    !!! warning
        The derivative is exact only at a solution. Check $\|\Phi(x, y)\|$ (see
        [`bilevel.hypergradient`][], which reports it) when the inner solve may stop
        early.
    """
    condition = as_condition(optimality)
    if on_failure not in _ON_FAILURE:
        raise ValueError(
            f"implicit_diff: `on_failure` must be one of {list(_ON_FAILURE)}, got "
            f"{on_failure!r}"
        )
    if isinstance(ridge, int | float) and not ridge >= 0:
        raise ValueError(f"implicit_diff: `ridge` must be >= 0, got {ridge!r}")
    if not isinstance(has_aux, bool):
        raise TypeError(f"implicit_diff: `has_aux` must be a bool, got {has_aux!r}")

    def decorator(inner_solve: Callable) -> Callable:
        if not callable(inner_solve):
            raise TypeError("implicit_diff decorates a callable inner solver")

        @ft.wraps(inner_solve)
        def wrapped(x, *args, **kwargs):
            inputs = jtu.tree_map(_scalar_to_array, (x, args, kwargs))
            dynamic, static = eqx.partition(inputs, eqx.is_array)
            problem = _Wiring(inner_solve, condition, static, has_aux)
            out_struct = eqx.filter_eval_shape(problem.solve, dynamic)
            arrays_struct, out_static = eqx.partition(out_struct, _is_struct)
            y_arrays_struct = arrays_struct[0]
            y_params_struct = eqx.filter(y_arrays_struct, _is_floating_struct)
            y_rest_struct = eqx.filter(
                y_arrays_struct, _is_floating_struct, inverse=True
            )
            problem = _Wiring(inner_solve, condition, static, has_aux, out_static[0])
            _check_condition_output(problem, dynamic, y_params_struct, y_rest_struct)
            solve = eqx.filter_closure_convert(problem.solve_arrays, dynamic)
            cond = eqx.filter_closure_convert(
                problem.condition_on_params, dynamic, y_params_struct, y_rest_struct
            )
            config = _SolveConfig(linear_solver, ridge)
            y_arrays, aux_arrays = _implicit_solution(
                dynamic,
                solve,
                cond,
                config,
                tags=condition_tags(condition),
                on_failure=on_failure,
            )
            y = eqx.combine(y_arrays, out_static[0])
            if has_aux:
                return y, eqx.combine(aux_arrays, out_static[1])
            return y

        return wrapped

    return decorator


def _scalar_to_array(leaf):
    if isinstance(leaf, float | complex) or (
        isinstance(leaf, jax.Array) and getattr(leaf, "weak_type", False)
    ):
        return jnp.asarray(leaf, dtype=jnp.result_type(float))
    return leaf


def _is_struct(leaf) -> bool:
    return isinstance(leaf, jax.ShapeDtypeStruct)


def _is_floating_struct(leaf) -> bool:
    """A floating-point array or array structure (jax, NumPy or ShapeDtypeStruct)."""
    dtype = getattr(leaf, "dtype", None)
    return (
        dtype is not None
        and hasattr(leaf, "shape")
        and jnp.issubdtype(dtype, jnp.floating)
    )


class _Wiring(eqx.Module):
    """The user's solver and condition as functions of the dynamic inputs only."""

    inner_solve: Callable
    condition: OptimalityCondition
    static: Any
    has_aux: bool = eqx.field(static=True)
    y_static: Any = None

    def _inputs(self, dynamic):
        return eqx.combine(dynamic, self.static)

    def solve(self, dynamic):
        x, args, kwargs = self._inputs(dynamic)
        out = self.inner_solve(x, *args, **kwargs)
        if not self.has_aux:
            return out, None
        if not isinstance(out, tuple | list) or len(out) != 2:
            raise ValueError(
                "implicit_diff(has_aux=True): the solver must return a pair "
                f"(solution, aux), got {type(out).__name__}"
            )
        return tuple(out)

    def solve_arrays(self, dynamic):
        y, aux = self.solve(dynamic)
        return eqx.filter(y, eqx.is_array), eqx.filter(aux, eqx.is_array)

    def condition_on_params(self, dynamic, y_params, y_rest):
        x, args, kwargs = self._inputs(dynamic)
        y = eqx.combine(y_params, y_rest, self.y_static)
        out = self.condition(x, y, *args, **kwargs)
        return split_variable(out)[0]


def _check_condition_output(problem, dynamic, y_params_struct, y_rest_struct) -> None:
    try:
        out = eqx.filter_eval_shape(
            problem.condition_on_params, dynamic, y_params_struct, y_rest_struct
        )
    except Exception as err:
        hint = ""
        if not problem.has_aux and isinstance(problem.y_static, tuple):
            hint = (
                " If the solver returns (solution, aux), pass has_aux=True to "
                "bl.implicit_diff."
            )
        raise type(err)(f"{err}{hint}") from err
    same_tree = jtu.tree_structure(out) == jtu.tree_structure(y_params_struct)
    if not same_tree or any(
        (o.shape, o.dtype) != (s.shape, s.dtype)
        for o, s in zip(jtu.tree_leaves(out), jtu.tree_leaves(y_params_struct))
    ):
        raise ValueError(
            "implicit_diff: `optimality(x, y, *args)` must return a pytree with the "
            "same structure, shapes and dtypes as the floating-point part of the "
            f"solver's output y; got {out} for y {y_params_struct}"
        )


class _SolveConfig(eqx.Module):
    linear_solver: lx.AbstractLinearSolver | None
    ridge: Any


@eqx.filter_custom_jvp
def _implicit_solution(dynamic, solve, cond, config, *, tags, on_failure):
    return solve(dynamic)


@_implicit_solution.def_jvp
def _implicit_solution_jvp(primals, tangents, *, tags, on_failure):
    dynamic, solve, cond, config = primals
    t_dynamic, _, t_cond, _ = tangents  # the solver itself is never differentiated
    # Calling the custom_jvp function (not `solve`) keeps higher-order derivatives
    # implicit.
    y_arrays, aux_arrays = _implicit_solution(
        dynamic, solve, cond, config, tags=tags, on_failure=on_failure
    )
    y_params = eqx.filter(y_arrays, _is_floating_struct)
    y_rest = eqx.filter(y_arrays, _is_floating_struct, inverse=True)
    rhs = _jvp_of_tangent_leaves(
        lambda d, c: c(d, y_params, y_rest), (dynamic, cond), (t_dynamic, t_cond)
    )
    _, matvec = jax.linearize(lambda v: cond(dynamic, v, y_rest), y_params)
    # One flat vector: `custom_linear_solve` can only transpose a right-hand side whose
    # every leaf depends on the tangent, which a pytree with constant parts breaks.
    rhs_flat, unravel = jax.flatten_util.ravel_pytree(rhs)
    matvec_flat = _damped(
        lambda v: jax.flatten_util.ravel_pytree(matvec(unravel(v)))[0], config.ridge
    )
    linear_solve = ft.partial(
        _solve_tangent, tags=tags, solver=config.linear_solver, on_failure=on_failure
    )
    t_flat = lax.custom_linear_solve(
        matvec_flat,
        rhs_flat,
        linear_solve,
        linear_solve,
        symmetric=lx.symmetric_tag in tags,
    )
    t_params = unravel(t_flat)
    t_y = jtu.tree_map(jnp.negative, t_params)
    t_aux = jtu.tree_map(lambda _: None, aux_arrays)  # aux is not differentiated
    return (y_arrays, aux_arrays), (t_y, t_aux)


def _damped(matvec: Callable, ridge) -> Callable:
    if isinstance(ridge, int | float) and ridge == 0:
        return matvec
    return lambda v: jtu.tree_map(lambda a, u: a + ridge * u, matvec(v), v)


def _solve_tangent(matvec, rhs, *, tags, solver, on_failure):
    """Solve with `matvec` (or its transpose: `custom_linear_solve` passes either) and
    apply the failure policy, so both modes behave the same."""
    operator = lx.FunctionLinearOperator(matvec, structure_of(rhs), tags)
    sol = solve_linear(operator, rhs, solver)
    failed = linear_failed(sol.result, sol.value)
    return apply_failure_policy(sol.value, failed, on_failure, _LINEAR_SOLVE)


_LINEAR_SOLVE = "the linear solve of the implicit function theorem"


def apply_failure_policy(
    value: PyTree[Array], failed: Array, on_failure: OnFailure, what: str
) -> PyTree[Array]:
    """`value` after the `on_failure` policy of [`bilevel.implicit_diff`][] for a solve
    that `failed` (a traced bool; `what` names the solve in messages)."""
    if on_failure == "warn":
        jax.debug.callback(ft.partial(_warn_failure, what), failed)
    elif on_failure == "nan":
        value = jtu.tree_map(lambda u: jnp.where(failed, jnp.nan, u), value)
    elif on_failure == "raise":
        value = eqx.error_if(value, failed, _failure_message(what))
    return value


def _failure_message(what: str) -> str:
    return (
        f"bl.implicit_diff: {what} failed (did not reach its tolerance, singular "
        "system, or NaN/inf)."
    )


def _warn_failure(what: str, failed) -> None:
    if bool(jnp.any(failed)):
        warnings.warn(
            f"{_failure_message(what)} The result is the truncated solve. Pass a "
            "better solver, `ridge=`, or `on_failure='nan'`/'raise'/'ignore'.",
            RuntimeWarning,
            stacklevel=2,
        )


def _jvp_of_tangent_leaves(fn, primals: tuple, tangents: tuple):
    """JVP of `fn(*primals)` along the leaves that carry a tangent (`None` = zero).

    Primal leaves are selected by their tangent, not by their type: under reverse mode a
    differentiated scalar may arrive as a weakly typed Python-level float.
    """
    t_leaves, treedef = jtu.tree_flatten(tangents, is_leaf=lambda t: t is None)
    p_leaves = treedef.flatten_up_to(primals)
    active = [i for i, t in enumerate(t_leaves) if t is not None]

    def of_active(values):
        leaves = list(p_leaves)
        for i, value in zip(active, values):
            leaves[i] = value
        return fn(*treedef.unflatten(leaves))

    primal_values = [jnp.asarray(p_leaves[i]) for i in active]
    _, out = jax.jvp(of_active, (primal_values,), ([t_leaves[i] for i in active],))
    return out


# --------------------------------------------------------------------------------------
# bl.hypergradient


class HypergradientStatus(enum.IntFlag):
    """Bits of [`bilevel.HypergradientInfo`][]`.status` (0: everything held).

    - `lower_not_converged` (1): $\\|\\Phi(x, y)\\|$ > `lower_tol`: $y$ is not a
      solution, so the IFT describes another point and the hypergradient is biased.
    - `linear_not_converged` (2): the adjoint solve stopped before its tolerance
      (maximum number of steps, stagnation, a diverging Neumann series); the truncated
      adjoint was used.
    - `linear_singular` (4): $\\partial_y\\Phi$ is singular and the adjoint system has
      no solution (e.g. a minibatch Hessian with fewer samples than unknowns); a
      regularised estimate was used (see [`bilevel.hypergradient`][]).
    - `nonfinite` (8): NaN or inf in $\\Phi$, $f$, the adjoint or the hypergradient
      (e.g. NaN in the data).

    Decode a concrete value with `bl.HypergradientStatus(int(info.status))`.
    """

    ok = 0
    lower_not_converged = 1
    linear_not_converged = 2
    linear_singular = 4
    nonfinite = 8


class HypergradientInfo(eqx.Module):
    """Diagnostics of one [`bilevel.hypergradient`][] call.

    **Fields:**

    - `upper_loss`: $f(x, y)$ on the upper batch (computed with its gradient, so a
      caller need not evaluate it again).
    - `optimality_residual`: $\\|\\Phi(x, y)\\|$. The IFT is exact only where this is
      ~0; a large value means the lower level was not solved and the hypergradient is
      biased.
    - `linear_residual`: $\\|(\\partial_y\\Phi^\\top + \\rho I) w - \\nabla_y f\\|$ of
      the adjoint solve (from the same product as the cross term: no extra cost).
    - `linear_steps`: iterations the linear solver took (0 for a direct solver).
    - `linear_status`: lineax `RESULTS` of the adjoint solve (`successful`,
      `max_steps_reached`, `singular`, ...); a failed solve is returned, never raised.
    - `status`: an int32 of [`bilevel.HypergradientStatus`][] bits, 0 when the
      hypergradient can be trusted.
    - `adjoint`: the adjoint $w$ (pass it back as `warm_start`).
    """

    upper_loss: Scalar
    optimality_residual: Scalar
    linear_residual: Scalar
    linear_steps: Array
    linear_status: lx.RESULTS
    status: Int[Array, ""]
    adjoint: PyTree[Array]

    @property
    def linear_converged(self) -> Array:
        """True when the adjoint solve met its tolerance."""
        return self.linear_status == lx.RESULTS.successful


def hypergradient(
    problem: BilevelProblem,
    x: PyTree,
    y: PyTree,
    batch: Any = None,
    linear_solver: lx.AbstractLinearSolver | None = None,
    *,
    lower_batch: Any = None,
    warm_start: PyTree[Array] | None = None,
    preconditioner: lx.AbstractLinearOperator | None = None,
    ridge: float | Scalar = 0.0,
    lower_tol: float | None = None,
) -> tuple[PyTree[Array], HypergradientInfo]:
    r"""Hypergradient $\nabla F(x)$ of $F(x) = f(x, y^*(x))$ at $y \approx y^*(x)$ by
    the IFT, matrix-free:

    $\nabla F = \nabla_x f - \partial_x\Phi^\top w$, with $(\partial_y\Phi^\top + \rho
    I)\, w = \nabla_y f$.

    One value-and-gradient of $f$, one forward pass of $\Phi$, the products of the
    linear solver, and one final product that gives both the cross term
    $\partial_x\Phi^\top w$ and the linear residual. No Hessian is formed.

    **Default linear solver** (when `linear_solver` is None), a rule that holds whether
    or not the lower level is convex:

    - symmetric $\partial_y\Phi$ (the default condition $\nabla_y g$):
      [`bilevel.MINRES`][], which needs no definiteness (CG breaks on the indefinite
      Hessian of a neural network away from a minimum) and costs the same product per
      iteration as CG. If the system turns out singular and inconsistent (e.g. the
      Hessian of a minibatch with fewer samples than unknowns), MINRES's least-squares
      iterate can be huge; it is replaced by the bounded truncated Neumann series
      $\eta\sum_{k<20}(I - \eta A)^k\nabla_y f$, $\eta = 1/\|A\|$, and `status` has
      `linear_singular`;
    - otherwise (projected/proximal fixed points, KKT): GMRES (restart 20).

    Both use a relative tolerance ($10^{-10}$ in float64, $10^{-5}$ in float32) and at
    most 1000 iterations. For stochastic problems a truncated solver
    ([`bilevel.Neumann`][], [`bilevel.Richardson`][]) is usually the better choice.

    **Arguments:**

    - `problem`: a [`bilevel.BilevelProblem`][] without lower-level constraints (unless
      its `optimality` describes them, e.g. [`bilevel.kkt_condition`][]).
    - `x`, `y`: the upper variable and the lower iterate; any pytrees, including equinox
      Modules such as `eqx.nn.MLP` (only floating-point leaves are differentiated).
    - `batch`: passed to `upper`, and to `lower`/`optimality` unless `lower_batch` is
      set.
    - `linear_solver`: a lineax solver for the adjoint system.
    - `warm_start`: initial guess for the adjoint $w$ (e.g. the previous
      `info.adjoint`).
    - `preconditioner`: a lineax operator approximating $(\partial_y\Phi^\top)^{-1}$.
    - `ridge`: $\rho \ge 0$, damping of a singular or nearly singular system (bias
      $O(\rho/\lambda_{\min})$).
    - `lower_tol`: threshold on $\|\Phi(x, y)\|$ above which `status` flags an
      unconverged lower level (default $10^{-6}$ in float64, $10^{-3}$ in float32; set
      it to your inner solver's tolerance).

    **Returns:** `(grad_x, info)`. `grad_x` has the structure of `x`, with `None` for
    non-floating leaves (as `equinox.filter_grad`); `info` is a
    [`bilevel.HypergradientInfo`][] (upper loss, residuals, linear-solve status,
    `status` bits, adjoint).
    """
    _check_problem(problem)
    lower_batch = batch if lower_batch is None else lower_batch
    x, x_frozen = split_variable(x)
    y, y_frozen = split_variable(y)
    if not (x_frozen.is_empty and y_frozen.is_empty):
        problem = lift_problem(problem, x_frozen, y_frozen)
    upper_loss, (grad_x_f, grad_y_f) = jax.value_and_grad(
        problem.upper, argnums=(0, 1)
    )(x, y, batch)
    out = adjoint_solve(
        problem.condition,
        x,
        y,
        (lower_batch,),
        grad_y_f,
        linear_solver,
        warm_start,
        preconditioner,
        ridge,
    )
    grad = tree_sub(grad_x_f, out.cross)
    optimality_residual = tree_norm(out.phi)
    dtype = jnp.result_type(*jtu.tree_leaves(y))
    tol = default_tolerance(dtype, 1e-6, 1e-3) if lower_tol is None else lower_tol
    finite = jnp.isfinite(upper_loss) & jnp.isfinite(optimality_residual)
    finite = (
        finite & jnp.isfinite(tree_norm(grad)) & jnp.isfinite(tree_norm(out.adjoint))
    )
    info = HypergradientInfo(
        upper_loss=upper_loss,
        optimality_residual=optimality_residual,
        linear_residual=out.residual,
        linear_steps=jnp.asarray(out.solution.stats.get("num_steps", 0)),
        linear_status=out.solution.result,
        status=_status(optimality_residual > tol, out.solution.result, finite),
        adjoint=out.adjoint,
    )
    return grad, info


def _status(lower_unconverged, result: lx.RESULTS, finite) -> Int[Array, ""]:
    flags = HypergradientStatus
    singular = result == lx.RESULTS.singular
    nonfinite = ~finite | (result == lx.RESULTS.nonfinite_input)
    linear = (result != lx.RESULTS.successful) & ~singular & ~nonfinite
    bits = (
        jnp.where(lower_unconverged, int(flags.lower_not_converged), 0)
        | jnp.where(linear, int(flags.linear_not_converged), 0)
        | jnp.where(singular, int(flags.linear_singular), 0)
        | jnp.where(nonfinite, int(flags.nonfinite), 0)
    )
    return bits.astype(jnp.int32)


def _check_problem(problem: Any) -> None:
    if not isinstance(problem, BilevelProblem):
        raise TypeError(
            "bl.hypergradient needs a bl.BilevelProblem, got "
            f"{type(problem).__name__} (multi-block problems: use a solver such as "
            "bl.solvers.BSVRB)"
        )
    constrained = (
        problem.lower_constraints is not None or problem.project_feasible is not None
    )
    if constrained and problem.optimality is None:
        raise ValueError(
            "bl.hypergradient: the problem has `lower_constraints`/`project_feasible`, "
            "which the default condition grad_y g = 0 ignores; pass an `optimality` "
            "that describes the constrained solution (e.g. bl.kkt_condition) or use a "
            "constrained solver (bl.solvers.LVHBA, the penalty family)"
        )
