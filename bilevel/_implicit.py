r"""Implicit differentiation through the implicit function theorem.

For $\Phi(x, y^*(x)) = 0$ with $A = \partial_y\Phi$ invertible,
$\partial y^*(x)\,t = -A^{-1}\,\partial_x\Phi\, t$ (Blondel et al., 2022, "Efficient and
Modular Implicit Differentiation", NeurIPS). The rule is written once, as a JVP over a
lineax solve; reverse mode follows by transposition, so `jax.grad`, `jax.jvp`,
`jax.jacfwd`, `jax.jacrev`, `jax.vmap` and `jax.jit` all work.
"""

import functools as ft
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
from jaxtyping import Array, PyTree, Scalar

from ._conditions import OptimalityCondition, as_condition
from ._linear import (
    condition_tags,
    default_linear_solver,
    jacobian_operator,
    result_dtype,
    solve_adjoint,
)
from ._misc import tree_norm, tree_sub
from ._problem import BilevelProblem


def implicit_diff(
    optimality: Callable | OptimalityCondition,
    linear_solver: lx.AbstractLinearSolver | None = None,
) -> Callable[[Callable], Callable]:
    r"""Make an inner solver differentiable by the implicit function theorem.

    ```python
    @bl.implicit_diff(bl.stationarity_condition(g))
    def inner_solve(x, data):
        ...  # any algorithm; it is never differentiated
        return y

    jax.grad(lambda x: f(x, inner_solve(x, data)))(x)
    ```

    **Arguments:**

    - `optimality`: $\Phi(x, y, *args) \to$ pytree like $y$, zero at the solution. A
      plain callable is treated as a general map (GMRES by default); an
      [`bilevel.OptimalityCondition`][] declares symmetry (CG by default).
    - `linear_solver`: any lineax solver for $\partial_y\Phi\, u = -\partial_x\Phi\, t$.

    The decorated function `inner_solve(x, *args)` is differentiable with respect to `x`
    and every floating array in `args`. Arrays closed over by `optimality` or by the
    solver are converted to explicit inputs (closure conversion), so a hyperparameter
    captured from an enclosing `jax.grad` gets its true derivative, not a silent zero.

    !!! warning
        The derivative is exact only at a solution. Check $\|\Phi(x, y)\|$ (see
        [`bilevel.hypergradient`][], which reports it) when the inner solve may stop early.
    """
    condition = as_condition(optimality)

    def decorator(inner_solve: Callable) -> Callable:
        @ft.wraps(inner_solve)
        def wrapped(x, *args):
            # Python scalars become arrays so that the closure-converted functions see the
            # same (strongly typed) inputs at trace time and inside the JVP rule.
            x, args = jtu.tree_map(_scalar_to_array, (x, args))
            solve = eqx.filter_closure_convert(inner_solve, x, *args)
            y_struct = jax.eval_shape(solve, x, *args)
            _check_condition_output(condition, x, y_struct, args)
            cond = eqx.filter_closure_convert(condition, x, y_struct, *args)
            return _implicit_solution(
                x, args, solve, cond, linear_solver=linear_solver, condition=condition
            )

        return wrapped

    return decorator


def _scalar_to_array(leaf):
    if isinstance(leaf, float | complex) or (
        isinstance(leaf, jax.Array) and getattr(leaf, "weak_type", False)
    ):
        return jnp.asarray(leaf, dtype=jnp.result_type(float))
    return leaf


def _check_condition_output(condition, x, y_struct, args) -> None:
    out = jax.eval_shape(condition, x, y_struct, *args)
    same_tree = jtu.tree_structure(out) == jtu.tree_structure(y_struct)
    if not same_tree or any(
        (o.shape, o.dtype) != (s.shape, s.dtype)
        for o, s in zip(jtu.tree_leaves(out), jtu.tree_leaves(y_struct))
    ):
        raise ValueError(
            "implicit_diff: `optimality(x, y, *args)` must return a pytree with the "
            f"same structure, shapes and dtypes as the solver's output y; got {out} for "
            f"y {y_struct}"
        )


@eqx.filter_custom_jvp
def _implicit_solution(x, args, solve, cond, *, linear_solver, condition):
    return solve(x, *args)


@_implicit_solution.def_jvp
def _implicit_solution_jvp(primals, tangents, *, linear_solver, condition):
    x, args, solve, cond = primals
    t_x, t_args, _, t_cond = tangents  # the solver's own inputs are never differentiated
    # Calling the custom_jvp function (not `solve`) keeps higher-order derivatives implicit.
    y = _implicit_solution(
        x, args, solve, cond, linear_solver=linear_solver, condition=condition
    )

    rhs = _jvp_of_tangent_leaves(
        lambda x_, args_, cond_: cond_(x_, y, *args_), (x, args, cond), (t_x, t_args, t_cond)
    )
    _, operator = jacobian_operator(cond, x, y, args, condition_tags(condition))
    solver = linear_solver or default_linear_solver(condition, result_dtype(y))
    t_y = lx.linear_solve(operator, rhs, solver, throw=False).value
    return y, jtu.tree_map(jnp.negative, t_y)


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


class HypergradientInfo(eqx.Module):
    """Diagnostics of one [`bilevel.hypergradient`][] call.

    **Fields:**

    - `optimality_residual`: $\\|\\Phi(x, y)\\|$. The IFT is exact only where this is ~0;
      a large value means the lower level was not solved and the hypergradient is biased.
    - `linear_residual`: $\\|A^\\top w - \\nabla_y f\\|$ of the adjoint solve.
    - `linear_steps`: iterations the linear solver took (0 for a direct solver).
    - `linear_status`: lineax `RESULTS` of the adjoint solve (`successful`,
      `max_steps_reached`, ...); a truncated solve is returned, never raised.
    - `adjoint`: the adjoint $w$ (pass it back as `warm_start`).

    Also readable as a mapping: `info["linear_residual"]`.
    """

    optimality_residual: Scalar
    linear_residual: Scalar
    linear_steps: Array
    linear_status: lx.RESULTS
    adjoint: PyTree[Array]

    def __getitem__(self, name: str):
        return getattr(self, name)

    @property
    def linear_converged(self) -> Array:
        """True when the adjoint solve met its tolerance."""
        return self.linear_status == lx.RESULTS.successful


def hypergradient(
    problem: BilevelProblem,
    x: PyTree[Array],
    y: PyTree[Array],
    batch: Any = None,
    linear_solver: lx.AbstractLinearSolver | None = None,
    *,
    lower_batch: Any = None,
    warm_start: PyTree[Array] | None = None,
    preconditioner: lx.AbstractLinearOperator | None = None,
) -> tuple[PyTree[Array], HypergradientInfo]:
    r"""Hypergradient $\nabla F(x)$ of $F(x) = f(x, y^*(x))$ at $y \approx y^*(x)$ by
    the IFT, matrix-free:

    $\nabla F = \nabla_x f - \partial_x\Phi^\top w$, with $\partial_y\Phi^\top w =
    \nabla_y f$.

    One linear solve (CG for a symmetric positive semidefinite $\partial_y\Phi$, GMRES
    otherwise, unless `linear_solver` is given), one VJP; no Hessian is formed.

    **Arguments:**

    - `problem`: a [`bilevel.BilevelProblem`][].
    - `x`, `y`: the upper variable and the lower iterate.
    - `batch`: passed to `upper`, and to `lower`/`optimality` unless `lower_batch` is set.
    - `linear_solver`: a lineax solver for the adjoint system.
    - `warm_start`: initial guess for the adjoint $w$ (e.g. the previous step's).
    - `preconditioner`: a lineax operator approximating $(\partial_y\Phi^\top)^{-1}$.

    **Returns:** `(grad_x, info)`, with `info` a [`bilevel.HypergradientInfo`][]
    (optimality residual, linear residual, iterations, status).
    """
    lower_batch = batch if lower_batch is None else lower_batch
    condition = problem.condition
    grad_x_f, grad_y_f = jax.grad(problem.upper, argnums=(0, 1))(x, y, batch)
    phi, adjoint, sol, linear_residual = solve_adjoint(
        condition, x, y, (lower_batch,), grad_y_f, linear_solver, warm_start, preconditioner
    )
    _, phi_vjp_x = jax.vjp(lambda x_: condition(x_, y, lower_batch), x)
    (cross,) = phi_vjp_x(adjoint)
    info = HypergradientInfo(
        optimality_residual=tree_norm(phi),
        linear_residual=linear_residual,
        linear_steps=jnp.asarray(sol.stats.get("num_steps", 0)),
        linear_status=sol.result,
        adjoint=adjoint,
    )
    return tree_sub(grad_x_f, cross), info
