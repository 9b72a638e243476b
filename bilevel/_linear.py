r"""Matrix-free linear algebra on pytrees for the implicit function theorem.

The adjoint system $\partial_y\Phi(x, y)^\top w = v$ as a lineax operator, the default
solver for it, and three lineax-compatible solvers that lineax does not ship: MINRES
for symmetric (possibly indefinite or singular) operators, and the truncated
Richardson / Neumann iterations.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
from jaxtyping import Array, PyTree, Scalar

from ._conditions import OptimalityCondition
from ._misc import (
    default_tolerance,
    structure_of,
    tree_axpy,
    tree_dot,
    tree_norm,
    tree_sub,
)


def condition_tags(condition: OptimalityCondition) -> frozenset:
    """Honest lineax tags of $\\partial_y\\Phi$ as declared by the condition."""
    tags = set()
    if condition.symmetric:
        tags.add(lx.symmetric_tag)
    if condition.positive_semidefinite:
        tags.add(lx.positive_semidefinite_tag)
    return frozenset(tags)


DEFAULT_MAX_STEPS = 1000
"""Iteration cap of the default adjoint solvers (reaching it is reported)."""

FALLBACK_TERMS = 20
"""Terms of the truncated Neumann series that replaces a singular MINRES solve."""


def default_linear_solver(
    symmetric: bool, dtype, rhs_scale: Any = None
) -> lx.AbstractLinearSolver:
    r"""The solver `solve_linear` uses when none is given.

    - A symmetric operator (the stationarity condition $\nabla_y g$, whether or not $g$
      is convex): [`bilevel.MINRES`][]. Unlike CG it needs no definiteness, so an
      indefinite Hessian (a neural-network lower level away from a minimum) is solved,
      not broken.
    - Otherwise (fixed-point and KKT conditions): GMRES with restart 20.

    Tolerances are relative: `rtol` is $10^{-10}$ in float64 and $10^{-5}$ in float32
    (`default_tolerance`); GMRES, whose test is elementwise, also gets `atol = rtol *
    rhs_scale` (the largest entry of the right-hand side), so a small right-hand side is
    solved to the same relative accuracy as a large one. At most `DEFAULT_MAX_STEPS`
    iterations.
    """
    tol = default_tolerance(dtype)
    if symmetric:
        return MINRES(rtol=tol, atol=0.0, max_steps=DEFAULT_MAX_STEPS)
    atol = tol if rhs_scale is None else tol * rhs_scale
    return lx.GMRES(rtol=tol, atol=atol, max_steps=DEFAULT_MAX_STEPS, restart=20)


def solve_linear(
    operator: lx.AbstractLinearOperator,
    rhs: PyTree[Array],
    linear_solver: lx.AbstractLinearSolver | None = None,
    options: dict[str, Any] | None = None,
) -> lx.Solution:
    r"""`lineax.linear_solve(..., throw=False)`, with the default rule when
    `linear_solver` is None:

    1. `default_linear_solver` (MINRES for a symmetric operator, GMRES otherwise);
    2. if MINRES finds the system singular and inconsistent (no solution exists, e.g. a
       minibatch Hessian with fewer samples than unknowns), its least-squares iterate
       can be arbitrarily large; it is replaced by the truncated Neumann series
       $\eta\sum_{k < K}(I - \eta A)^k b$, $K$ = `FALLBACK_TERMS`, $\eta =
       1/\|A\|$ (MINRES's estimate), a bounded, regularised estimate, and the status
       stays `RESULTS.singular` so the caller reports it.
    """
    options = {} if options is None else options
    if linear_solver is not None:
        return lx.linear_solve(
            operator, rhs, linear_solver, options=options, throw=False
        )
    solver = default_linear_solver(
        lx.is_symmetric(operator), result_dtype(rhs), _max_abs(rhs)
    )
    sol = lx.linear_solve(operator, rhs, solver, options=options, throw=False)
    if not isinstance(solver, MINRES):
        return sol
    norm = sol.stats["operator_norm"]
    eta = 1 / jnp.maximum(norm, jnp.finfo(norm.dtype).tiny)

    def neumann():
        series = Richardson(num_steps=FALLBACK_TERMS, omega=eta)
        return lx.linear_solve(operator, rhs, series, throw=False).value

    value = lax.cond(sol.result == lx.RESULTS.singular, neumann, lambda: sol.value)
    return eqx.tree_at(lambda s: s.value, sol, value)


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
    """$\\Phi(x, y)$ and $w \\mapsto \\partial_y\\Phi(x, y)^\\top w$ (one cached
    VJP)."""
    value, vjp_fn = jax.vjp(lambda v: condition(x, v, *args), y)
    return value, lx.FunctionLinearOperator(lambda w: vjp_fn(w)[0], structure_of(y))


def _with_ridge(matvec: Callable, ridge) -> Callable:
    if isinstance(ridge, int | float) and ridge == 0:
        return matvec
    return lambda v: tree_axpy(ridge, v, matvec(v))


def _linearise(condition: Callable, x: PyTree, y: PyTree, args: tuple):
    """$\\Phi(x, y)$ and $w \\mapsto (\\partial_x\\Phi^\\top w,
    \\partial_y\\Phi^\\top w)$ from one forward pass of the condition."""
    return jax.vjp(lambda x_, y_: condition(x_, y_, *args), x, y)


def _transpose_operator(condition, vjp, y, ridge) -> lx.FunctionLinearOperator:
    # Inside a compiled solver loop only the y-cotangent is used; the x-part of the VJP
    # is dead code and removed by the compiler.
    matvec = _with_ridge(lambda w: vjp(w)[1], ridge)
    return lx.FunctionLinearOperator(matvec, structure_of(y), condition_tags(condition))


def adjoint_operator(
    condition: OptimalityCondition,
    x: PyTree,
    y: PyTree,
    args: tuple,
    ridge: float | Scalar = 0.0,
) -> tuple[PyTree[Array], lx.FunctionLinearOperator]:
    r"""$\Phi(x, y, *\text{args})$ and the lineax operator $w \mapsto
    (\partial_y\Phi^\top + \rho I)\,w$, $\rho$ = `ridge`, tagged as the condition
    declares (symmetric, positive semidefinite). Products are VJPs of $\Phi$; its
    forward pass is done once."""
    phi, vjp = _linearise(condition, x, y, args)
    return phi, _transpose_operator(condition, vjp, y, ridge)


class AdjointSolution(eqx.Module):
    """What `adjoint_solve` returns (internal)."""

    phi: PyTree[Array]
    adjoint: PyTree[Array]
    solution: lx.Solution
    cross: PyTree[Array]
    residual: Scalar


def adjoint_solve(
    condition: OptimalityCondition,
    x: PyTree,
    y: PyTree,
    args: tuple,
    rhs: PyTree[Array],
    linear_solver: lx.AbstractLinearSolver | None = None,
    warm_start: PyTree[Array] | None = None,
    preconditioner: lx.AbstractLinearOperator | None = None,
    ridge: float | Scalar = 0.0,
) -> AdjointSolution:
    r"""Solve $(\partial_y\Phi^\top + \rho I)\,w = \text{rhs}$ and return, with $w$,
    $\Phi(x, y)$, the cross term $\partial_x\Phi^\top w$ and the residual norm
    $\|(\partial_y\Phi^\top + \rho I)w - \text{rhs}\|$.

    One forward pass of $\Phi$; the cross term and the residual come from one final VJP.
    Never raises on non-convergence: the lineax solution carries the status. The solver
    is chosen by `solve_linear` when `linear_solver` is None.
    """
    phi, vjp = _linearise(condition, x, y, args)
    operator = _transpose_operator(condition, vjp, y, ridge)
    options: dict[str, Any] = {}
    if warm_start is not None:
        options["y0"] = warm_start
    if preconditioner is not None:
        options["preconditioner"] = preconditioner
    sol = solve_linear(operator, rhs, linear_solver, options)
    cross, transposed = vjp(sol.value)
    applied = _with_ridge(lambda _: transposed, ridge)(sol.value)
    residual = tree_norm(tree_sub(applied, rhs))
    return AdjointSolution(phi, sol.value, sol, cross, residual)


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
    out = adjoint_solve(
        condition, x, y, args, rhs, linear_solver, warm_start, preconditioner
    )
    return out.phi, out.adjoint, out.solution, out.residual


def linear_failed(result: lx.RESULTS, value: PyTree[Array]) -> Array:
    """True when a linear solve did not succeed or returned non-finite values."""
    return (result != lx.RESULTS.successful) | ~_all_finite(value)


def _all_finite(tree: PyTree[Array]) -> Array:
    finite = jnp.array(True)
    for leaf in jtu.tree_leaves(tree):
        finite = finite & jnp.all(jnp.isfinite(leaf))
    return finite


def _max_abs(tree: PyTree[Array]) -> Scalar:
    leaves = [jnp.max(jnp.abs(u)) for u in jtu.tree_leaves(tree) if jnp.size(u) > 0]
    return jnp.max(jnp.stack(leaves)) if leaves else jnp.zeros(())


# --------------------------------------------------------------------------------------
# MINRES


class _MINRESCarry(eqx.Module):
    step: Array
    w: PyTree[Array]  # iterate
    r_prev: PyTree[Array]  # Lanczos residual vectors r_{k-1}, r_k (unpreconditioned)
    r: PyTree[Array]
    z: PyTree[Array]  # M r_k
    beta_prev: Scalar
    beta: Scalar
    cs: Scalar
    sn: Scalar
    dbar: Scalar
    eps: Scalar
    d_prev: PyTree[Array]  # search directions d_{k-2}, d_{k-1}
    d: PyTree[Array]
    phibar: Scalar  # residual norm of the current iterate
    anorm2: Scalar  # Frobenius-norm estimate of the tridiagonal matrix, squared
    gmax: Scalar
    gmin: Scalar
    stop: Array  # 0 running, 1 converged, 2 least squares, 3 ill-conditioned, 4 NaN


class MINRES(lx.AbstractLinearSolver):
    r"""MINRES (Paige and Saunders, 1975) for a symmetric operator $A$, definite or not.

    Each iteration extends a Lanczos basis with one product $Av$ and picks the iterate
    of the Krylov space $\mathcal{K}_k(A, b)$ with the smallest residual
    $\|b - Aw\|$ (in the preconditioner's norm when one is given), so the residual
    decreases monotonically and is known at every step without an extra product.
    Compared with CG it costs the same product per iteration and a few more vector
    operations, and it does not need $A \succeq 0$: an indefinite Hessian is solved,
    not broken.

    Stopping rules, checked before an update is applied (so a blow-up is never
    returned):

    - converged: $\|r\| \le \text{atol} + \text{rtol}\,\|b\|$ (`RESULTS.successful`);
    - least-squares solution: $\|Ar\| \le \text{rtol}\,\|A\|\,\|r\|$ with $r$ not small,
      i.e. $b$ has a component outside the range of a singular $A$; the current iterate
      minimises $\|b - Aw\|$ and is returned with `RESULTS.singular`;
    - ill-conditioned: the condition estimate of the Lanczos tridiagonal matrix exceeds
      $0.1/\epsilon$ (`RESULTS.singular`);
    - `max_steps` reached (`RESULTS.max_steps_reached`).

    These are the tests of Paige and Saunders (1975) and Choi, Paige and Saunders
    (2011, "MINRES-QLP", SIAM J. Sci. Comput.).

    **Arguments:**

    - `rtol`, `atol`: tolerances of the residual test above.
    - `max_steps`: iteration cap (default: ten times the number of unknowns).

    Options: `"y0"` (warm start), `"preconditioner"` (a symmetric positive definite
    operator $M \approx A^{-1}$, tagged `lineax.positive_semidefinite_tag`).
    Statistics: `num_steps`, `max_steps`, `residual_norm` (the residual of the returned
    iterate, as tracked by the recurrence), `operator_norm` (the Frobenius norm of the
    Lanczos tridiagonal matrix, an estimate of $\|A\|_2$).
    """

    rtol: float
    atol: float
    max_steps: int | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if isinstance(value, int | float) and not value >= 0:
                raise ValueError(f"MINRES: `{name}` must be >= 0, got {value!r}")
        if self.max_steps is not None and (
            not isinstance(self.max_steps, int) or self.max_steps < 1
        ):
            raise ValueError(
                "MINRES: `max_steps` must be an int >= 1 or None, got "
                f"{self.max_steps!r}"
            )

    def init(self, operator, options):
        if operator.in_structure() != operator.out_structure():
            raise ValueError("MINRES needs a square operator (same in/out structure)")
        if not lx.is_symmetric(operator):
            raise ValueError(
                "MINRES needs a symmetric operator: tag it `lineax.symmetric_tag` (or "
                "declare the optimality condition `symmetric=True`), or use "
                "lineax.GMRES"
            )
        return lx.linearise(operator)

    def compute(self, state, vector, options):
        operator = state
        precondition = _preconditioner(options)
        size = sum(jnp.size(u) for u in jtu.tree_leaves(vector))
        max_steps = 10 * size if self.max_steps is None else self.max_steps
        w0 = options.get("y0", jtu.tree_map(jnp.zeros_like, vector))
        dtype = result_dtype(vector)
        eps = jnp.finfo(dtype).eps
        b_norm = jnp.sqrt(jnp.abs(tree_dot(vector, precondition(vector))))
        threshold = self.atol + self.rtol * b_norm
        r0 = tree_sub(vector, operator.mv(w0))
        z0 = precondition(r0)
        beta1 = jnp.sqrt(jnp.abs(tree_dot(r0, z0)))
        zero = jnp.zeros((), dtype)
        zeros = jtu.tree_map(jnp.zeros_like, vector)
        init = _MINRESCarry(
            step=jnp.array(0),
            w=w0,
            r_prev=r0,
            r=r0,
            z=z0,
            beta_prev=zero,
            beta=beta1,
            cs=-jnp.ones((), dtype),
            sn=zero,
            dbar=zero,
            eps=zero,
            d_prev=zeros,
            d=zeros,
            phibar=beta1,
            anorm2=zero,
            gmax=zero,
            gmin=jnp.full((), jnp.inf, dtype),
            stop=jnp.where(beta1 <= threshold, 1, 0),
        )

        def cond(c):
            return (c.stop == 0) & (c.step < max_steps)

        def body(c):
            return _minres_step(operator, precondition, c, self.rtol, threshold, eps)

        out = lax.while_loop(cond, body, init)
        result = lx.RESULTS.where(
            out.stop == 1,
            lx.RESULTS.successful,
            lx.RESULTS.where(
                (out.stop == 2) | (out.stop == 3),
                lx.RESULTS.singular,
                lx.RESULTS.max_steps_reached,
            ),
        )
        finite = (out.stop != 4) & jnp.isfinite(b_norm)
        result = lx.RESULTS.where(finite, result, lx.RESULTS.nonfinite_input)
        stats = {
            "num_steps": out.step,
            "max_steps": max_steps,
            "residual_norm": out.phibar,
            "operator_norm": jnp.sqrt(out.anorm2),
        }
        return out.w, result, stats

    def transpose(self, state, options):
        return state.transpose(), _transpose_options(options)

    def conj(self, state, options):
        return lx.conj(state), options

    def assume_full_rank(self):
        return False


def _minres_step(operator, precondition, c: _MINRESCarry, rtol, threshold, eps):
    # One preconditioned Lanczos step: v_k = z_k / beta_k, then r_{k+1} and beta_{k+1}.
    safe_beta = jnp.where(c.beta > 0, c.beta, 1.0)
    v = jtu.tree_map(lambda u: u / safe_beta, c.z)
    av = operator.mv(v)
    ratio = jnp.where(
        c.step > 0, c.beta / jnp.where(c.beta_prev > 0, c.beta_prev, 1.0), 0
    )
    av = tree_axpy(-ratio, c.r_prev, av)
    alpha = tree_dot(v, av)
    r_next = tree_axpy(-alpha / safe_beta, c.r, av)
    z_next = precondition(r_next)
    beta_next = jnp.sqrt(jnp.abs(tree_dot(r_next, z_next)))
    anorm2 = c.anorm2 + alpha**2 + c.beta**2 + beta_next**2
    # Apply the previous Givens rotation to the new column of the tridiagonal matrix.
    delta = c.cs * c.dbar + c.sn * alpha
    gbar = c.sn * c.dbar - c.cs * alpha
    eps_next = c.sn * beta_next
    dbar = -c.cs * beta_next
    # ||A r|| of the current iterate, known before the new rotation is applied.
    ar_norm = c.phibar * jnp.sqrt(gbar**2 + dbar**2)
    gamma = jnp.maximum(jnp.sqrt(gbar**2 + beta_next**2), jnp.finfo(gbar.dtype).tiny)
    gmax, gmin = jnp.maximum(c.gmax, gamma), jnp.minimum(c.gmin, gamma)
    least_squares = (c.step > 0) & (ar_norm <= rtol * jnp.sqrt(anorm2) * c.phibar)
    ill_conditioned = gmax / gmin >= jnp.minimum(1e8, 0.1 / eps)
    cs, sn = gbar / gamma, beta_next / gamma
    tau, phibar = cs * c.phibar, sn * c.phibar
    d = jtu.tree_map(
        lambda vi, dp, dc: (vi - c.eps * dp - delta * dc) / gamma, v, c.d_prev, c.d
    )
    update = ~(least_squares | ill_conditioned)
    w = jtu.tree_map(lambda u, di: jnp.where(update, u + tau * di, u), c.w, d)
    converged = update & (phibar <= threshold)
    stop = jnp.where(
        least_squares, 2, jnp.where(ill_conditioned, 3, jnp.where(converged, 1, 0))
    )
    stop = jnp.where(beta_next == 0, jnp.maximum(stop, 1), stop)
    stop = jnp.where(jnp.isfinite(phibar), stop, 4)
    return _MINRESCarry(
        step=c.step + update.astype(c.step.dtype),
        w=w,
        r_prev=c.r,
        r=r_next,
        z=z_next,
        beta_prev=c.beta,
        beta=beta_next,
        cs=cs,
        sn=sn,
        dbar=dbar,
        eps=eps_next,
        d_prev=c.d,
        d=d,
        phibar=jnp.where(update, phibar, c.phibar),
        anorm2=anorm2,
        gmax=gmax,
        gmin=gmin,
        stop=stop,
    )


def _preconditioner(options) -> Callable:
    if "preconditioner" not in options:
        return lambda v: v
    preconditioner = options["preconditioner"]
    if not lx.is_positive_semidefinite(preconditioner):
        raise ValueError(
            "the preconditioner must be symmetric positive definite: tag it "
            "`lineax.positive_semidefinite_tag`"
        )
    return preconditioner.mv


def _transpose_options(options) -> dict:
    options = dict(options)
    options.pop("y0", None)
    if "preconditioner" in options:
        options["preconditioner"] = options["preconditioner"].transpose()
    return options


# --------------------------------------------------------------------------------------
# Richardson and Neumann


class Richardson(lx.AbstractLinearSolver):
    r"""Damped (preconditioned) Richardson iteration
    $w_{k+1} = w_k + \omega P(b - M w_k)$.

    With $M = I - J$ for a contraction $J$ and $\omega = 1$ this is the truncated
    Neumann series $\sum_{k=0}^{K-1} J^k b$ (see [`bilevel.Neumann`][]). Needs only
    matvecs of $M$; converges iff $\rho(I - \omega P M) < 1$ (Blondel et al., 2022,
    "Efficient and Modular Implicit Differentiation", NeurIPS, discuss the Neumann
    series for the IFT).

    **Arguments:**

    - `num_steps`: maximum number of iterations $K$.
    - `omega`: damping $\omega$.
    - `rtol`, `atol`: stop early once $\|b - Mw\|_\infty \le \text{atol} +
      \text{rtol}\,\|b\|_\infty$; with both zero, exactly `num_steps` iterations run.

    Options: `"y0"` (warm start), `"preconditioner"` (an operator $P \approx M^{-1}$).

    Status: hitting `num_steps` with a tolerance requested returns the truncated
    solution with `RESULTS.max_steps_reached`. Without a tolerance the truncation is the
    method, so the result is `successful` unless the iteration diverged (final residual
    larger than the initial one: `RESULTS.breakdown`, e.g. $\omega$ too large) or became
    non-finite (`RESULTS.nonfinite_input`).
    """

    num_steps: int = eqx.field(static=True)
    omega: float = 1.0
    rtol: float = 0.0
    atol: float = 0.0

    def __check_init__(self):
        if not isinstance(self.num_steps, int) or self.num_steps < 0:
            raise ValueError(
                f"Richardson: `num_steps` must be an int >= 0, got {self.num_steps}"
            )
        if self.rtol < 0 or self.atol < 0:
            raise ValueError("Richardson: `rtol` and `atol` must be >= 0")

    def init(self, operator, options):
        if operator.in_structure() != operator.out_structure():
            raise ValueError(
                "Richardson needs a square operator (same in/out structure)"
            )
        return operator

    def compute(self, state, vector, options):
        operator = state
        w0 = options.get("y0", jtu.tree_map(jnp.zeros_like, vector))
        precondition = (
            options["preconditioner"].mv if "preconditioner" in options else None
        )
        has_tol = self.rtol > 0 or self.atol > 0
        threshold = self.atol + self.rtol * _max_abs(vector)

        def residual(w):
            return tree_sub(vector, operator.mv(w))

        def body(carry):
            w, r, k = carry
            direction = precondition(r) if precondition else r
            w = tree_axpy(self.omega, direction, w)
            return w, residual(w), k + 1

        def cond(carry):
            _, r, k = carry
            return (k < self.num_steps) & (_max_abs(r) > threshold)

        r0 = residual(w0)
        init = (w0, r0, jnp.array(0))
        if has_tol:
            w, r, steps = lax.while_loop(cond, body, init)
            failed = _max_abs(r) > threshold
            result = lx.RESULTS.where(
                failed, lx.RESULTS.max_steps_reached, lx.RESULTS.successful
            )
        else:
            w, r, steps = lax.fori_loop(0, self.num_steps, lambda _, c: body(c), init)
            # Rounding slack: started at the solution, r0 and r are both ~eps * |b|.
            slack = 100 * jnp.finfo(result_dtype(vector)).eps * tree_norm(vector)
            diverged = tree_norm(r) > tree_norm(r0) + slack
            result = lx.RESULTS.where(
                diverged, lx.RESULTS.breakdown, lx.RESULTS.successful
            )
        result = lx.RESULTS.where(
            jnp.isfinite(tree_norm(r)), result, lx.RESULTS.nonfinite_input
        )
        stats = {
            "num_steps": steps,
            "max_steps": self.num_steps,
            "residual_norm": tree_norm(r),
        }
        return w, result, stats

    def transpose(self, state, options):
        return state.transpose(), _transpose_options(options)

    def conj(self, state, options):
        return lx.conj(state), options

    def assume_full_rank(self):
        return True


class Neumann(lx.AbstractLinearSolver):
    r"""Truncated Neumann series $(I - J)^{-1} b \approx \sum_{k=0}^{K-1} J^k b$ for the
    operator $I - J$, with $K$ = `num_terms` (a [`bilevel.Richardson`][] iteration with
    $\omega = 1$, no tolerance, started at zero).

    The sum up to $J^{K-1}$ equals what reverse mode through $K$ fixed-point iterations
    started at the solution computes. Meant for fixed-point conditions
    ($\partial_y\Phi = I - \partial_y T$); for a stationarity condition use
    `Richardson(num_steps, omega=eta)` with $\eta \le 1/L$. A diverging series
    ($\rho(J) \ge 1$) is reported (`RESULTS.breakdown`), never returned as converged.

    **Arguments:**

    - `num_terms`: the number of terms $K$.
    """

    num_terms: int = eqx.field(static=True)

    def __check_init__(self):
        if not isinstance(self.num_terms, int) or self.num_terms < 0:
            raise ValueError(
                f"Neumann: `num_terms` must be an int >= 0, got {self.num_terms!r}"
            )

    def _richardson(self) -> Richardson:
        return Richardson(num_steps=self.num_terms, omega=1.0)

    def init(self, operator, options):
        return self._richardson().init(operator, options)

    def compute(self, state, vector, options):
        return self._richardson().compute(state, vector, options)

    def transpose(self, state, options):
        return self._richardson().transpose(state, options)

    def conj(self, state, options):
        return self._richardson().conj(state, options)

    def assume_full_rank(self):
        return True
