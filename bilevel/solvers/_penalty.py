r"""Value-function penalty methods: one base class, three rules.

All three solvers replace the bilevel problem by the penalised single-level problem

$$\min_{x \in X,\, y \in Y}\; f(x, y) + \lambda\,\big(g(x, y) - g^*(x)\big),\qquad
g^*(x) = \min_{z \in Y} g(x, z),$$

and track a second lower variable $z \approx \arg\min_Y g(x, \cdot)$ for the value
function. Since $\nabla g^*(x) = \nabla_x g(x, z^*)$, every oracle is first order (no
Hessian, no lower-level strong convexity):

- $d_x = \nabla_x f(x, y) + \lambda\,(\nabla_x g(x, y) - \nabla_x g(x, z))$,
- $d_y = \nabla_y f(x, y) + \lambda\,\nabla_y g(x, y)$,
- $d_z = \nabla_y g(x, z)$.

`_AbstractValuePenalty` holds the state, the step and the metrics; a solver only states
its rule: the penalty $\lambda_k$, the step sizes, the STORM weight, and how many
warm-started inner steps it takes on $y$ and $z$ before the $x$ step (zero means a
joint step from the same oracles), and the optimizer of those inner steps: projected
gradient descent, or for Penalty's double loop on deterministic data without a set
$Y$, Nesterov's accelerated method restarted at every outer step from the warm start
(`default_inner_optimizer`, as ImplicitDiff's inner solve). Both $y$ and $z$ start at
`y0`. `params` returns
$(x, y)$: $y$, the minimiser of $f + \lambda g$, is the (optimistic) lower solution
estimate; $z$ is only a value-function witness, and when $S(x)$ is not a singleton it
may sit at any of its points.

Defaults derived from the problem use curvature estimates (power iterations on
Hessian-vector products, `bilevel/_stepsize.py`): $L_f = \|\nabla^2_{yy} f\|$ and
$L_g = \|\nabla^2_{yy} g\|$ at the first step (50 iterations each), $L_g$ then tracked
at $(x_k, z_k)$ by one warm-started iteration per step, and where a rule needs it the
joint curvature $L_J = \|\nabla^2_{(x, y)}(f + \lambda_k g)\|$ at $(x_k, y_k)$, tracked
the same way. All are evaluated on the step's own batches. Multiplying $f$ by $t$ and
$g$ by $s$ multiplies $L_f$ by $t$ and $L_g$ by $s$; the rules below are built so that
the iterates do not change.
"""

import abc
from typing import Any, ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import optax
from jaxtyping import Array, Int, PRNGKeyArray, PyTree, Scalar

from .._data import AbstractData
from .._inner import inner_steps
from .._linear import result_dtype
from .._misc import tree_axpy, tree_norm, tree_sub
from .._problem import BilevelProblem, apply_project_x, apply_project_y
from .._solver import (
    AbstractBilevelSolver,
    Bounds,
    choice,
    count,
    fraction,
    hyperparameter,
    nonnegative,
    positive,
)
from .._stepsize import (
    PowerIteration,
    SecantStep,
    continue_power_iteration,
    default_inner_optimizer,
    hessian_product,
    newton_point,
    refresh_due,
    secant_step,
    start_power_iteration,
    start_secant_step,
)


PENALTY_RATIO = 100.0
r"""Default $\lambda = 100\,L_f/L_g$: the lower level's curvature, weighted by the
penalty, dominates the upper level's by a factor 100 (Penalty, VPBGD; F2SA starts at a
tenth of it and grows, and so does VPBGD's continuation up to it)."""

PENALTY_GROWTH = 2 / 7
r"""Exponent $b$ of a growing penalty $\lambda_k = \lambda_0 (k + k_0)^b$: F2SA's
paper value with noise in both levels, also VPBGD's default continuation."""

CONTINUATION_START = 0.1
r"""VPBGD's default continuation starts at this fraction of its final penalty."""

INNER_TOLERANCE = 0.1
"""Largest estimated relative error of $d_x$ due to the inner solves
(`_inner_solves_reliable`) at which the adaptive $x$ step may grow; above it the inner
loops are repeated and, if that does not suffice, the step is halved."""

MAX_INNER_ROUNDS = 10
"""With deterministic data and the adaptive $x$ step, the inner loops are run up to
this many times per outer step until the inner solves are reliable."""

FIRST_ITERATIONS = 50
"""Power iterations of each curvature estimate at the first step."""

X_BLOCK_ITERATIONS = 20
X_BLOCK_REFRESH_ITERATIONS = 3
r"""Power iterations of VPBGD's $L_x$ at the first step and, warm-started, at each
refresh (each takes a conjugate-gradient solve)."""

X_BLOCK_CG_STEPS = 50
"""Largest number of Hessian-vector products of each of those solves."""

NOISY_DECAY = 1 / 3
r"""With minibatches the default $x$ step of Penalty's double loop and VPBGD's joint
step decay as $(k + 1)^{-1/3}$: the noise of $y - z$ is amplified by $\lambda$ in
$d_x$, so a constant step only reaches a noise floor."""

PEAK_DECAY = 0.99
"""Step sizes use the largest curvature estimate of the last ~100 steps: the running
maximum decays by this factor per step."""


# --------------------------------------------------------------------------------------
# State and per-step scalars


class _Momentum(eqx.Module):
    """STORM buffers: the previous directions $(D^x, D^y, D^z)$ and the previous point
    $(x, y, z)$ at which they were estimated."""

    direction: tuple[PyTree[Array], PyTree[Array], PyTree[Array]]
    point: tuple[PyTree[Array], PyTree[Array], PyTree[Array]]


class _Curvature(eqx.Module):
    r"""Curvature estimates: $L_f$ (first step only), $L_g$ (tracked or first step
    only), $L_J$ (tracked, when a rule uses it), $L_x$ (refreshed, when a rule uses
    it), the recent peaks of $L_g$ and $L_J$ (what the step sizes use), and $L_f/L_g$
    at the first step."""

    upper: PowerIteration
    lower: PowerIteration
    joint: PowerIteration | None
    x_block: PowerIteration | None
    lower_peak: Scalar
    joint_peak: Scalar
    ratio: Scalar
    x_block_penalty: Scalar


class _PenaltyState(eqx.Module):
    x: PyTree[Array]
    y: PyTree[Array]
    z: PyTree[Array]
    momentum: _Momentum | None
    step: Int[Array, ""]
    curvature: _Curvature | None
    secant: SecantStep | None


class _Rule(eqx.Module):
    """The scalars of outer iteration $k$: penalty $\\lambda_k$, step sizes on the
    $\\lambda$-form directions above, and the STORM weight $\\eta_k$ (1: none)."""

    penalty: Scalar
    x_lr: Scalar
    y_lr: Scalar
    z_lr: Scalar
    momentum: Scalar


class _Needs(NamedTuple):
    """What a configured solver derives from the problem, for one kind of data."""

    deterministic: bool  # the data's batches never change
    curvature: bool  # estimate L_f, L_g at the first step
    track_lower: bool  # and keep tracking L_g
    joint: bool  # estimate L_J at the first step
    track_joint: bool  # and keep tracking it
    secant: bool  # adaptive x step (Malitsky-Mishchenko), from the rule's x_lr
    x_block: bool = False  # estimate L_x at the first step
    refresh_every: int = 0  # and again every so many steps (0: never)
    # True: the inner loops are repeated until reliable and an unreliable secant step
    # is halved; False (a joint step): it is held, and never below the rule's x_lr
    inner_loops: bool = True


class _Oracles(eqx.Module):
    """Values and gradients of $f(x, y)$, $g(x, y)$ and $g(x, z)$."""

    f: Scalar
    f_x: PyTree[Array]
    f_y: PyTree[Array]
    g_y: Scalar
    g_y_x: PyTree[Array]
    g_y_y: PyTree[Array]
    g_z: Scalar
    g_z_x: PyTree[Array]
    g_z_y: PyTree[Array]


def _scalar(value: Any, dtype) -> Array:
    return jnp.asarray(value, dtype)


# --------------------------------------------------------------------------------------
# Pieces of one outer step


def _lower_residual(problem: Any, y: PyTree[Array], grad: PyTree[Array]) -> Scalar:
    r"""$\|\Phi(x, y)\|$ for the problem's own condition, from $\nabla_y g(x, y)$ at
    hand: $\|\nabla_y g\|$, or $\|y - \Pi_Y(y - \nabla_y g)\|$ with a set $Y$ (the
    default conditions; the penalty solvers take no custom `optimality`)."""
    if problem.project_y is None:
        return tree_norm(grad)
    return tree_norm(tree_sub(y, problem.project_y(tree_sub(y, grad))))


def _penalised_steps(
    problem, x, y, data, key, rule: _Rule, num_steps: int, step, optimizer
):
    r"""`num_steps` projected steps of `optimizer` (step $\beta$) on $f + \lambda g$,
    for gradient descent $y \leftarrow \Pi_Y(y - \beta(\nabla_y f + \lambda\nabla_y
    g))$, each on a fresh upper batch (stream 0) and lower batch (stream 1),
    independent of the value-function loop's."""

    def penalised(y_, upper_batch, lower_batch):
        lower = problem.lower(x, y_, lower_batch)
        lam = jnp.asarray(rule.penalty, jnp.result_type(lower))
        return problem.upper(x, y_, upper_batch) + lam * lower

    def body(t, carry):
        y_, opt_state = carry
        draw = step * num_steps + t
        sub = jr.fold_in(key, t)
        upper_batch = data.upper_batch(sub, draw, stream=0)
        lower_batch = data.lower_batch(sub, draw, stream=1)
        grad = jax.grad(penalised)(y_, upper_batch, lower_batch)
        updates, opt_state = optimizer.update(grad, opt_state, y_)
        return apply_project_y(problem, x, optax.apply_updates(y_, updates)), opt_state

    return lax.fori_loop(0, num_steps, body, (y, optimizer.init(y)))[0]


def _value_steps(problem, x, z, data, key, num_steps: int, step, optimizer):
    r"""`num_steps` projected steps of `optimizer` on $g(x, \cdot)$, for gradient
    descent $z \leftarrow \Pi_Y(z - \gamma\nabla_y g(x, z))$ (the shared
    `inner_steps`, lower stream 0)."""
    first_draw = step * num_steps
    z, _ = inner_steps(
        problem, optimizer, x, z, optimizer.init(z), data, key, num_steps, first_draw
    )
    return z


def _oracle_batches(data: AbstractData, key, step, coupled: bool):
    """Upper batch (stream 1) and the lower batches for $g$ at $y$ (stream 2) and at $z$
    (stream 3, or the same as at $y$ when the samples are coupled)."""
    upper = data.upper_batch(key, step, stream=1)
    lower_y = data.lower_batch(key, step, stream=2)
    lower_z = lower_y if coupled else data.lower_batch(key, step, stream=3)
    return upper, lower_y, lower_z


def _oracles(problem, x, y, z, batches) -> _Oracles:
    upper_batch, lower_y, lower_z = batches
    value_and_grad = jax.value_and_grad
    f, (f_x, f_y) = value_and_grad(problem.upper, argnums=(0, 1))(x, y, upper_batch)
    g_y, (g_y_x, g_y_y) = value_and_grad(problem.lower, argnums=(0, 1))(x, y, lower_y)
    g_z, (g_z_x, g_z_y) = value_and_grad(problem.lower, argnums=(0, 1))(x, z, lower_z)
    return _Oracles(f, f_x, f_y, g_y, g_y_x, g_y_y, g_z, g_z_x, g_z_y)


def _directions(o: _Oracles, penalty: Scalar):
    """$(d_x, d_y, d_z)$ of the module docstring."""
    d_x = tree_axpy(penalty, tree_sub(o.g_y_x, o.g_z_x), o.f_x)
    d_y = tree_axpy(penalty, o.g_y_y, o.f_y)
    return d_x, d_y, o.g_z_y


def _storm(problem, state: _PenaltyState, batches, current, rule: _Rule, point):
    r"""STORM-type recursive estimate $D_k = d(p_k; \xi_k) + (1 - \eta)(D_{k-1} -
    d(p_{k-1}; \xi_k))$, the same sample $\xi_k$ at both points;
    $D_0 = d(p_0; \xi_0)$."""
    old_oracles = _oracles(problem, *state.momentum.point, batches)
    previous = _directions(old_oracles, rule.penalty)
    weight = jnp.where(state.step > 0, 1 - rule.momentum, jnp.zeros_like(rule.momentum))
    correction = [tree_sub(d, p) for d, p in zip(state.momentum.direction, previous)]
    directions = tuple(tree_axpy(weight, c, d) for c, d in zip(correction, current))
    return directions, _Momentum(direction=directions, point=point)


def _inner_solves_reliable(problem, y, z, o: _Oracles, rule: _Rule, d_x):
    r"""Whether the inner solves are accurate enough for $d_x$ to be trusted: its
    estimated error is at most `INNER_TOLERANCE` $\|d_x\|$.

    The penalty term $p = \lambda(\nabla_x g(x, y) - \nabla_x g(x, z))$ is about
    $\lambda\nabla^2_{xy} g\,(y - z)$ with $\|y_\sigma - z^*\| \approx
    \|\Phi_g(y_\sigma)\|/\mu$; an error in $z$ is about $\|\Phi_g(z)\|/\mu$ and one
    in $y$ about $\|\Phi_h(y)\|/\mu$ ($\Phi_g$, $\Phi_h$: the (projected) gradients
    of $g$ and of $h = f/\lambda + g$). So the error of $d_x$ is about
    $\|p\|\,(\|\Phi_g(z)\| + \|\Phi_h(y)\|)/\|\Phi_g(y)\|$, which does not depend on
    the scales of $f$ and $g$. Requiring it relative to $\|d_x\|$ tightens the inner
    solves as $x$ converges (decreasing inner tolerances, as in HOAG), down to the
    rounding error of $d_x$ itself.
    """
    scale = _lower_residual(problem, y, o.g_y_y)
    grad_h = tree_axpy(1 / rule.penalty, o.f_y, o.g_y_y)
    error = _lower_residual(problem, y, grad_h) + _lower_residual(problem, z, o.g_z_y)
    lam = rule.penalty
    term = lam * tree_norm(tree_sub(o.g_y_x, o.g_z_x))
    size = tree_norm(o.f_x) + lam * (tree_norm(o.g_y_x) + tree_norm(o.g_z_x))
    rounding = 256 * jnp.finfo(scale.dtype).eps * size
    target = INNER_TOLERANCE * jnp.maximum(tree_norm(d_x), rounding)
    return term * error <= target * scale


def _repeat_until_reliable(problem, inner_round, rule: _Rule, carry):
    """Repeat `inner_round` (both inner loops and the oracles) while the inner solves
    are not reliable, up to `MAX_INNER_ROUNDS` rounds in all."""

    def unreliable(carry):
        y, z, oracles, rounds = carry
        d_x = _directions(oracles, rule.penalty)[0]
        reliable = _inner_solves_reliable(problem, y, z, oracles, rule, d_x)
        return (rounds < MAX_INNER_ROUNDS) & ~reliable

    def another(carry):
        y, z, _, rounds = carry
        return (*inner_round(y, z), rounds + 1)

    return lax.while_loop(unreliable, another, carry)


def _joint_step(problem, x, v, lr, direction, inner_steps: int):
    r"""$\Pi_Y(v - \text{lr}\cdot d)$ when the variable has no inner loop
    (`inner_steps == 0`), else `v` as the inner loop left it."""
    if inner_steps:
        return v
    return apply_project_y(problem, x, tree_axpy(-lr, direction, v))


def _iterations(step, tracked: bool):
    """Power iterations this step: `FIRST_ITERATIONS` at the first, then 1 (tracked)
    or 0."""
    return jnp.where(step == 0, FIRST_ITERATIONS, 1 if tracked else 0)


def _update_lower_curvature(
    problem, curvature: _Curvature, state: _PenaltyState, batches, tracked: bool
) -> _Curvature:
    """$L_f$ at the first step; $L_g$ at $(x_k, z_k)$; their ratio at the first
    step."""
    upper_batch, lower_batch, _ = batches
    x, first = state.x, state.step == 0
    upper = continue_power_iteration(
        hessian_product(lambda y: problem.upper(x, y, upper_batch), state.y),
        curvature.upper,
        jnp.where(first, FIRST_ITERATIONS, 0),
    )
    lower = continue_power_iteration(
        hessian_product(lambda z: problem.lower(x, z, lower_batch), state.z),
        curvature.lower,
        _iterations(state.step, tracked),
    )
    tiny = jnp.finfo(lower.norm.dtype).tiny
    first_ratio = upper.norm / jnp.maximum(lower.norm, tiny)
    ratio = jnp.where(first, first_ratio, curvature.ratio)
    peak = _recent_peak(first, lower.norm, curvature.lower_peak)
    return eqx.tree_at(
        lambda c: (c.upper, c.lower, c.lower_peak, c.ratio),
        curvature,
        (upper, lower, peak, ratio),
    )


def _recent_peak(first, norm, previous) -> Scalar:
    """The largest recent estimate: `norm`, or the previous peak decayed by
    `PEAK_DECAY` if larger. With minibatches each estimate is one batch's (and from
    below), and a step must stay stable on the batches with more curvature too."""
    return jnp.where(first, norm, jnp.maximum(norm, PEAK_DECAY * previous))


def _update_joint_curvature(
    problem, curvature: _Curvature, state: _PenaltyState, batches, penalty, tracked
) -> _Curvature:
    r"""$L_J = \|\nabla^2_{(x, y)}(f + \lambda_k g)\|$ at $(x_k, y_k)$."""
    upper_batch, lower_batch, _ = batches

    def penalised(point):
        x, y = point
        lower = problem.lower(x, y, lower_batch)
        return problem.upper(x, y, upper_batch) + penalty.astype(lower.dtype) * lower

    joint = continue_power_iteration(
        hessian_product(penalised, (state.x, state.y)),
        curvature.joint,
        _iterations(state.step, tracked),
    )
    peak = _recent_peak(state.step == 0, joint.norm, curvature.joint_peak)
    return eqx.tree_at(lambda c: (c.joint, c.joint_peak), curvature, (joint, peak))


def _update_x_block_curvature(
    problem, curvature: _Curvature, state: _PenaltyState, batches, penalty, iterations
) -> _Curvature:
    r"""$L_x = \|\nabla^2_{xx} F_\lambda\|$, the $x$-block of the Hessian of
    $F_\lambda(x, y) = f(x, y) + \lambda(g(x, y) - g^*(x))$ at a lower solution: with
    $\nabla^2 g^*(x) = \nabla^2_{xx} g - \nabla^2_{xy} g\,(\nabla^2_{yy} g)^{-1}
    \nabla^2_{yx} g$ at $y = y^*(x)$,

    $\nabla^2_{xx} F_\lambda = \nabla^2_{xx} f
    + \lambda\,\nabla^2_{xy} g\,(\nabla^2_{yy} g)^{-1}\nabla^2_{yx} g$.

    It is taken at $(x_k, \hat z)$, $\hat z = z_k - (\nabla^2_{yy} g)^{-1}\nabla_y
    g(x_k, z_k)$ the Newton point of the value-function variable (at an arbitrary $z$
    the coupling can vanish, e.g. $z = 0$ for a weight decay $e^x\|y\|^2$), by
    `iterations` warm-started power iterations (0: keep the estimate), each with one
    conjugate-gradient solve with $\nabla^2_{yy} g$. The penalty it was taken at is
    kept with it (`x_block_penalty`)."""
    upper_batch, _, lower_batch = batches
    x = state.x

    def lower_grad(u, v):
        return jax.grad(problem.lower, argnums=1)(u, v, lower_batch)

    def estimate(_):  # the Newton point's solve too: only on the steps that estimate
        z, _, solve = newton_point(lower_grad, x, state.z, X_BLOCK_CG_STEPS)
        upper_hvp = hessian_product(lambda u: problem.upper(u, z, upper_batch), x)
        _, cross = jax.linearize(lambda u: lower_grad(u, z), x)
        cross_t = jax.linear_transpose(cross, x)

        def product(w):
            (coupling,) = cross_t(solve(cross(w)))
            return tree_axpy(penalty, coupling, upper_hvp(w))

        return continue_power_iteration(product, curvature.x_block, iterations)

    x_block = lax.cond(iterations > 0, estimate, lambda _: curvature.x_block, None)
    at = jnp.where(iterations > 0, penalty, curvature.x_block_penalty)
    return eqx.tree_at(
        lambda c: (c.x_block, c.x_block_penalty), curvature, (x_block, at)
    )


def _penalised_lr(curvature: _Curvature, penalty) -> Scalar:
    r"""$1/(L_f + \lambda L_g)$: the step for gradient descent on $f + \lambda g$ in
    $y$."""
    return 1 / (curvature.upper.norm + penalty * curvature.lower_peak)


# --------------------------------------------------------------------------------------
# The base class


class _AbstractValuePenalty(AbstractBilevelSolver):
    """State, step and metrics of the value-function penalty family; subclasses give
    the rule (`_inner_steps`, `_penalty`, `_rule`, `_needs`)."""

    supports: ClassVar[frozenset[str]] = frozenset(
        {"single_block", "project_x", "project_y", "stochastic"}
    )

    coupled_samples: eqx.AbstractVar[bool]

    @abc.abstractmethod
    def _inner_steps(self) -> tuple[int, int]:
        """`(y_steps, z_steps)` before the $x$ step; 0 means a joint step."""

    @abc.abstractmethod
    def _needs(self, deterministic: bool) -> _Needs:
        """What this configuration derives from the problem."""

    @abc.abstractmethod
    def _penalty(self, step: Array, curvature: _Curvature | None, dtype) -> Scalar:
        r"""$\lambda_k$."""

    @abc.abstractmethod
    def _rule(
        self,
        step: Array,
        penalty: Scalar,
        curvature: _Curvature | None,
        needs: _Needs,
        dtype,
    ) -> _Rule:
        """The scalars of step `step` (with `needs.secant`, `x_lr` is the first
        step's, and without `needs.inner_loops` also the floor of every step's)."""

    def _storm(self) -> bool:
        return False

    def _inner_optimizer(self, problem, data, lr) -> optax.GradientTransformation:
        """The optimizer of the inner loops, with step `lr`: gradient descent."""
        return optax.sgd(lr)

    def _init(
        self,
        problem: BilevelProblem,
        x0: PyTree[Array],
        y0: PyTree[Array],
        key: PRNGKeyArray,
    ) -> _PenaltyState:
        """$z_0 = y_0$; zero STORM buffers; curvature estimates and the adaptive step
        allocated when some configuration of the data would use them."""
        momentum = None
        if self._storm():
            zeros = (
                jtu.tree_map(jnp.zeros_like, x0),
                jtu.tree_map(jnp.zeros_like, y0),
                jtu.tree_map(jnp.zeros_like, y0),
            )
            momentum = _Momentum(direction=zeros, point=(x0, y0, y0))
        needs = [self._needs(d) for d in (True, False)]
        curvature = None
        if any(n.curvature for n in needs):
            upper_key, lower_key, joint_key = jr.split(key, 3)
            upper = start_power_iteration(upper_key, y0)
            joint = x_block = None
            if any(n.joint for n in needs):
                joint = start_power_iteration(joint_key, (x0, y0))
            if any(n.x_block for n in needs):
                x_block = start_power_iteration(joint_key, x0)
            zero = upper.norm
            lower = start_power_iteration(lower_key, y0)
            curvature = _Curvature(upper, lower, joint, x_block, zero, zero, zero, zero)
        secant = start_secant_step(x0) if any(n.secant for n in needs) else None
        step = jnp.array(0)
        return _PenaltyState(x0, y0, y0, momentum, step, curvature, secant)

    def _estimate(
        self, problem: Any, state: _PenaltyState, batches, needs: _Needs
    ) -> tuple[_Curvature | None, _Rule]:
        """Curvature estimates (those the rule uses) and the rule of this step."""
        dtype = result_dtype(state.x)
        curvature = state.curvature
        if curvature is not None:
            curvature = _update_lower_curvature(
                problem, curvature, state, batches, needs.track_lower
            )
        penalty = self._penalty(state.step, curvature, dtype)
        if needs.joint:
            curvature = _update_joint_curvature(
                problem, curvature, state, batches, penalty, needs.track_joint
            )
        if needs.x_block:
            due = refresh_due(state.step, needs.refresh_every, needs.deterministic)
            iterations = jnp.where(state.step == 0, X_BLOCK_ITERATIONS, 0)
            iterations = jnp.where(due, X_BLOCK_REFRESH_ITERATIONS, iterations)
            curvature = _update_x_block_curvature(
                problem, curvature, state, batches, penalty, iterations
            )
        return curvature, self._rule(state.step, penalty, curvature, needs, dtype)

    def _step(
        self,
        problem: BilevelProblem,
        state: _PenaltyState,
        data: AbstractData,
        key: PRNGKeyArray,
    ) -> tuple[_PenaltyState, dict[str, Scalar]]:
        """One outer iteration.

        1. curvature estimates (when a rule needs them) and the rule of step $k$;
        2. `z_steps` warm-started projected steps on $g(x_k, \\cdot)$;
        3. `y_steps` warm-started projected steps on $f + \\lambda_k g$;
        4. oracles at $(x_k, y, z)$; directions, STORM-corrected when the state holds
           momentum buffers;
        5. $x \\leftarrow \\Pi_X(x - \\alpha d_x)$, and the joint steps
           $y \\leftarrow \\Pi_Y(y - \\beta d_y)$ if `y_steps == 0`,
           $z \\leftarrow \\Pi_Y(z - \\gamma d_z)$ if `z_steps == 0`.
        """
        needs = self._needs(data.deterministic)
        y_steps, z_steps = self._inner_steps()
        z_key, y_key, oracle_key = jr.split(key, 3)
        batches = _oracle_batches(data, oracle_key, state.step, self.coupled_samples)
        curvature, rule = self._estimate(problem, state, batches, needs)
        x, step = state.x, state.step

        z_optimizer = self._inner_optimizer(problem, data, rule.z_lr)
        y_optimizer = self._inner_optimizer(problem, data, rule.y_lr)

        def inner_round(y, z):  # the same keys every round: repeated only when the
            # data are deterministic
            z = _value_steps(problem, x, z, data, z_key, z_steps, step, z_optimizer)
            y = _penalised_steps(
                problem, x, y, data, y_key, rule, y_steps, step, y_optimizer
            )
            return y, z, _oracles(problem, x, y, z, batches)

        y, z, oracles = inner_round(state.y, state.z)
        rounds = jnp.array(1)
        if needs.secant and needs.inner_loops:  # repeat them until reliable
            y, z, oracles, rounds = _repeat_until_reliable(
                problem, inner_round, rule, (y, z, oracles, rounds)
            )
        directions = _directions(oracles, rule.penalty)
        momentum = None
        if state.momentum is not None:
            directions, momentum = _storm(
                problem, state, batches, directions, rule, (x, y, z)
            )
        d_x, d_y, d_z = directions
        x_lr, secant = rule.x_lr, state.secant
        if needs.secant:
            reliable = _inner_solves_reliable(problem, y, z, oracles, rule, d_x)
            if needs.inner_loops:
                x_lr, secant = secant_step(secant, x, d_x, x_lr, step == 0, reliable)
            else:  # a joint step cannot repeat its inner steps: held, not halved,
                # while they are unreliable, and never below the rule's own step
                x_lr, secant = secant_step(
                    secant, x, d_x, x_lr, step == 0, may_grow=reliable, smallest=x_lr
                )
        new_x = apply_project_x(problem, tree_axpy(-x_lr, d_x, x))
        new_y = _joint_step(problem, x, y, rule.y_lr, d_y, y_steps)
        new_z = _joint_step(problem, x, z, rule.z_lr, d_z, z_steps)
        if problem.project_x is None:  # the gradient mapping is d_x itself
            grad_norm = tree_norm(d_x)
        else:
            grad_norm = tree_norm(tree_sub(x, new_x)) / x_lr
        metrics = {
            "upper_loss": oracles.f,
            "grad_norm": grad_norm,
            "lower_residual": _lower_residual(problem, y, oracles.g_y_y),
            "value_residual": _lower_residual(problem, z, oracles.g_z_y),
            "penalty_gap": oracles.g_y - oracles.g_z,
            "lambda": rule.penalty,
            "x_lr": jnp.asarray(x_lr, result_dtype(x)),
            "inner_rounds": rounds,
        }
        new_state = _PenaltyState(
            new_x, new_y, new_z, momentum, step + 1, curvature, secant
        )
        return new_state, metrics

    def _params(self, state: _PenaltyState) -> tuple[PyTree[Array], PyTree[Array]]:
        return state.x, state.y


# --------------------------------------------------------------------------------------
# Kwon, Kwon, Wright, Nowak (ICLR 2024)


class Penalty(_AbstractValuePenalty):
    r"""Value-function penalty method of Kwon, Kwon, Wright and Nowak (ICLR 2024, "On
    Penalty Methods for Nonconvex Bilevel Optimization and First-Order Stochastic
    Approximation").

    With $h_\sigma = \sigma f + g$, it minimises the penalised hyper-objective
    $\psi_\sigma(x) = \min_{y \in Y}\{f(x, y) + (g(x, y) - g^*(x))/\sigma\}$, whose
    gradient, for any $y_\sigma \in \arg\min_Y h_\sigma(x, \cdot)$ and
    $z^* \in \arg\min_Y g(x, \cdot)$, is
    $\nabla\psi_\sigma(x) = \nabla_x f(x, y_\sigma) + (\nabla_x g(x, y_\sigma) -
    \nabla_x g(x, z^*))/\sigma$ and is within $O(\sigma)$ of $\nabla\psi(x)$ under
    the proximal error bound. The lower level may be merely convex or non-convex, with
    $S(x)$ a set (optimistic convention).

    `variant="double_loop"` (P-DL), outer step $k$:

    1. $z \leftarrow \Pi_Y(z - \gamma\nabla_y g(x_k, z))$, `z_steps` times,
       warm-started;
    2. $y \leftarrow \Pi_Y(y - \beta(\sigma_k\nabla_y f + \nabla_y g)(x_k, y))$,
       `y_steps` times, warm-started;
    3. $x_{k+1} = \Pi_X(x_k - \alpha_k d_k)$,
       $d_k = \nabla_x f(x_k, y) + (\nabla_x g(x_k, y) - \nabla_x g(x_k, z))/\sigma_k$.

    `variant="single_loop"` (P-SL, momentum-assisted): no inner loops; the three
    directions are evaluated at $(x_k, y_k, z_k)$ on one sample $\xi_k$ and corrected
    recursively with the same sample at the previous point,
    $D_k = d(p_k; \xi_k) + (1 - \eta)(D_{k-1} - d(p_{k-1}; \xi_k))$ ($D_0$ = plain
    estimate), then $x, y, z$ step together with $\alpha$, $\beta$ (on the
    $h_\sigma$-scaled direction) and $\gamma$. With full-batch data the correction
    cancels exactly and this is projected gradient descent on $(x, y, z)$.

    Penalty schedule: $\sigma_k = \max(\sigma_{\min}, \sigma\,(k + 1)^{-p})$ with
    $p$ = `sigma_decay` (0: fixed $\sigma$).

    **Arguments** (`None`: derived from the problem, see "Defaults"):

    - `variant`: `"double_loop"` (default) or `"single_loop"`.
    - `sigma`: $\sigma > 0$ (the bias in $x$ is $O(\sigma)$).
    - `sigma_decay`: $p \ge 0$ (default 0); `sigma_min`: floor of $\sigma_k$
      (default 0).
    - `x_lr`: $\alpha$. The paper's worst-case guidance is $\alpha = \Theta(\sigma)$;
      for lower levels with a well-conditioned solution map $\psi_\sigma$ stays smooth
      and larger steps work.
    - `y_lr`: $\beta$ on $\sigma\nabla_y f + \nabla_y g$ (need
      $\beta \le 1/(\sigma L_f + L_g)$).
    - `z_lr`: $\gamma \le 1/L_g$.
    - `y_steps`, `z_steps`: inner steps of the double loop (default 10; ignored by the
      single loop).
    - `momentum`: STORM weight $\eta \in (0, 1]$ of the single loop (default 0.1;
      $\eta = 1$ is plain SGD).
    - `coupled_samples`: evaluate $\nabla_x g(x, y)$ and $\nabla_x g(x, z)$ on the same
      lower batch (default `True`): under mean-squared smoothness the variance of
      their difference is $O(\|y - z\|^2) = O(\sigma^2)$, so the $1/\sigma$-amplified
      term keeps $O(1)$ variance. `False` draws them independently.

    **Defaults** ($L_f$, $L_g$, $L_J$ as in the module: curvature estimates on the
    step's batches):

    - $\sigma = L_g / (100 L_f)$ at the first step, i.e. $\lambda = 100 L_f/L_g$;
    - $\gamma = 1/L_g$ and $\beta = 1/(\sigma L_f + L_g)$, with the tracked $L_g$;
    - $\alpha$, double loop with deterministic data: the adaptive step of Malitsky and
      Mishchenko (ICML 2020) on $d_k$ (`bilevel/_stepsize.py`, `secant_step`),
      starting from $1/L_J$; the inner loops are repeated (up to
      `MAX_INNER_ROUNDS` rounds) until the estimated error of $d_k$ due to the inner
      solves is below `INNER_TOLERANCE` $\|d_k\|$, and the step is halved when
      they still are not; single loop: $1/L_J$, the worst-case $\Theta(\sigma)$
      step (its $y$ step too); double loop with minibatches: $(k + 1)^{-1/3}/L_J$
      (`NOISY_DECAY`).

    Step sizes use the recent peak of each tracked estimate (`PEAK_DECAY`).

    Inner loops: on deterministic data without a set $Y$, the steps 1 and 2 above are
    Nesterov's accelerated method (same step sizes, restarted at every outer step; a
    deviation from the paper's gradient steps): they reach the accuracy the adaptive
    $x$ step asks for in $O(\sqrt\kappa)$ rather than $O(\kappa)$ steps. Measured
    with defaults (`benchmarks/defaults.py --steps 500 --solvers Penalty`, full
    sizes): logreg_hpo 0.083 -> 0.066 (the baseline is 0.075). F2SA and VPBGD keep
    gradient steps: with F2SA's decaying steps the accelerated loops lowered the small
    imaml instance's meta-test accuracy from 0.54 to 0.503 (baseline 0.497).

    With stochastic data, each inner step draws fresh batches (the $y$ and $z$ loops
    independently of each other), and the $x$ step draws its own.

    **Metrics** each step (from the oracles of the $x$ step, minibatch estimates with
    stochastic data): `upper_loss` $f(x_k, y)$; `grad_norm` $\|d_k\|$, the penalised
    gradient (the gradient mapping $\|x_k - x_{k+1}\|/\alpha_k$ with `project_x`; the
    STORM estimate in the single loop); `lower_residual` $\|\Phi(x_k, y)\|$ at the
    penalised variable $y$ ($\|\nabla_y g\|$, or the projected-gradient residual with
    `project_y`), which is $\sigma_k\|\nabla_y f\|$ at $y_\sigma$: it shrinks like
    $\sigma$, not to 0; `value_residual`, the same at $z$; `penalty_gap`
    $g(x_k, y) - g(x_k, z)$; `lambda` $= 1/\sigma_k$; `x_lr` $\alpha_k$;
    `inner_rounds`, the rounds of inner loops the step used.
    """

    variant: str = choice("double_loop", ("double_loop", "single_loop"))
    sigma: float | None = positive(None, optional=True)
    sigma_decay: float = nonnegative(0.0)
    sigma_min: float = nonnegative(0.0)
    x_lr: float | None = positive(None, optional=True)
    y_lr: float | None = positive(None, optional=True)
    z_lr: float | None = positive(None, optional=True)
    y_steps: int = count(10, minimum=0)
    z_steps: int = count(10, minimum=0)
    momentum: float = fraction(0.1)
    coupled_samples: bool = eqx.field(static=True, default=True)

    def __check_init__(self):
        if self.variant != "double_loop":
            return
        for name in ("y_steps", "z_steps"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"Penalty: the double loop needs `{name}` >= 1, got "
                    f"{getattr(self, name)!r} (variant='single_loop' steps jointly)"
                )

    def _single(self) -> bool:
        return self.variant == "single_loop"

    def _storm(self) -> bool:
        return self._single()

    def _inner_optimizer(self, problem, data, lr) -> optax.GradientTransformation:
        """Accelerated on deterministic data without a set $Y$ (class docstring)."""
        return default_inner_optimizer(problem, data, lr)

    def _inner_steps(self) -> tuple[int, int]:
        return (0, 0) if self._single() else (self.y_steps, self.z_steps)

    def _needs(self, deterministic: bool) -> _Needs:
        derived = (self.sigma, self.x_lr, self.y_lr, self.z_lr)
        secant = self.x_lr is None and deterministic and not self._single()
        joint_x = self.x_lr is None and not secant
        joint_y = self.y_lr is None and self._single()
        return _Needs(
            deterministic=deterministic,
            curvature=any(v is None for v in derived),
            track_lower=self.z_lr is None or (self.y_lr is None and not self._single()),
            joint=self.x_lr is None or joint_y,
            track_joint=joint_x or joint_y,
            secant=secant,
        )

    def _sigma(self, step: Array, curvature: _Curvature | None, dtype) -> Array:
        t = (step + 1).astype(dtype)
        if self.sigma is None:
            sigma = 1 / (PENALTY_RATIO * curvature.ratio)
        else:
            sigma = _scalar(self.sigma, dtype)
        return jnp.maximum(
            _scalar(self.sigma_min, dtype),
            sigma * t ** -_scalar(self.sigma_decay, dtype),
        )

    def _penalty(self, step, curvature, dtype):
        return 1 / self._sigma(step, curvature, dtype)

    def _rule(self, step, penalty, curvature, needs, dtype) -> _Rule:
        sigma = self._sigma(step, curvature, dtype)
        eta = self.momentum if self._single() else 1.0
        if self.x_lr is None:  # the adaptive step starts from it, too
            x_lr = 1 / curvature.joint_peak
            if not (needs.deterministic or self._single()):  # noise: decay
                x_lr = x_lr * (step + 1).astype(dtype) ** -NOISY_DECAY
        else:
            x_lr = _scalar(self.x_lr, dtype)
        if self.y_lr is not None:
            # beta acts on h_sigma = sigma f + g = sigma (f + lambda g)
            y_lr = _scalar(self.y_lr, dtype) * sigma
        elif self._single():
            y_lr = 1 / curvature.joint_peak
        else:
            y_lr = _penalised_lr(curvature, penalty)
        z_lr = 1 / curvature.lower_peak if self.z_lr is None else self.z_lr
        return _Rule(
            penalty=penalty,
            x_lr=x_lr,
            y_lr=y_lr,
            z_lr=_scalar(z_lr, dtype),
            momentum=_scalar(eta, dtype),
        )


# --------------------------------------------------------------------------------------
# Shen & Chen (ICML 2023)


class VPBGD(_AbstractValuePenalty):
    r"""Value-function penalised bilevel gradient descent (V-PBGD) of Shen and Chen
    (ICML 2023, "On Penalty-based Bilevel Gradient Descent Method").

    Projected gradient descent on $F_\gamma(x, y) = f(x, y) + \gamma\,(g(x, y) - v(x))$,
    $v(x) = \min_{z \in Y} g(x, z)$, over $X \times Y$, outer step $k$:

    1. $z \leftarrow \Pi_Y(z - \beta\nabla_y g(x_k, z))$, `z_steps` times, warm-started
       ($z \approx \arg\min_Y g(x_k, \cdot)$);
    2. joint step with step $\alpha$:
       $x_{k+1} = \Pi_X(x_k - \alpha[\nabla_x f + \gamma_k(\nabla_x g(x_k, y_k) -
       \nabla_x g(x_k, z))])$,
       $y_{k+1} = \Pi_Y(y_k - \alpha[\nabla_y f + \gamma_k\nabla_y g](x_k, y_k))$.

    Penalty $\gamma_k$: constant, or a linear ramp from `penalty_init` to `penalty` over
    `ramp_steps` steps (the public data hyper-cleaning code). With `scale_by_penalty`
    both steps are multiplied by $\min(1, 1/\gamma_k)$ (also from that code), so that
    the effective step stays $\approx\alpha/\gamma$ once $\gamma > 1$.

    **Arguments** (`None`: derived from the problem, see "Defaults"):

    - `penalty`: $\gamma$ ($\gamma = \Theta(\epsilon^{-1/2})$ in the theory).
    - `penalty_init`, `ramp_steps`: linear ramp (default 0 steps: no ramp).
    - `penalty_growth`: $b$ of the continuation $\gamma_k = \min(\gamma,
      \gamma(k + 1)^b/10)$ (default: 2/7 when $\gamma$ is derived and there is no
      ramp, else 0, a constant $\gamma$).
    - `x_lr`: $\alpha$ of $x$; `y_lr`: the step of $y$ (default: `x_lr` when that is
      given, the paper's single step). Need $\alpha \lesssim 1/L_\gamma$,
      $L_\gamma = O(\gamma)$.
    - `z_lr`: $\beta$ of the value-function loop; `z_steps`: its length (default 1,
      warm-started, as in the public code).
    - `curvature_every`: on deterministic data, steps between two re-estimates of
      $L_x$, the floor of the default $x$ step (0: the first step's only; default
      100).
    - `scale_by_penalty`: see above (default `False`).
    - `coupled_samples`: one lower batch for both $\nabla_x g$ calls (default `True`;
      see [`bilevel.solvers.Penalty`][]).

    **Defaults** (curvature estimates on the step's batches, see
    [`bilevel.solvers.Penalty`][]): $\gamma = 100 L_f/L_g$ at the first step, reached
    by a continuation $\gamma_k = \min(\gamma, \gamma(k + 1)^{2/7}/10)$ (F2SA's
    start and growth exponent; $\gamma$ is reached after about 3200 steps), and one
    step per block of the joint step (a block-diagonal step, where the paper states
    one $\alpha$ for both; the paper's single step $1/L_\gamma$ is bounded by the
    stiff $y$-block, $\gamma L_g$, so $x$ moved $O(\mu_F/(\gamma L_g))$ per step):

    - $y$: $1/(L_f + \gamma_k L_g)$ with $L_g$ tracked, the inverse curvature of the
      $y$-block;
    - $x$: $1/L_x$, $L_x = \|\nabla^2_{xx} f + \gamma_k\nabla^2_{xy} g\,
      (\nabla^2_{yy} g)^{-1}\nabla^2_{yx} g\|$, the $x$-block of the Hessian of
      $F_\gamma$ at a lower solution (the value function contributes its own
      curvature), estimated at the first step and every `curvature_every` steps on
      deterministic data (warm-started power iterations with conjugate-gradient
      solves, at the Newton point of $z$). Where $F_\gamma$ is convex, its Hessian
      is at most twice its block diagonal, so these steps keep the joint iteration
      stable; $x$ then moves at the pace of its own block (on the small ridge and
      logistic hyperparameter problems of the registry $L_x$ is 150 to 225 times
      smaller than $L_J$); $L_x$ is linear in $\gamma$ when $\nabla^2_{xx} f$ is
      negligible, so between estimates it is scaled by $\gamma_k/\gamma_{\text{est}}$
      (never down). On deterministic data $1/L_x$ is the floor of an adaptive step:
      the step of Malitsky and Mishchenko (ICML 2020, `secant_step`) on $d_x$, half
      the inverse curvature of $d_x$ seen along the last step, which may grow (by
      at most $\sqrt{1 + \theta}$) only at steps where $y_k$ and $z_k$ are accurate
      enough for $d_x$ to be trusted (the test of Penalty's double loop, estimated
      error at most `INNER_TOLERANCE` $\|d_x\|$; the joint step cannot repeat its
      inner steps, so an untrusted step is held where Penalty halves it);
    - with minibatches both are multiplied by $(k + 1)^{-1/3}$; $\beta = 1/L_g$
      tracked.

    Why the adaptive $x$ step (a deviation: the paper's step is a constant
    $\alpha \lesssim 1/L_\gamma$): $L_x$ bounds the curvature of $F_\gamma$ in $x$
    over every direction and grows like $\gamma_k$, while the hyper-objective is
    often much flatter along the directions $x$ travels (on logreg_hpo the diagonal
    of the $x$-block spans a factor 2400), where $1/L_x$ crawls. The secant sees the
    curvature along the path, the lag of $y$ and $z$ included, and the floor keeps
    the step that is stable anyway. On the registry problems the inner variables of
    the joint step are rarely trusted, so the step is mostly held near its early
    value, shortened only by the secant, instead of falling like $1/\gamma_k$ with
    the floor. Allowed to grow at every step, it outran $y$ and $z$ on small
    ridge_hpo (it grew to 2700 while their residuals grew from 0.03 to 0.67, and the
    validation loss went from 0.212 after 500 steps to 0.251 after 2000); allowed to
    grow while their residuals fell, it drove logreg_hpo's weights to $e^{-16}$
    (0.005 after 600 steps, 0.22 after 2000, as $y$ stopped converging). Measured
    with defaults (`benchmarks/defaults.py [--small] --steps 500 --solvers VPBGD`,
    $1/L_x$ -> adaptive): small instances, logreg_hpo 0.0762 -> 0.0326 (baseline
    0.0719), distillation 0.718 -> 0.785, imaml 0.573 -> 0.607, ridge_hpo 0.221 ->
    0.215, the others within 0.01; full sizes, logreg_hpo 0.154 -> 0.102 (baseline
    0.075: still above), distillation 0.718 -> 0.776, imaml 0.548 -> 0.568,
    hyper_representation 0.885 -> 0.904, the others within 0.01.

    Why the continuation (a deviation from the paper's constant $\gamma$; the public
    code ramps $\gamma$ linearly instead): $L_x$ grows like $\gamma$, so $x$ moves at
    a pace $\propto 1/\gamma$, while the bias of the penalised solution only matters
    once $x$ is near it. Measured on the registry's small instances after 500 steps
    with the $1/L_x$ step (`benchmarks/defaults.py --small --steps 500 --solvers
    VPBGD`): logreg_hpo
    validation loss 0.1375 -> 0.0762, distillation accuracy 0.657 -> 0.718, imaml
    0.547 -> 0.573, every other problem equal or better; on the scale battery of the
    tests (3000 steps) the final gap is that of $\gamma$ itself.

    **Metrics** each step (minibatch estimates with stochastic data): `upper_loss`
    $f(x_k, y_k)$; `grad_norm` $\|d_x\|$, the $x$-part of $\nabla F_\gamma$ (the
    gradient mapping $\|x_k - x_{k+1}\|/\alpha$ with `project_x`); `lower_residual`
    $\|\Phi(x_k, y_k)\|$ at the penalised variable, which is $\|\nabla_y f\|/\gamma_k$
    at a stationary point of $F_\gamma$: it shrinks like $1/\gamma$, not to 0;
    `value_residual`, the same at $z$; `penalty_gap` $g(x_k, y_k) - g(x_k, z)$;
    `lambda` $= \gamma_k$; `x_lr` $\alpha$ (times the scaling, if any);
    `inner_rounds` (always 1).
    """

    penalty: float | None = positive(None, optional=True)
    penalty_init: float = nonnegative(0.0)
    ramp_steps: int = count(0, minimum=0)
    penalty_growth: float | None = nonnegative(None, optional=True)
    x_lr: float | None = positive(None, optional=True)
    y_lr: float | None = positive(None, optional=True)
    z_lr: float | None = positive(None, optional=True)
    z_steps: int = count(1)
    curvature_every: int = count(100, minimum=0)
    scale_by_penalty: bool = eqx.field(static=True, default=False)
    coupled_samples: bool = eqx.field(static=True, default=True)

    def _inner_steps(self) -> tuple[int, int]:
        return 0, self.z_steps

    def _needs(self, deterministic: bool) -> _Needs:
        derived = (self.penalty, self.x_lr, self.z_lr)  # y_lr is stated if x_lr is
        return _Needs(
            deterministic=deterministic,
            curvature=any(v is None for v in derived),
            track_lower=self.z_lr is None or self._stated_y_lr() is None,
            joint=False,
            track_joint=False,
            secant=deterministic and self.x_lr is None,
            x_block=self.x_lr is None,
            refresh_every=self.curvature_every,
            inner_loops=False,
        )

    def _stated_y_lr(self) -> float | None:
        """The step of $y$ if stated: `y_lr`, else `x_lr` (the paper's joint step)."""
        return self.x_lr if self.y_lr is None else self.y_lr

    def _growth(self) -> float:
        """$b$ of the continuation: `penalty_growth`, else 2/7 for a derived penalty
        without a ramp and 0 (constant) otherwise."""
        if self.penalty_growth is not None:
            return self.penalty_growth
        derived = self.penalty is None and not self.ramp_steps
        return PENALTY_GROWTH if derived else 0.0

    def _penalty(self, step, curvature, dtype):
        if self.penalty is None:
            penalty = PENALTY_RATIO * curvature.ratio
        else:
            penalty = _scalar(self.penalty, dtype)
        if self.ramp_steps:
            start = _scalar(self.penalty_init, dtype)
            fraction = jnp.minimum(step.astype(dtype) / self.ramp_steps, 1)
            penalty = start + (penalty - start) * fraction
        growth = self._growth()
        if growth:
            t = (step + 1).astype(dtype)
            grown = CONTINUATION_START * penalty * t ** _scalar(growth, dtype)
            penalty = jnp.minimum(penalty, grown)
        return penalty

    def _rule(self, step, penalty, curvature, needs, dtype) -> _Rule:
        scale = 1 / jnp.maximum(penalty, 1) if self.scale_by_penalty else 1
        y_lr = self._stated_y_lr()
        if y_lr is None:
            y_lr = _penalised_lr(curvature, penalty)
        if self.x_lr is None:  # no x-curvature: the y step, the smaller scale
            # L_x grows with the penalty: scaled to the penalty of this step
            growth = jnp.maximum(penalty / curvature.x_block_penalty, 1)
            x_block = curvature.x_block.norm * growth
            x_lr = jnp.where(x_block > 0, 1 / x_block, y_lr)
        else:
            x_lr = self.x_lr
        if not needs.deterministic:  # noise: decay (see Penalty)
            decay = (step + 1).astype(dtype) ** -NOISY_DECAY
            x_lr = x_lr * decay if self.x_lr is None else x_lr
            y_lr = y_lr * decay if self._stated_y_lr() is None else y_lr
        z_lr = 1 / curvature.lower_peak if self.z_lr is None else self.z_lr
        return _Rule(
            penalty=penalty,
            x_lr=_scalar(x_lr, dtype) * scale,
            y_lr=_scalar(y_lr, dtype) * scale,
            z_lr=_scalar(z_lr, dtype),
            momentum=_scalar(1.0, dtype),
        )


# --------------------------------------------------------------------------------------
# Kwon, Kwon, Wright, Nowak (ICML 2023)


F2SA_PENALTY_RATIO = 10.0
r"""F2SA's default $\lambda_0 = 10\,L_f/L_g$ (it grows from there)."""

F2SA_STOCHASTIC_DECAY = (5 / 7, 4 / 7)
"""The paper's step-size exponents $(a, c)$ with noise in both levels."""


class F2SA(_AbstractValuePenalty):
    r"""Fully first-order stochastic approximation (F2SA) of Kwon, Kwon, Wright and
    Nowak (ICML 2023, "A Fully First-Order Method for Stochastic Bilevel Optimization").

    Gradient method on the Lagrangian $\mathcal{L}_\lambda(x, y) = f(x, y) +
    \lambda(g(x, y) - g^*(x))$ with a growing multiplier, outer step $k$ with
    $t = k + k_0$, $\lambda_k = \lambda_0 t^{b}$, $\alpha_k = c_\alpha t^{-a}$,
    $\gamma_k = c_\gamma t^{-c}$:

    1. `y_steps` / `z_steps` warm-started inner steps, each on fresh independent
       samples:
       $z \leftarrow \Pi_Y(z - \gamma_k\nabla_y g(x_k, z))$,
       $y \leftarrow \Pi_Y(y - \alpha_k(\nabla_y f + \lambda_k\nabla_y g)(x_k, y))$;
    2. $x_{k+1} = \Pi_X(x_k - \xi\alpha_k(\nabla_x f(x_k, y)
       + \lambda_k(\nabla_x g(x_k, y) - \nabla_x g(x_k, z))))$, the three gradients on
       independent samples.

    The paper's exponents with noise in both levels are $(a, b, c) = (5/7, 2/7, 4/7)$;
    its analysis also asks $\alpha_k\lambda_k \le 1/(4L_g)$, $\gamma_k \le 1/(4L_g)$
    and a small ratio $\xi$. (The paper is unconstrained; the projections of the
    problem, identity by default, are applied anyway.)

    **Arguments** (`None`: derived from the problem or the data, see "Defaults"):

    - `penalty`: $\lambda_0$; `penalty_growth`: $b$ (default 2/7).
    - `y_lr`: $c_\alpha$; `y_lr_decay`: $a$.
    - `z_lr`: $c_\gamma$; `z_lr_decay`: $c$.
    - `x_ratio`: $\xi$.
    - `offset`: $k_0 \ge 1$ (default 1).
    - `y_steps`, `z_steps`: inner steps $T$ (default 10 each).
    - `coupled_samples`: default `False` (the paper's independent samples); `True`
      shares the lower batch of the two $\nabla_x g$ calls (see
      [`bilevel.solvers.Penalty`][]).

    **Defaults** (curvature estimates on the step's batches, see
    [`bilevel.solvers.Penalty`][]): $\lambda_0 = 10 L_f/L_g$ at the first step;
    $c_\alpha = 1/(L_f + \lambda_0 L_g)$ and $c_\gamma = 1/L_g$ with the tracked $L_g$
    (so $\alpha_k(L_f + \lambda_k L_g) \le 1$ for $a \ge b$). With minibatches the
    paper's $(a, c) = (5/7, 4/7)$ and the $x$ step $t^{-a}/L_J(\lambda_0)$, i.e.
    $\xi = 1/(c_\alpha L_J)$. With deterministic data there is no noise to average:
    $a = b$ (constant $\alpha_k\lambda_k$), $c = 0$, and the $x$ step is the adaptive
    step of [`bilevel.solvers.Penalty`][] (from $1/L_J$, inner loops repeated until
    reliable), i.e. $\xi$ is chosen each step.

    **Metrics** each step (minibatch estimates with stochastic data): `upper_loss`
    $f(x_k, y)$; `grad_norm` $\|d_x\|$, the gradient of $\mathcal{L}_{\lambda_k}$ in
    $x$ (the gradient mapping $\|x_k - x_{k+1}\|/(\xi\alpha_k)$ with `project_x`);
    `lower_residual` $\|\Phi(x_k, y)\|$ at the penalised variable, which is
    $\|\nabla_y f\|/\lambda_k$ at the minimiser of $\mathcal{L}_{\lambda_k}(x_k,
    \cdot)$: it shrinks like $1/\lambda_k$, not to 0; `value_residual`, the same at
    $z$; `penalty_gap` $g(x_k, y) - g(x_k, z)$; `lambda` $= \lambda_k$; `x_lr`
    $\xi\alpha_k$; `inner_rounds`, the rounds of inner loops the step used.
    """

    penalty: float | None = positive(None, optional=True)
    penalty_growth: float = nonnegative(PENALTY_GROWTH)
    y_lr: float | None = positive(None, optional=True)
    y_lr_decay: float | None = nonnegative(None, optional=True)
    z_lr: float | None = positive(None, optional=True)
    z_lr_decay: float | None = nonnegative(None, optional=True)
    x_ratio: float | None = positive(None, optional=True)
    offset: float = hyperparameter(1.0, Bounds(1.0))
    y_steps: int = count(10)
    z_steps: int = count(10)
    coupled_samples: bool = eqx.field(static=True, default=False)

    def _inner_steps(self) -> tuple[int, int]:
        return self.y_steps, self.z_steps

    def _needs(self, deterministic: bool) -> _Needs:
        derived = (self.penalty, self.y_lr, self.z_lr)
        return _Needs(
            deterministic=deterministic,
            curvature=any(v is None for v in derived),
            track_lower=self.y_lr is None or self.z_lr is None,
            joint=self.x_ratio is None,
            track_joint=self.x_ratio is None and not deterministic,
            secant=self.x_ratio is None and deterministic,
        )

    def _decays(self, deterministic: bool):
        """$(a, c)$: the fields, or the defaults for the data."""
        a, c = (self.penalty_growth, 0.0) if deterministic else F2SA_STOCHASTIC_DECAY
        a = a if self.y_lr_decay is None else self.y_lr_decay
        c = c if self.z_lr_decay is None else self.z_lr_decay
        return a, c

    def _base_penalty(self, curvature, dtype):
        if self.penalty is None:
            return F2SA_PENALTY_RATIO * curvature.ratio
        return _scalar(self.penalty, dtype)

    def _penalty(self, step, curvature, dtype):
        t = step.astype(dtype) + _scalar(self.offset, dtype)
        growth = _scalar(self.penalty_growth, dtype)
        return self._base_penalty(curvature, dtype) * t**growth

    def _rule(self, step, penalty, curvature, needs, dtype) -> _Rule:
        t = step.astype(dtype) + _scalar(self.offset, dtype)
        y_decay, z_decay = self._decays(needs.deterministic)
        if self.y_lr is None:
            y_lr = _penalised_lr(curvature, self._base_penalty(curvature, dtype))
        else:
            y_lr = _scalar(self.y_lr, dtype)
        y_lr = y_lr * t ** -_scalar(y_decay, dtype)
        z_lr = 1 / curvature.lower_peak if self.z_lr is None else self.z_lr
        if self.x_ratio is None:
            # t^-a / L_J(lambda_0), from the tracked L_J(lambda_k) ~ lambda_k L_gJ
            base = self._base_penalty(curvature, dtype)
            x_lr = t ** -_scalar(y_decay, dtype) * penalty / base / curvature.joint_peak
        else:
            x_lr = _scalar(self.x_ratio, dtype) * y_lr
        return _Rule(
            penalty=penalty,
            x_lr=x_lr,
            y_lr=y_lr,
            z_lr=_scalar(z_lr, dtype) * t ** -_scalar(z_decay, dtype),
            momentum=_scalar(1.0, dtype),
        )
