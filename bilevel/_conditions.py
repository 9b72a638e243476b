r"""Optimality conditions $\Phi(x, y) = 0$ characterising the lower-level solution.

Implicit differentiation needs a map $\Phi$ whose zero is $y^*(x)$; the IFT then gives
$\partial y^* = -(\partial_y \Phi)^{-1} \partial_x \Phi$ (Blondel et al., 2022,
"Efficient and Modular Implicit Differentiation", NeurIPS). Fixed-point maps $T$ are
written in the "positive" root form $\Phi = y - T(x, y)$ so that $\partial_y\Phi =
I - \partial_y T$, whose spectrum lies in the right half-plane when $T$ is a
contraction.
"""

import inspect
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from ._misc import default_tolerance, merge_variable, split_variable, tree_sub
from ._projection import project_at


class OptimalityCondition(eqx.Module):
    r"""A map $\Phi(x, y, *args)$, zero at the lower-level solution, with the structure
    of its Jacobian $\partial_y\Phi$ declared so a suitable linear solver can be chosen.

    **Fields:**

    - `fn`: `fn(x, y, *args) -> pytree like y`.
    - `symmetric`: whether $\partial_y\Phi$ is symmetric (true for a gradient map).
    - `positive_semidefinite`: whether $\partial_y\Phi \succeq 0$ (a gradient map of a
      lower objective convex in $y$). With both tags the default solver is CG.
    """

    fn: Callable[..., PyTree[Array]]
    symmetric: bool = eqx.field(static=True, default=False)
    positive_semidefinite: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        if not callable(self.fn):
            raise TypeError(
                f"OptimalityCondition: `fn` must be callable, got {self.fn!r}"
            )
        if self.positive_semidefinite and not self.symmetric:
            raise ValueError(
                "OptimalityCondition: `positive_semidefinite=True` needs "
                "`symmetric=True`"
            )

    def __call__(
        self, x: PyTree, y: PyTree, *args: Any, **kwargs: Any
    ) -> PyTree[Array]:
        return self.fn(x, y, *args, **kwargs)


def as_condition(optimality: Callable | OptimalityCondition) -> OptimalityCondition:
    """Wrap a plain callable as an untagged (general, non-symmetric) condition."""
    if isinstance(optimality, OptimalityCondition):
        return optimality
    if not callable(optimality):
        raise TypeError(
            f"`optimality` must be callable, got {type(optimality).__name__}"
        )
    return OptimalityCondition(optimality)


def stationarity_condition(lower: Callable[..., Array]) -> OptimalityCondition:
    r"""$\Phi(x, y) = \nabla_y g(x, y)$ for an unconstrained smooth lower level.

    $\partial_y\Phi = \nabla^2_{yy} g$ is symmetric, and positive semidefinite at a
    minimiser of a convex $g$; it is tagged so. The default adjoint solver (MINRES)
    needs only the symmetry, so the same condition serves a non-convex lower level (a
    neural network) whose Hessian is indefinite. When $y$ is an equinox Module (e.g.
    `eqx.nn.MLP`) the gradient is taken with respect to its floating-point leaves only,
    shaped like `equinox.filter_grad`'s output.
    """
    return OptimalityCondition(
        _Stationarity(lower), symmetric=True, positive_semidefinite=True
    )


def is_stationarity_of(optimality: Callable, lower: Callable) -> bool:
    """Whether `optimality` is $\\nabla_y g$ for this `lower` (whatever its tags)."""
    fn = optimality.fn if isinstance(optimality, OptimalityCondition) else optimality
    return isinstance(fn, _Stationarity) and fn.lower is lower


def projected_gradient_condition(
    lower: Callable[..., Array], project_y: Callable, step: float = 1.0
) -> OptimalityCondition:
    r"""$\Phi(x, y) = y - P_{Y(x)}(y - \eta \nabla_y g(x, y))$ for
    $\min_{y \in Y(x)} g$.

    `project_y` is a Euclidean projection of $y$: any `optax.projections` function
    (`projection_non_negative`, `projection_simplex`, `functools.partial(
    projection_box, lower=0.0, upper=1.0)`, ...) or your own; or a set that depends
    on $x$, declared with [`bilevel.projection`][] (then derivatives also flow through
    the set's parameters).

    The fixed points do not depend on $\eta > 0$; $\eta$ only affects the conditioning
    of $\partial_y\Phi$ (use $\eta \le 1/L$). The Jacobian is not symmetric in general:
    GMRES by default.
    """
    return OptimalityCondition(_ProjectedGradient(lower, project_y, step))


def proximal_gradient_condition(
    smooth: Callable[..., Array], prox: Callable, step: float = 1.0
) -> OptimalityCondition:
    r"""$\Phi(x, y) = y - \mathrm{prox}_{\eta r(x, \cdot)}(y - \eta\nabla_y s(x, y))$
    for $\min_y s(x, y) + r(x, y)$.

    `prox(x, v, step)` returns
    $\arg\min_u \frac12\|u - v\|^2 + \text{step}\cdot r(x, u)$; it may depend on $x$
    (e.g. an $\ell_1$ weight), and derivatives flow through it. `bl.prox` has the
    common ones in this signature.

    !!! warning "jaxopt's proxes take their arguments in another order"
        jaxopt's `prox(v, hyperparams, scaling)` would silently compute something else
        here; such functions are detected (a jaxopt module, or a last parameter named
        `scaling`) and rejected. Wrap them with `bl.prox.from_jaxopt`.
    """
    _reject_jaxopt_prox(prox)
    return OptimalityCondition(_ProximalGradient(smooth, prox, step))


def kkt_condition(
    lower: Callable[..., Array],
    constraints: Callable[..., Array] | None = None,
    equalities: Callable[..., Array] | None = None,
) -> OptimalityCondition:
    r"""KKT conditions of $\min_y g(x, y)$ s.t. $h(x, y) \le 0$, $e(x, y) = 0$:

    $\Phi(x, (y, \lambda, \nu)) = (\nabla_y g + \partial_y h^\top \lambda +
    \partial_y e^\top \nu,\; \lambda \odot h,\; e)$.

    **Arguments:**

    - `lower`: $g(x, y, *\text{args})$.
    - `constraints`: $h(x, y) \to$ 1-D array, feasible where $\le 0$ (optional).
    - `equalities`: $e(x, y) \to$ 1-D array, feasible where $= 0$ (optional).

    Constraint functions that accept more than two positional arguments receive the same
    data arguments as `lower`: $h(x, y, *\text{args})$.

    The unknown passed to and returned by the differentiated solver is the tuple
    `(y, inequality_multipliers, equality_multipliers)`, keeping only the parts that
    exist: `(y, lam)` with inequalities only (as before), `(y, nu)` with equalities
    only. [`bilevel.kkt_multipliers`][] computes the multipliers from a primal solution
    when the inner solver does not return them.

    Dual feasibility is dropped (it holds locally). The Jacobian is invertible under
    LICQ, strict complementarity and second-order sufficiency; it is not symmetric
    (GMRES by default).
    """
    if constraints is None and equalities is None:
        raise ValueError("kkt_condition: give `constraints`, `equalities` or both")
    return OptimalityCondition(_KKT(lower, constraints, equalities))


def kkt_multipliers(
    lower: Callable[..., Array],
    constraints: Callable[..., Array] | None = None,
    equalities: Callable[..., Array] | None = None,
    *,
    active_tol: float | None = None,
) -> Callable[..., tuple]:
    r"""Multipliers of a primal solution: returns `point(x, y, *args)`, the KKT point
    `(y, lam, nu)` (same layout as [`bilevel.kkt_condition`][]) for a solution $y$ of
    $\min_y g(x, y)$ s.t. $h(x, y) \le 0$, $e(x, y) = 0$.

    The multipliers solve the stationarity equation $\nabla_y g + \partial_y h_A^\top
    \lambda_A + \partial_y e^\top\nu = 0$ in the least-squares sense over the active
    inequalities $A = \{i : h_i(x, y) \ge -\text{active\_tol}\}$ (inactive ones get
    $\lambda_i = 0$; negative values, which only rounding produces at a KKT point, are
    clipped to 0). This replaces hand derivations such as the cumulative sums of
    isotonic regression or the gradient signs of a box. It forms the constraint
    Jacobian densely: one product per constraint.

    `active_tol` defaults to $10^{-6}$ in float64 and $10^{-3}$ in float32.
    """
    if constraints is None and equalities is None:
        raise ValueError("kkt_multipliers: give `constraints`, `equalities` or both")
    kkt = _KKT(lower, constraints, equalities)

    def point(x, y, *args, **kwargs):
        return kkt.multipliers(x, y, args, kwargs, active_tol)

    return point


def _reject_jaxopt_prox(prox: Callable) -> None:
    if not callable(prox):
        raise TypeError(f"`prox` must be callable, got {type(prox).__name__}")
    module = getattr(prox, "__module__", None) or ""
    names = _parameter_names(prox)
    if module.split(".")[0] == "jaxopt" or (names and names[-1] == "scaling"):
        raise TypeError(
            "`prox` looks like a jaxopt proximal operator, `prox(v, hyperparams, "
            "scaling)`; bilevel calls `prox(x, v, step)`. Wrap it: "
            "`bl.prox.from_jaxopt(prox)` (hyperparams = x), or use the same operator "
            "from `bl.prox`"
        )


def _parameter_names(fn: Callable) -> list[str]:
    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return []


def _takes_data(fn: Callable | None) -> bool:
    """Whether a constraint function accepts data arguments after `(x, y)`."""
    if fn is None:
        return False
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return True
    positional = (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    )
    return sum(p.kind in positional for p in parameters) > 2


class _Stationarity(eqx.Module):
    lower: Callable

    def __call__(self, x, y, *args, **kwargs):
        params, frozen = split_variable(y)

        def lower(p):
            return self.lower(x, merge_variable(p, frozen), *args, **kwargs)

        return jax.grad(lower)(params)


class _ProjectedGradient(eqx.Module):
    lower: Callable
    project_y: Callable
    step: float

    def __call__(self, x, y, *args, **kwargs):
        grad = jax.grad(self.lower, argnums=1)(x, y, *args, **kwargs)
        moved = jtu.tree_map(lambda u, g: u - self.step * g, y, grad)
        return tree_sub(y, project_at(self.project_y, x, moved))


class _ProximalGradient(eqx.Module):
    smooth: Callable
    prox: Callable
    step: float

    def __call__(self, x, y, *args, **kwargs):
        grad = jax.grad(self.smooth, argnums=1)(x, y, *args, **kwargs)
        moved = jtu.tree_map(lambda u, g: u - self.step * g, y, grad)
        return tree_sub(y, self.prox(x, moved, self.step))


class _KKT(eqx.Module):
    lower: Callable
    constraints: Callable | None
    equalities: Callable | None
    constraints_take_data: bool = eqx.field(static=True)
    equalities_take_data: bool = eqx.field(static=True)

    def __init__(self, lower, constraints, equalities):
        for name, fn in (("constraints", constraints), ("equalities", equalities)):
            if fn is not None and not callable(fn):
                raise TypeError(f"kkt_condition: `{name}` must be callable")
        self.lower = lower
        self.constraints = constraints
        self.equalities = equalities
        self.constraints_take_data = _takes_data(constraints)
        self.equalities_take_data = _takes_data(equalities)

    def _values(self, which: str, x, y, args):
        fn = getattr(self, which)
        values = fn(x, y, *args) if getattr(self, f"{which}_take_data") else fn(x, y)
        if jnp.ndim(values) != 1:
            raise ValueError(
                f"kkt_condition: `{which}(x, y)` must return a 1-D array, got shape "
                f"{jnp.shape(values)}"
            )
        return values

    def _split(self, point):
        if not isinstance(point, tuple | list) or len(point) != self._size:
            raise ValueError(
                f"kkt_condition: the solution must be the tuple {self._layout}, got "
                f"{type(point).__name__}"
            )
        y, *rest = point
        lam = rest.pop(0) if self.constraints is not None else None
        nu = rest.pop(0) if self.equalities is not None else None
        return y, lam, nu

    @property
    def _size(self) -> int:
        return 1 + (self.constraints is not None) + (self.equalities is not None)

    @property
    def _layout(self) -> str:
        parts = ["y"] + ["lam"] * (self.constraints is not None)
        parts += ["nu"] * (self.equalities is not None)
        return "(" + ", ".join(parts) + ")"

    def __call__(self, x, point, *args, **kwargs):
        y, lam, nu = self._split(point)
        stationarity = jax.grad(self.lower, argnums=1)(x, y, *args, **kwargs)
        out = []
        for which, multipliers in (("constraints", lam), ("equalities", nu)):
            if multipliers is None:
                continue
            values, vjp = jax.vjp(lambda v, w=which: self._values(w, x, v, args), y)
            (term,) = vjp(multipliers)
            stationarity = jtu.tree_map(jnp.add, stationarity, term)
            out.append(multipliers * values if which == "constraints" else values)
        return (stationarity, *out)

    def multipliers(self, x, y, args, kwargs, active_tol):
        flat, unravel = jax.flatten_util.ravel_pytree(y)
        grad = jax.flatten_util.ravel_pytree(
            jax.grad(self.lower, argnums=1)(x, y, *args, **kwargs)
        )[0]
        tol = (
            default_tolerance(flat.dtype, 1e-6, 1e-3)
            if active_tol is None
            else active_tol
        )
        columns, masks = [], []
        for which in ("constraints", "equalities"):
            if getattr(self, which) is None:
                continue
            values = self._values(which, x, y, args)
            jac = jax.jacrev(lambda v, w=which: self._values(w, x, unravel(v), args))(
                flat
            )
            active = (
                values >= -tol
                if which == "constraints"
                else jnp.ones_like(values, bool)
            )
            columns.append(jnp.where(active[:, None], jac, 0).T)
            masks.append((which, values.shape[0]))
        matrix = jnp.concatenate(columns, axis=1)
        solution = jnp.linalg.lstsq(matrix, -grad)[0]
        out, start = [y], 0
        for which, size in masks:
            part = solution[start : start + size]
            out.append(jnp.maximum(part, 0) if which == "constraints" else part)
            start += size
        return tuple(out)
