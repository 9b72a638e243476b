r"""Curvature estimates from which default step sizes are derived.

A default step must follow the problem's scale: multiplying $g$ by $s$ multiplies the
lower curvature $L_g$ by $s$, and a step $1/L_g$ keeps gradient descent on $g$ exactly
as fast in iterations. The estimates here use Hessian-vector products only (a few power
iterations), so they cost a handful of gradient evaluations.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import optax
from jaxtyping import Array, Bool, Int, PRNGKeyArray, PyTree, Scalar

from ._linear import solve_adjoint
from ._misc import tree_axpy, tree_dot, tree_norm, tree_scale, tree_sub
from ._problem import apply_project_x


def random_direction(key: PRNGKeyArray, like: PyTree[Array]) -> PyTree[Array]:
    """A standard normal pytree shaped like `like`, scaled to unit norm."""
    leaves, treedef = jtu.tree_flatten(like)
    keys = jr.split(key, max(len(leaves), 1))
    noise = [
        jr.normal(k, jnp.shape(u), jnp.result_type(u)) for k, u in zip(keys, leaves)
    ]
    direction = jtu.tree_unflatten(treedef, noise)
    return tree_scale(1 / tree_norm(direction), direction)


def operator_norm(
    matvec: Callable[[PyTree], PyTree],
    like: PyTree[Array],
    key: PRNGKeyArray,
    num_iters: int = 20,
) -> Scalar:
    r"""Power-iteration estimate of $\|A\|_2$ for a symmetric operator $A$ given by
    `matvec` (its largest eigenvalue in absolute value).

    The estimate approaches $\|A\|_2$ from below; callers that turn it into a step size
    keep a safety margin. A zero operator gives 0.
    """

    return power_iteration(matvec, random_direction(key, like), num_iters)[0]


def power_iteration(
    matvec: Callable[[PyTree], PyTree],
    vector: PyTree[Array],
    num_iters: int | Array,
    norm: Scalar | None = None,
) -> tuple[Scalar, PyTree[Array]]:
    r"""`num_iters` power iterations $v \leftarrow Av / \|Av\|$ from the unit vector
    `vector`: the last $\|Av\|$ (an estimate of $\|A\|_2$ from below, 0 for a zero
    operator) and the last $v$, from which a later call can resume (warm start: one
    iteration per call then tracks a slowly changing operator). With `num_iters=0` the
    estimate is `norm` (the previous one; default 0). `num_iters` may be a traced
    integer."""

    def body(_, carry):
        v, _ = carry
        w = matvec(v)
        norm = tree_norm(w)
        safe = jnp.where(norm > 0, norm, jnp.ones_like(norm))
        return tree_scale(1 / safe, w), norm

    if norm is None:
        norm = jnp.zeros((), jnp.result_type(*jtu.tree_leaves(vector)))
    vector, norm = lax.fori_loop(0, num_iters, body, (vector, norm))
    return norm, vector


def lower_curvature(
    problem: Any,
    x: PyTree[Array],
    y: PyTree[Array],
    batch: Any,
    key: PRNGKeyArray,
    num_iters: int = 20,
) -> Scalar:
    r"""Estimate of $L = \|\partial_y\Phi(x, y)\|_2$, the local smoothness of the lower
    objective ($\|\nabla^2_{yy} g\|_2$ for the default condition $\Phi = \nabla_y g$).

    For a condition not declared symmetric, $\sqrt{\|\partial_y\Phi^\top
    \partial_y\Phi\|_2}$.
    """
    condition = problem.condition
    _, jvp = jax.linearize(lambda v: condition(x, v, batch), y)
    if condition.symmetric:
        return operator_norm(jvp, y, key, num_iters)
    vjp = jax.linear_transpose(jvp, y)
    return jnp.sqrt(operator_norm(lambda v: vjp(jvp(v))[0], y, key, num_iters))


# -------------------------------------------------------------------------------------
# ImplicitDiff / Unrolled


FIRST_POWER_ITERATIONS = 20
"""Power iterations of a first curvature estimate; later steps refine it by one each."""


def _lower_linearised(problem: Any, x: PyTree, y: PyTree, batch: Any):
    r"""$\nabla_y g(x, y)$ and $v \mapsto \nabla^2_{yy} g(x, y)\,v$, not differentiated
    (step-size rules)."""
    x, y = lax.stop_gradient((x, y))
    return jax.linearize(jax.grad(lambda v: problem.lower(x, v, batch)), y)


def lower_hessian_norm(
    problem: Any,
    x: PyTree[Array],
    y: PyTree[Array],
    batch: Any,
    vector: PyTree[Array],
    num_iters: int | Array,
) -> tuple[Scalar, PyTree[Array]]:
    r"""$\|\nabla^2_{yy} g(x, y)\|_2$ by power iteration on Hessian-vector products,
    warm-started from the unit vector `vector` (see `power_iteration`); returns the
    estimate and the vector to resume from."""
    _, hvp = _lower_linearised(problem, x, y, batch)
    return power_iteration(hvp, lax.stop_gradient(vector), num_iters)


def tracked_lower_curvature(
    problem: Any,
    x: PyTree[Array],
    y: PyTree[Array],
    batch: Any,
    previous: Scalar,
    vector: PyTree[Array],
    step: Int[Array, ""],
) -> tuple[Scalar, PyTree[Array]]:
    r"""Running estimate $\hat L_k$ of $\|\nabla^2_{yy} g\|$ for inner steps
    $1/\hat L_k$: the largest of the previous estimate, power iteration
    (`FIRST_POWER_ITERATIONS` iterations at step 0, then one per step from the previous
    vector) and the curvature along the current gradient,
    $\|\nabla^2_{yy} g\, u\|$ with $u = \nabla_y g / \|\nabla_y g\|$.

    The estimate never falls, so one iteration on a new minibatch, whose Hessian has
    other leading directions, cannot underestimate it; it grows at once with a network
    that sharpens while it trains. The gradient term catches a curvature that jumps
    in a new direction when $x$ moves (e.g. a regularisation weight $e^{x_i}$ that grows
    twentyfold in one outer step), which one power iteration from the old leading
    vector would miss: the first inner step moves along that gradient."""
    grad, hvp = _lower_linearised(problem, x, y, batch)
    iterations = jnp.where(step == 0, FIRST_POWER_ITERATIONS, 1)
    estimate, vector = power_iteration(hvp, lax.stop_gradient(vector), iterations)
    unit = tree_scale(inverse_or_zero(tree_norm(grad)), grad)
    along_gradient = tree_norm(hvp(unit))
    return jnp.maximum(jnp.maximum(estimate, along_gradient), previous), vector


def inverse_or_zero(value: Scalar) -> Scalar:
    """`1 / value`, or 0 where `value` is not positive (no usable curvature)."""
    positive = value > 0
    return jnp.where(positive, 1 / jnp.where(positive, value, 1), 0).astype(value.dtype)


def refresh_due(
    step: Int[Array, ""], every: int, deterministic: bool
) -> bool | Bool[Array, ""]:
    """Whether step `step` re-estimates derived step sizes: every `every` steps after
    the first (`every = 0`: never), on deterministic data only (on stochastic data the
    steps decay, and an estimate would need many batches). The Python `False` when no
    step ever does, so that callers need not trace the estimate at all."""
    if not every or not deterministic:
        return False
    return (step > 0) & (step % every == 0)


class AdaptiveStepState(NamedTuple):
    """State of `adaptive_gradient_descent`: the previous iterate and gradient, the
    last step $\\lambda_{k-1}$, the ratio
    $\\theta_{k-1} = \\lambda_{k-1}/\\lambda_{k-2}$ and whether the last step was the
    probe ($\\theta = \\infty$), and the largest gradient norm seen."""

    previous_params: PyTree[Array]
    previous_grad: PyTree[Array]
    step_size: Scalar
    ratio: Scalar
    after_probe: Bool[Array, ""]
    largest_grad: Scalar


def adaptive_gradient_descent(probe: float = 1e-3) -> optax.GradientTransformation:
    r"""Gradient descent with the adaptive step of Malitsky and Mishchenko (2020,
    "Adaptive gradient descent without descent", ICML), as an optax transformation:

    $\lambda_k = \min\big(\sqrt{1 + \theta_{k-1}}\,\lambda_{k-1},\;
    \frac{\|x_k - x_{k-1}\|}{2\|g_k - g_{k-1}\|}\big)$,
    $\theta_k = \lambda_k / \lambda_{k-1}$, $x_{k+1} = x_k - \lambda_k g_k$.

    The second term is the inverse of a local curvature estimate of $F$ from two
    successive gradients, so the step follows the scale of $F$: multiplying $F$ by $t$
    divides every $\lambda_k$ by $t$ and leaves the iterates unchanged; the first term
    bounds the growth of the step (by about the golden ratio per iteration once
    $\theta$ has settled). No function values are needed, which suits hypergradients
    computed at an approximate lower solution. For convex $F$ with a locally Lipschitz
    gradient the iterates converge (the paper's theorem 1).

    The first step is a probe moving $x$ by `probe` $\cdot \max(1, \|x_0\|)$ (so
    $\theta_0 = \infty$ and $\lambda_1$ is the local estimate alone; if the gradient
    did not change, $\lambda_1 = 2\lambda_0$); if the gradient is zero, the probe is
    retried at the next step. When $x$ does not move, $\lambda$ is kept.

    Deviation: $\lambda$ is also kept (neither grown nor re-estimated) when the gradient
    change $\|g_k - g_{k-1}\|$ is below $\sqrt{\epsilon}$ times the largest gradient
    norm seen ($\epsilon$ the dtype's machine epsilon) *and* the gradient has fallen
    below half that largest norm: on a hyper-objective that keeps decreasing towards
    infinity (a regularisation weight $e^{x_j}$ that only helps as it vanishes or
    explodes) the gradient fades, its changes reach the rounding level, and the
    unchecked growth would drive $x$ to values where the lower problem is numerically
    meaningless. While the gradient stays large the step grows as in the paper, even
    when its changes are small: keeping it there froze the step at the probe's size on
    a hyper-objective of low curvature (ridge_hpo at full size, where $x$ then moved
    $10^{-3}$ per step and ended above the grid-search baseline).
    """

    def init(params):
        zeros = jtu.tree_map(jnp.zeros_like, params)
        scalar = jnp.zeros((), jnp.result_type(*jtu.tree_leaves(params)))
        return AdaptiveStepState(zeros, zeros, scalar, scalar, jnp.array(False), scalar)

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("adaptive_gradient_descent needs `params` in `update`")
        grad_norm = tree_norm(grads)
        first = probe * jnp.maximum(tree_norm(params), 1) * inverse_or_zero(grad_norm)
        moved = tree_norm(tree_sub(params, state.previous_params))
        change = tree_norm(tree_sub(grads, state.previous_grad))
        largest = jnp.maximum(state.largest_grad, grad_norm).astype(grad_norm.dtype)
        rounding = change <= jnp.sqrt(jnp.finfo(grad_norm.dtype).eps) * largest
        informative = ~rounding | (grad_norm >= 0.5 * largest)
        grown = jnp.where(
            state.after_probe,  # after the probe: the secant alone, if measurable
            jnp.where(change > 0, jnp.inf, 2 * state.step_size),
            jnp.sqrt(1 + state.ratio) * state.step_size,
        )
        adapted = secant_length(state.step_size, grown, moved, change, informative)
        started = state.step_size > 0
        step = jnp.where(started, adapted, first).astype(grad_norm.dtype)
        ratio = jnp.where(started, step * inverse_or_zero(state.step_size), 0)
        updates = tree_scale(-step, grads)
        new_state = AdaptiveStepState(
            params, grads, step, ratio.astype(step.dtype), ~started, largest
        )
        return updates, new_state

    return optax.GradientTransformation(init, update)


def outer_update(
    optimizer: optax.GradientTransformation | None, lr: float | None
) -> optax.GradientTransformation:
    """The x update of ImplicitDiff and Unrolled: `optimizer` if given, else gradient
    descent with step `lr` if given, else `adaptive_gradient_descent()`."""
    if optimizer is not None:
        return optimizer
    if lr is not None:
        return optax.sgd(lr)
    return adaptive_gradient_descent()


def _ratio_or_inf(numerator: Scalar, denominator: Scalar) -> Scalar:
    """`numerator / denominator`, or infinity where the denominator is not positive."""
    ratio = numerator * inverse_or_zero(denominator)
    return jnp.where(denominator > 0, ratio, jnp.inf)


def secant_length(
    previous: Scalar, grown: Scalar, moved: Scalar, change: Scalar, usable: Any = True
) -> Scalar:
    r"""The core of Malitsky and Mishchenko's adaptive step (ICML 2020), shared by
    `adaptive_gradient_descent` and `secant_step`: $\min(\text{grown},
    \|x_k - x_{k-1}\| / (2\|d_k - d_{k-1}\|))$, half the inverse of the curvature
    seen along the last step, with `grown` the growth bound (the secant is infinite
    when $d$ did not change). The `previous` step is kept when $x$ did not move (at an
    exactly converged point growing it would only overflow) or the secant is not
    `usable`."""
    secant = _ratio_or_inf(moved, 2 * change)
    return jnp.where((moved > 0) & usable, jnp.minimum(grown, secant), previous)


def default_inner_optimizer(
    problem: Any, data: Any, step: Scalar
) -> optax.GradientTransformation:
    r"""The default inner steps of ImplicitDiff and Unrolled, of size `step` ($1/\hat L$
    for a curvature estimate $\hat L$): `accelerated_descent` on deterministic data
    without a set $Y$ (restarted at every outer step), plain gradient descent with
    minibatches (momentum would accumulate their noise) or projections."""
    if data.deterministic and problem.project_y is None:
        return accelerated_descent(step)
    return optax.sgd(step)


def gradient_mapping_norm(problem, x, grad, step) -> Scalar:
    r"""$\|\nabla F\|$, or with a set $X$ the gradient mapping
    $\|x - P_X(x - \eta\nabla F)\| / \eta$ ($\eta$ the outer step, 1 when unknown)."""
    if problem.project_x is None:
        return tree_norm(grad)
    dtype = jnp.result_type(*jtu.tree_leaves(grad))
    step = jnp.asarray(1.0 if step is None else step, dtype)
    step = jnp.where(step > 0, step, 1)
    moved = apply_project_x(problem, tree_axpy(-step, grad, x))
    return tree_norm(tree_sub(x, moved)) / step


class AcceleratedState(NamedTuple):
    """State of `accelerated_descent`: the last gradient-step point and the count."""

    previous: PyTree[Array]
    count: Int[Array, ""]


def accelerated_descent(step_size: Scalar | float) -> optax.GradientTransformation:
    r"""Nesterov's accelerated gradient method with the momentum schedule for convex
    functions, as an optax transformation whose parameters are the extrapolated points
    $z_k$ (where the gradient is taken):

    $y_{k+1} = z_k - \eta\nabla g(z_k)$, $z_{k+1} = y_{k+1} + \frac{k}{k+3}(y_{k+1} -
    y_k)$ (Nesterov 1983), with $\eta = $ `step_size` $\le 1/L$.

    It needs no strong-convexity constant, and is a smooth map of its inputs, so
    unrolled differentiation goes through it: after $K$ steps the error is
    $O(L\|y_0 - y^*\|^2/K^2)$ for convex $g$ instead of gradient descent's $O(1/K)$.
    """

    def init(params):
        return AcceleratedState(params, jnp.zeros((), jnp.int32))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("accelerated_descent needs `params` in `update`")
        step = tree_axpy(-step_size, grads, params)
        k = state.count.astype(jnp.result_type(*jtu.tree_leaves(params)))
        momentum = k / (k + 3)
        extrapolated = tree_axpy(momentum, tree_sub(step, state.previous), step)
        updates = tree_sub(extrapolated, params)
        return updates, AcceleratedState(step, state.count + 1)

    return optax.GradientTransformation(init, update)


# --------------------------------------------------------------------------------------
# penalty family (Penalty, VPBGD, F2SA): tracked curvature and adaptive outer steps


class PowerIteration(eqx.Module):
    """A warm-started power iteration: the current estimate of $\\|A\\|_2$ and the unit
    vector it came from, carried in a solver state so that a slowly changing operator
    is tracked with one product per step."""

    norm: Scalar
    vector: PyTree[Array]


def start_power_iteration(key: PRNGKeyArray, like: PyTree[Array]) -> PowerIteration:
    """A random unit start vector shaped like `like` and the estimate 0."""
    vector = random_direction(key, like)
    zero = jnp.zeros((), jnp.result_type(*jtu.tree_leaves(like)))
    return PowerIteration(zero, vector)


def continue_power_iteration(
    matvec: Callable[[PyTree], PyTree], estimate: PowerIteration, num_iters: Any
) -> PowerIteration:
    """`num_iters` more power iterations from `estimate` (a traced count is allowed:
    under `jax.vmap` all runs share the count, so no run pays for another's)."""

    norm, vector = power_iteration(matvec, estimate.vector, num_iters, estimate.norm)
    return lax.stop_gradient(PowerIteration(norm, vector))


def hessian_product(
    fn: Callable[[PyTree], Scalar], point: PyTree[Array]
) -> Callable[[PyTree], PyTree]:
    r"""$v \mapsto \nabla^2 \mathrm{fn}(\text{point})\, v$ (forward over reverse)."""
    grad = jax.grad(fn)
    return lambda v: jax.jvp(grad, (point,), (v,))[1]


class SecantStep(eqx.Module):
    """State of the adaptive step of Malitsky and Mishchenko: the last step size, the
    ratio of the last two, and the last point and direction."""

    lr: Scalar
    ratio: Scalar
    point: PyTree[Array]
    direction: PyTree[Array]


def start_secant_step(point: PyTree[Array]) -> SecantStep:
    """Before the first step: no previous point (its fields are placeholders)."""
    zero = jnp.zeros((), jnp.result_type(*jtu.tree_leaves(point)))
    zeros = jtu.tree_map(jnp.zeros_like, point)
    return SecantStep(zero, jnp.ones_like(zero), point, zeros)


def secant_step(
    state: SecantStep,
    point: PyTree[Array],
    direction: PyTree[Array],
    first_lr: Scalar,
    first: Any,
    reliable: Any = True,
    may_grow: Any = True,
    smallest: Any = 0,
) -> tuple[Scalar, SecantStep]:
    r"""The step size of adaptive gradient descent without descent (Malitsky and
    Mishchenko, ICML 2020) for the direction field $d$ at $x_k$, for solvers that carry
    the step in their own state (`secant_length` is the rule):

    $\alpha_k = \min\big(\sqrt{1 + \theta_{k-1}}\,\alpha_{k-1},\;
    \|x_k - x_{k-1}\| / (2\|d_k - d_{k-1}\|)\big)$, $\theta_k = \alpha_k/\alpha_{k-1}$,

    i.e. half the inverse of the local curvature seen along the last step, allowed to
    grow by at most $\sqrt{1 + \theta}$ per step. Invariant to scaling the objective;
    meant for exact (deterministic) directions. `first_lr` is used when `first` is
    true ($\theta_0 = 1$); a step along which $d$ did not change only grows the
    previous one, and when $x$ did not move at all (e.g. $d = 0$ exactly at a
    converged point) the previous step is kept: growing it there would only overflow.
    When `reliable` is false (the caller knows that $d_k$ is too inexact for its secant
    to mean anything, e.g. an inner solve that lags behind), the previous step is
    halved instead. When `may_grow` is false the growth bound is the previous step
    itself (the secant may still shorten it). The step is never below `smallest` (a
    step the caller knows to be stable).
    """
    moved = tree_norm(tree_sub(point, state.point))
    change = tree_norm(tree_sub(direction, state.direction))
    grown = jnp.where(may_grow, jnp.sqrt(1 + state.ratio), 1) * state.lr
    lr = secant_length(state.lr, grown, moved, change)
    lr = jnp.where(reliable, lr, state.lr / 2)
    lr = jnp.maximum(jnp.where(first, first_lr, lr), smallest)
    ratio = jnp.where(first, jnp.ones_like(lr), lr / state.lr)
    lr = lax.stop_gradient(lr)
    return lr, SecantStep(lr, lax.stop_gradient(ratio), point, direction)


# --------------------------------------------------------------------------------------
# SLBAMM / BOREP / LVHBA


def hessian_norm(
    fn: Callable[[PyTree[Array]], Scalar],
    primals: PyTree[Array],
    key: PRNGKeyArray,
    num_iters: int = 20,
) -> Scalar:
    r"""Power-iteration estimate of $\|\nabla^2 \mathrm{fn}(\mathrm{primals})\|_2$ for a
    scalar function of one pytree (forward-over-reverse Hessian-vector products)."""
    _, hvp = jax.linearize(jax.grad(fn), primals)
    return operator_norm(hvp, primals, key, num_iters)


def spectrum_bounds(
    matvec: Callable[[PyTree], PyTree],
    like: PyTree[Array],
    key: PRNGKeyArray,
    num_iters: int = 20,
) -> tuple[Scalar, Scalar]:
    r"""Estimates of the largest and smallest eigenvalues $L$ and $m$ of a symmetric
    positive semidefinite operator: $L$ by power iteration, then $m = L -
    \|L I - A\|_2$ by power iteration on the shifted operator. Both approach from the
    inside of the spectrum ($L$ from below, $m$ from above), so $L/m$ underestimates
    the condition number when the iterations have not converged."""
    first, second = jr.split(key)
    largest = operator_norm(matvec, like, first, num_iters)
    shifted = operator_norm(
        lambda v: tree_sub(tree_scale(largest, v), matvec(v)), like, second, num_iters
    )
    return largest, jnp.maximum(largest - shifted, 0)


def jacobian_norm(
    fn: Callable[[PyTree[Array]], PyTree[Array]],
    primals: PyTree[Array],
    key: PRNGKeyArray,
    num_iters: int = 20,
) -> Scalar:
    r"""Power-iteration estimate of $\|\partial\,\mathrm{fn}(\mathrm{primals})\|_2$, the
    largest singular value of the Jacobian, as $\sqrt{\|J^\top J\|_2}$."""
    _, jvp = jax.linearize(fn, primals)
    vjp = jax.linear_transpose(jvp, primals)
    return jnp.sqrt(operator_norm(lambda v: vjp(jvp(v))[0], primals, key, num_iters))


def hyper_curvature(
    upper: Callable[[PyTree[Array], PyTree[Array]], Scalar],
    gradient: Callable[[PyTree[Array], PyTree[Array]], PyTree[Array]],
    x: PyTree[Array],
    y: PyTree[Array],
    key: PRNGKeyArray,
    num_iters: int = 10,
    max_steps: int = 50,
    coupling_only: bool = False,
    with_gradient: bool = False,
) -> Scalar | tuple[Scalar, ...]:
    r"""Estimate of the curvature $L_\Phi = \|\nabla^2\Phi(x)\|_2$ of the
    hyper-objective $\Phi(x) = F(x, y^*(x))$, $G(x, y^*(x)) = 0$ (`upper` $= F$,
    `gradient` $= G$, the gradient in $y$ of a convex lower objective), from $(x, y)$.

    It is taken at the Newton point $\hat y = y - (\partial_y G)^{-1} G(x, y)$, which is
    $y^*(x)$ when $G$ is affine in $y$ and closer to it than $y$ otherwise (at an
    arbitrary $y$ the sensitivity of $y^*$ can vanish, e.g. $y = 0$ for a weight decay
    $e^x y$). With the sensitivity $J = -(\partial_y G)^{-1}\partial_x G$ of $y^*$ at
    $(x, \hat y)$ and the adjoint $v = (\partial_y G)^{-1}\nabla_y F$, the Hessian of
    $\Phi$ is the reduced Hessian of the Lagrangian $\mathcal L = F - \langle G,
    v\rangle$,
    $\nabla^2\Phi = \begin{pmatrix} I \\ J \end{pmatrix}^\top \nabla^2\mathcal L
    \begin{pmatrix} I \\ J \end{pmatrix}$ (exact at $\hat y = y^*(x)$), whose norm
    is estimated by `num_iters` power iterations. Each product takes two
    conjugate-gradient solves with $\partial_y G$ (at most `max_steps` Hessian-vector
    products each, relative tolerance $10^{-3}$: an estimate, not a certificate), so
    $\partial_y G$ must be symmetric positive semidefinite and nonsingular on the range
    of $\partial_x G$ and of $\nabla_y F$ (a direction of non-positive curvature ends a
    solve early).

    With `coupling_only`, three numbers instead: the curvature $L_c$ of the part that
    passes through $y^*(x)$, $\|\nabla^2\Phi - \nabla^2_{xx}\mathcal L\|$ (what lagging
    iterates of $y$ and of the adjoint perturb); the lower curvature that those
    iterates see along it, the smaller Rayleigh quotient of $\partial_y G$ at the
    responses $J w$ of $y^*$ and $(\partial_y G)^{-1}\,\partial_y\nabla\mathcal L
    \,[w; Jw]$ of the adjoint to the leading direction $w$ ($\infty$ if both vanish);
    and $\|\nabla^2_{xx}\mathcal L\|$ (no solves), so that $L_\Phi$ is at most the sum
    of the first and the last.

    With `with_gradient`, $(L_\Phi, \nabla\Phi(x))$: the hypergradient
    $\nabla_x\mathcal L = \nabla_x F - \partial_x G^\top v$ at $(x, \hat y)$ comes
    with the Hessian-vector products at no extra solve.
    """
    if coupling_only and with_gradient:
        raise ValueError(
            "hyper_curvature: give `coupling_only` or `with_gradient`, not both"
        )
    y, hvp, solve = newton_point(gradient, x, y, max_steps)
    _, cross = jax.linearize(lambda u: gradient(u, y), x)
    cross_t = jax.linear_transpose(cross, x)
    adjoint = solve(jax.grad(upper, argnums=1)(x, y))

    def lagrangian(xy):
        return upper(*xy) - tree_dot(gradient(*xy), adjoint)

    (hypergradient, _), upper_hvp = jax.linearize(jax.grad(lagrangian), (x, y))
    zeros = jtu.tree_map(jnp.zeros_like, y)

    def direct(w):
        return upper_hvp((w, zeros))[0]

    def product(w):
        response = solve(cross(w))  # -J w
        h_x, h_y = upper_hvp((w, tree_scale(-1.0, response)))
        adjoint_response = solve(h_y)
        (back,) = cross_t(adjoint_response)
        if coupling_only:
            h_x = tree_sub(h_x, direct(w))
        return tree_sub(h_x, back), (response, adjoint_response)

    def body(_, carry):
        w, _, _ = carry
        out, responses = product(w)
        norm = tree_norm(out)
        return tree_scale(inverse_or_zero(norm), out), norm, responses

    power_key, direct_key = jr.split(key) if coupling_only else (key, key)
    start = random_direction(power_key, x)
    empty = (zeros, zeros)
    norm = jnp.zeros((), jnp.result_type(*jtu.tree_leaves(x)))
    _, norm, responses = lax.fori_loop(0, num_iters, body, (start, norm, empty))
    if with_gradient:
        return norm, hypergradient
    if not coupling_only:
        return norm
    quotients = [_ratio_or_inf(tree_dot(r, hvp(r)), tree_dot(r, r)) for r in responses]
    direct_norm = operator_norm(direct, x, direct_key, num_iters)
    return norm, jnp.minimum(*quotients), direct_norm


def newton_point(
    gradient: Callable[[PyTree[Array], PyTree[Array]], PyTree[Array]],
    x: PyTree[Array],
    y: PyTree[Array],
    max_steps: int,
) -> tuple[PyTree[Array], Callable, Callable]:
    r"""The Newton point $\hat y = y - (\partial_y G)^{-1} G(x, y)$ of $G$ = `gradient`
    (one conjugate-gradient solve), with $v \mapsto \partial_y G(x, \hat y)\,v$ and a
    conjugate-gradient solver $b \mapsto (\partial_y G(x, \hat y))^{-1} b$ there (at
    most `max_steps` products each)."""

    def linearised(y):
        residual, hvp = jax.linearize(lambda v: gradient(x, v), y)
        return residual, hvp, lambda rhs: _conjugate_gradient(hvp, rhs, max_steps)

    residual, _, solve = linearised(y)
    y = tree_sub(y, solve(residual))
    _, hvp, solve = linearised(y)
    return y, hvp, solve


def _conjugate_gradient(matvec, rhs: PyTree[Array], max_steps: int) -> PyTree[Array]:
    r"""Conjugate gradients for $A u = b$ from $u = 0$, until $\|b - Au\| \le 10^{-3}
    \|b\|$, `max_steps`, or a direction of non-positive curvature. (lineax's CG declares
    a breakdown when $p^\top A p < 100\, n\, \epsilon\, \|r\|^2$, an absolute test
    that a large float32 system of small curvature fails.)"""

    def cond(carry):
        _, _, _, rr, k = carry
        return (k < max_steps) & (rr > 1e-6 * rr0)

    def body(carry):
        u, r, p, rr, k = carry
        ap = matvec(p)
        curvature = tree_dot(p, ap)
        alpha = jnp.where(curvature > 0, rr / jnp.where(curvature > 0, curvature, 1), 0)
        u = tree_axpy(alpha, p, u)
        r = tree_axpy(-alpha, ap, r)
        rr_new = tree_dot(r, r)
        beta = rr_new / jnp.where(rr > 0, rr, 1)
        k = jnp.where(curvature > 0, k + 1, max_steps)
        return u, r, tree_axpy(beta, p, r), rr_new, k

    rr0 = tree_dot(rhs, rhs)
    zeros = jtu.tree_map(jnp.zeros_like, rhs)
    u, *_ = lax.while_loop(cond, body, (zeros, rhs, rhs, rr0, 0))
    return u


# -------------------------------------------------------------------------------------
# BSVRB


def hyper_hessian_product(
    problem: Any,
    x: PyTree[Array],
    y: PyTree[Array],
    direction: PyTree[Array],
    upper_batch: Any,
    lower_batch: Any,
) -> PyTree[Array]:
    r"""$\nabla^2\tilde F(x)\,d$ for the hyper-objective linearised in $y$,
    $\tilde F(x') = f(x', y + J(x' - x))$ with
    $J = -(\partial_y\Phi)^{-1}\partial_x\Phi$ at $(x, y)$:
    $\nabla^2\tilde F = [I; J]^\top\nabla^2 f\,[I; J]$, the Hessian of
    $F(x) = f(x, y^*(x))$ at $y = y^*(x)$ without the terms in the third derivatives
    of $g$ (exact when $g$ is quadratic). $d$ = `direction`.

    Two matrix-free solves with $\partial_y\Phi$ (its default solver), for a condition
    with a symmetric Jacobian such as $\Phi = \nabla_y g$.
    """
    condition = problem.condition
    _, cross_d = jax.jvp(lambda u: condition(u, y, lower_batch), (x,), (direction,))
    _, response, _, _ = solve_adjoint(condition, x, y, (lower_batch,), cross_d, None)
    grad = jax.grad(problem.upper, argnums=(0, 1))
    _, (hess_x, hess_y) = jax.jvp(
        lambda u, w: grad(u, w, upper_batch),
        (x, y),
        (direction, tree_scale(-1, response)),
    )
    _, adjoint, _, _ = solve_adjoint(condition, x, y, (lower_batch,), hess_y, None)
    _, vjp = jax.vjp(lambda u: condition(u, y, lower_batch), x)
    return tree_sub(hess_x, vjp(adjoint)[0])


# -------------------------------------------------------------------------------------
# Stochastic single-loop (SOBA, SABA, SRBA, MA-SOBA)


def upper_curvature(
    problem: Any,
    x: PyTree[Array],
    y: PyTree[Array],
    batch: Any,
    key: PRNGKeyArray,
    num_iters: int = 20,
) -> Scalar:
    r"""Estimate of $L_f = \|\nabla^2 f(x, y)\|_2$, the smoothness of the upper
    objective in $(x, y)$ jointly (power iteration on Hessian-vector products)."""

    def grad(xy):
        return jax.grad(lambda u: problem.upper(u[0], u[1], batch))(xy)

    _, hvp = jax.linearize(grad, (x, y))
    return operator_norm(hvp, (x, y), key, num_iters)


# `lag_controlled`: the growth of a step per iteration while the lagging variables keep
# up, and its cut when they fall behind.
LAG_STEP_GROWTH = 1.05
LAG_STEP_CUT = 0.5


class LagControl(eqx.Module):
    """State of `lag_controlled`: the step of the last iteration, its ceiling and the
    lag residuals of the last iteration."""

    step: Scalar
    ceiling: Scalar
    lag: tuple[Scalar, ...]

    def rebound(self, floor: Scalar, ceiling: Scalar) -> "LagControl":
        """The same control with new bounds (re-estimated curvatures), its step moved
        inside them."""
        return LagControl(jnp.clip(self.step, floor, ceiling), ceiling, self.lag)


def lag_controlled(
    control: LagControl, floor: Scalar, lag: tuple[Scalar, ...]
) -> LagControl:
    r"""The upper step of a single-loop method on deterministic data, between a safe
    `floor` (a lag bound such as $\rho\mu/L_c$) and `control.ceiling` (the bound of
    the upper step alone): $\eta_t = \max(\eta_{t-1}/2,\ \text{floor})$ when a lag
    residual (the gradients that vanish when the lagging variables, $y$ and the
    adjoint, have caught up with $x$) grew since the last iteration, else
    $\min(1.05\,\eta_{t-1},\ \text{ceiling})$. The floor is never crossed; where the
    lag bound is real, the residuals grow as $x$ outruns $y$ and the step falls back
    towards it. The tests compare residuals with themselves, so scaling an objective
    changes no iterate."""
    behind = jnp.any(jnp.stack([now > before for now, before in zip(lag, control.lag)]))
    cut = jnp.maximum(LAG_STEP_CUT * control.step, floor)
    grown = jnp.minimum(LAG_STEP_GROWTH * control.step, control.ceiling)
    step = lax.stop_gradient(jnp.where(behind, cut, grown))
    return LagControl(step, control.ceiling, lax.stop_gradient(tuple(lag)))


def single_loop_step_sizes(
    problem: Any,
    x: PyTree[Array],
    y: PyTree[Array],
    upper_batches: Any,
    lower_batches: Any,
    key: PRNGKeyArray,
    fraction: float = 0.5,
) -> tuple[Scalar, Scalar, Scalar]:
    r"""Default steps of the joint $(y, v, x)$ methods, from the batches given (stacked
    along a leading axis, one per draw), at $(x, y)$:

    - $\rho = c / L_g$ for $y$ and $v$, $c$ = `fraction`, $L_g$ the largest lower
      curvature over the batches (`lower_curvature`):
      $y$ and $v$ take gradient steps on $g$ and on $\frac12 v^\top\nabla^2_{yy} g\, v +
      v^\top\nabla_y f$, both $L_g$-smooth on every batch probed;
    - $\gamma = c\min(1/L_\Phi,\ \rho\mu / L_c)$ for $x$, from the mean problem over
      the batches (`hyper_curvature`): $L_c$ the curvature of the part of its
      hyper-objective that passes through $y^*(x)$, $L_\Phi = L_c +
      \|\nabla^2_{xx}\mathcal L\|$ (a bound on the whole curvature), $\mu$ the lower
      curvature along the responses of $y^*$ and of the adjoint to the leading
      direction of the coupling part. One power iteration through two
      conjugate-gradient solves per product;
    - the ceiling $c / L_\Phi$ of $x$ steps on deterministic data (the curvature
      bound alone, without the lag limit; see `bilevel.solvers.SOBA`).

    Why $\rho\mu$: $y$ and $v$ follow $y^*(x)$ and $v^*(x)$ with a lag of about
    $1/(\rho\mu)$ steps, and $x$ steps along a direction computed from them; the joint
    iteration is stable only if $x$ moves slowly on that time scale (the two-time-scale
    condition of the convergence analyses). On quadratics whose hyper-objective
    curvature comes from the coupling, the joint iteration becomes unstable from
    $\gamma L_c \approx 2.2\rho\mu_g$ (spectral radius of the iteration matrix,
    $\kappa_g$ from 1 to 1000); with $c = 1/2$ the default stays at least 1.9 times
    below it there. It is conservative where the coupling is weak (see the SOBA page).

    Multiplying $g$ by $s$ or $f$ by $t$ leaves every iteration unchanged ($\rho\mu$ is
    scale-free, $L_\Phi$ and $L_c$ scale with $t$). $\mu$ is floored at $10^{-3} L_g$
    (e.g. a non-convex lower level); a non-positive or non-finite $L_\Phi$ falls back on
    $L_f$, the largest upper curvature in $(x, y)$ (`upper_curvature`), and a zero $L_g$
    on $L_f$ (or 1).
    """
    lower_key, upper_key, hyper_key = jr.split(key, 3)
    leaves = jtu.tree_leaves((upper_batches, lower_batches))
    num = jnp.shape(leaves[0])[0] if leaves else 1

    def largest(curvature, batches, key):
        keys = jr.split(key, num)
        values = jax.vmap(lambda b, k: curvature(problem, x, y, b, k))(batches, keys)
        return jnp.max(values)

    def mean_over(fn, batches):
        if not jtu.tree_leaves(batches):  # a level without data
            return lambda u, w: fn(u, w, batches)
        return lambda u, w: jnp.mean(jax.vmap(lambda b: fn(u, w, b))(batches))

    lower = largest(lower_curvature, lower_batches, lower_key)
    upper = largest(upper_curvature, upper_batches, upper_key)
    lower = jnp.where(lower > 0, lower, jnp.where(upper > 0, upper, 1.0))
    upper = jnp.where(upper > 0, upper, lower)
    rho = fraction / lower

    mean_upper = mean_over(problem.upper, upper_batches)
    lower_grad = jax.grad(mean_over(problem.lower, lower_batches), argnums=1)
    coupling, lagging, direct = hyper_curvature(
        mean_upper, lower_grad, x, y, hyper_key, coupling_only=True
    )
    hyper = coupling + direct  # an upper bound on L_Phi
    hyper = jnp.where(jnp.isfinite(hyper) & (hyper > 0), hyper, upper)
    floor = 1e-3 * lower
    lagging = jnp.where(lagging > floor, lagging, floor)  # also catches NaN
    coupling = jnp.where(jnp.isfinite(coupling), coupling, hyper)
    lag_limit = _ratio_or_inf(rho * lagging, coupling)
    ceiling = fraction / hyper
    return rho, jnp.minimum(ceiling, fraction * lag_limit), ceiling
