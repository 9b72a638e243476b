r"""Matrix-free linear algebra on pytrees: the IFT operator $\partial_y\Phi$ as a lineax
operator, default solver choice, and a truncated Neumann/Richardson solver (neither
lineax nor jaxopt ships one)."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
from jaxtyping import Array, PyTree

from ._conditions import OptimalityCondition
from ._misc import structure_of, tree_axpy, tree_norm, tree_sub


def condition_tags(condition: OptimalityCondition) -> frozenset:
    """Honest lineax tags of $\\partial_y\\Phi$ as declared by the condition."""
    tags = set()
    if condition.symmetric:
        tags.add(lx.symmetric_tag)
    if condition.positive_semidefinite:
        tags.add(lx.positive_semidefinite_tag)
    return frozenset(tags)


def default_linear_solver(condition: OptimalityCondition, dtype) -> lx.AbstractLinearSolver:
    """CG for a symmetric positive semidefinite $\\partial_y\\Phi$, GMRES otherwise.

    Tolerances follow the floating type: `rtol = atol = 1e-10` in float64 and `1e-5` in
    float32; at most 1000 iterations (hitting it is reported, not raised).
    """
    tol = 1e-10 if jnp.finfo(dtype).bits >= 64 else 1e-5
    if condition.symmetric and condition.positive_semidefinite:
        return lx.CG(rtol=tol, atol=tol, max_steps=1000)
    return lx.GMRES(rtol=tol, atol=tol, max_steps=1000, restart=20)


def result_dtype(tree: PyTree[Array]):
    """Common floating dtype of the leaves of `tree`."""
    return jnp.result_type(*jtu.tree_leaves(tree))


def jacobian_operator(
    condition: Callable, x: PyTree, y: PyTree, args: tuple, tags: frozenset
) -> tuple[PyTree[Array], lx.FunctionLinearOperator]:
    """$\\Phi(x, y)$ and the linearised operator $v \\mapsto \\partial_y\\Phi(x, y)\\,v$
    (forward mode; the primal work is done once and cached)."""
    value, jvp_fn = jax.linearize(lambda v: condition(x, v, *args), y)
    return value, lx.FunctionLinearOperator(jvp_fn, structure_of(y), tags)


def jacobian_transpose_operator(
    condition: Callable, x: PyTree, y: PyTree, args: tuple
) -> tuple[PyTree[Array], lx.FunctionLinearOperator]:
    """$\\Phi(x, y)$ and $w \\mapsto \\partial_y\\Phi(x, y)^\\top w$ (one cached VJP)."""
    value, vjp_fn = jax.vjp(lambda v: condition(x, v, *args), y)
    return value, lx.FunctionLinearOperator(lambda w: vjp_fn(w)[0], structure_of(y))


def solve_adjoint(
    condition: OptimalityCondition,
    x: PyTree,
    y: PyTree,
    args: tuple,
    rhs: PyTree[Array],
    linear_solver: lx.AbstractLinearSolver | None,
    warm_start: PyTree[Array] | None = None,
    preconditioner: lx.AbstractLinearOperator | None = None,
) -> tuple[PyTree[Array], PyTree[Array], lx.Solution, Array]:
    r"""Solve $\partial_y\Phi(x, y)^\top w = \text{rhs}$ matrix-free.

    Returns $\Phi(x, y)$, $w$, the lineax solution (status and step count) and the
    residual norm $\|\partial_y\Phi^\top w - \text{rhs}\|$. Never raises on
    non-convergence: the caller reports it.
    """
    if condition.symmetric:
        value, operator = jacobian_operator(condition, x, y, args, condition_tags(condition))
    else:
        value, operator = jacobian_transpose_operator(condition, x, y, args)
    solver = linear_solver or default_linear_solver(condition, result_dtype(y))
    options: dict[str, Any] = {}
    if warm_start is not None:
        options["y0"] = warm_start
    if preconditioner is not None:
        options["preconditioner"] = preconditioner
    sol = lx.linear_solve(operator, rhs, solver, options=options, throw=False)
    residual = tree_norm(tree_sub(operator.mv(sol.value), rhs))
    return value, sol.value, sol, residual


class Richardson(lx.AbstractLinearSolver):
    r"""Damped (preconditioned) Richardson iteration $w_{k+1} = w_k + \omega P(b - M w_k)$.

    With $M = I - J$ for a contraction $J$ and $\omega = 1$ this is the truncated Neumann
    series $\sum_{k=0}^{K} J^k b$ (Blondel et al. 2022, §1.4.4 of our spec). Needs only
    matvecs of $M$; converges iff $\rho(I - \omega P M) < 1$.

    **Arguments:**

    - `num_steps`: maximum number of iterations $K$.
    - `omega`: damping $\omega$.
    - `rtol`, `atol`: stop early once $\|b - Mw\|_\infty \le \text{atol} +
      \text{rtol}\,\|b\|_\infty$; with both zero, exactly `num_steps` iterations run.

    Options: `"y0"` (warm start), `"preconditioner"` (an operator $P \approx M^{-1}$).
    Hitting `num_steps` with a tolerance requested returns the truncated solution with
    `RESULTS.max_steps_reached`.
    """

    num_steps: int = eqx.field(static=True)
    omega: float = 1.0
    rtol: float = 0.0
    atol: float = 0.0

    def __check_init__(self):
        if not isinstance(self.num_steps, int) or self.num_steps < 0:
            raise ValueError(f"Richardson: `num_steps` must be an int >= 0, got {self.num_steps}")
        if self.rtol < 0 or self.atol < 0:
            raise ValueError("Richardson: `rtol` and `atol` must be >= 0")

    def init(self, operator, options):
        if operator.in_structure() != operator.out_structure():
            raise ValueError("Richardson needs a square operator (same in/out structure)")
        return operator

    def compute(self, state, vector, options):
        operator = state
        w0 = options.get("y0", jtu.tree_map(jnp.zeros_like, vector))
        precondition = options["preconditioner"].mv if "preconditioner" in options else None
        has_tol = self.rtol > 0 or self.atol > 0
        threshold = self.atol + self.rtol * _max_norm(vector)

        def residual(w):
            return tree_sub(vector, operator.mv(w))

        def body(carry):
            w, r, k = carry
            direction = precondition(r) if precondition else r
            w = tree_axpy(self.omega, direction, w)
            return w, residual(w), k + 1

        def cond(carry):
            _, r, k = carry
            return (k < self.num_steps) & (_max_norm(r) > threshold)

        init = (w0, residual(w0), jnp.array(0))
        if has_tol:
            w, r, steps = lax.while_loop(cond, body, init)
            failed = _max_norm(r) > threshold
        else:
            w, r, steps = lax.fori_loop(0, self.num_steps, lambda _, c: body(c), init)
            failed = jnp.array(False)
        result = lx.RESULTS.where(failed, lx.RESULTS.max_steps_reached, lx.RESULTS.successful)
        return w, result, {"num_steps": steps, "max_steps": self.num_steps}

    def transpose(self, state, options):
        options = dict(options)
        options.pop("y0", None)
        if "preconditioner" in options:
            options["preconditioner"] = options["preconditioner"].transpose()
        return state.transpose(), options

    def conj(self, state, options):
        return lx.conj(state), options

    def assume_full_rank(self):
        return True


def Neumann(num_terms: int) -> Richardson:
    r"""Truncated Neumann series $(I - J)^{-1} b \approx \sum_{k=0}^{K-1} J^k b$ for the
    operator $I - J$, with $K$ = `num_terms`: Richardson with $\omega = 1$, no tolerance,
    started at zero. The sum up to $J^{K-1}$ equals what reverse mode through $K$
    fixed-point iterations started at the solution computes. Meant for fixed-point
    conditions ($\partial_y\Phi = I - \partial_y T$); for a stationarity condition use
    `Richardson(num_steps, omega=eta)` with $\eta \le 1/L$."""
    return Richardson(num_steps=num_terms, omega=1.0)


def _max_norm(tree: PyTree[Array]) -> Array:
    leaves = [jnp.max(jnp.abs(u)) for u in jtu.tree_leaves(tree) if jnp.size(u) > 0]
    return jnp.max(jnp.stack(leaves)) if leaves else jnp.zeros(())
