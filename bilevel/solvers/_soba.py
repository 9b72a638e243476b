r"""SOBA: the stochastic single-loop bilevel method of Dagréou, Ablin, Vaiter and Moreau
(NeurIPS 2022), and the joint $(y, v, x)$ step shared by its variance-reduced and
moving-average relatives (SABA, SRBA, MA-SOBA).

With $\Phi = \nabla_y g$, each step takes from one lower and one upper batch the
directions

$D_y = \nabla_y g$, $\quad D_v = \nabla^2_{yy} g\, v + \nabla_y f$,
$\quad D_x = \nabla^2_{xy} g\, v + \nabla_x f$,

and moves $y \leftarrow y - \rho D_y$, $v \leftarrow v - \rho D_v$,
$x \leftarrow P_X(x - \gamma D_x)$ simultaneously. At $y = y^*(x)$ and
$v = v^*(x) = -[\nabla^2_{yy} g]^{-1}\nabla_y f$, $D_x$ is the hypergradient.
"""

import math
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from jaxtyping import Array, Int, PRNGKeyArray, PyTree, Scalar

from .._data import AbstractData
from .._misc import tree_axpy, tree_norm, tree_scale, tree_sub
from .._oracles import Oracles, oracles
from .._problem import apply_project_x
from .._solver import AbstractBilevelSolver, count, nonnegative, positive
from .._stepsize import (
    LagControl,
    hessian_product,
    inverse_or_zero,
    lag_controlled,
    refresh_due,
    single_loop_step_sizes,
)


# What the four solvers support: the variance-reduced ones need every oracle to be a
# mean over samples (true of grad_y g and its derivatives, not of a projected or
# user-given condition), and SOBA/MA-SOBA follow grad_y g as the paper does.
SUPPORTS = frozenset({"single_block", "project_x", "stochastic"})
UNSUPPORTED = {
    "project_y": "its y and v steps follow grad_y g and its Hessian without projection",
    "optimality": "its y and v steps follow grad_y g and its Hessian",
}

# Default steps (single_loop_step_sizes) from the curvatures over the first
# PROBE_BATCHES draws of the data (at most one epoch).
PROBE_BATCHES = 10


class SingleLoopState(eqx.Module):
    """State of the joint $(y, v, x)$ methods: the iterates, the base step sizes (given
    or estimated at `init`), the controlled $x$ step, the method's own memory and a step
    counter."""

    x: PyTree[Array]
    y: PyTree[Array]
    v: PyTree[Array]
    inner_lr: Scalar
    outer_lr: Scalar
    control: LagControl
    memory: Any
    step: Int[Array, ""]


def init_state(
    problem: Any,
    x0: PyTree[Array],
    y0: PyTree[Array],
    key: PRNGKeyArray,
    data: AbstractData,
    inner_lr,
    outer_lr,
    memory: Any = None,
) -> SingleLoopState:
    """State with $v_0 = 0$ and the base steps of `base_steps` at $(x_0, y_0)$."""
    dtype = jnp.result_type(*jtu.tree_leaves(y0))
    steps = base_steps(problem, x0, y0, key, data, inner_lr, outer_lr)
    inner_lr, outer_lr, ceiling = (jnp.asarray(s, dtype) for s in steps)
    zero = jnp.zeros((), dtype)  # the first step counts as behind: it takes gamma_0
    return SingleLoopState(
        x=x0,
        y=y0,
        v=jtu.tree_map(jnp.zeros_like, y0),
        inner_lr=inner_lr,
        outer_lr=outer_lr,
        control=LagControl(outer_lr, ceiling, (zero, zero)),
        memory=memory,
        step=jnp.zeros((), jnp.int32),
    )


def base_steps(problem, x, y, key, data: AbstractData, inner_lr, outer_lr) -> tuple:
    """`(inner_lr, outer_lr, ceiling)`: the given steps, or estimated at $(x, y)$ from
    the largest curvature over the first draws of the data (up to `PROBE_BATCHES`, at
    most one epoch; `single_loop_step_sizes`), and the ceiling of the controlled $x$
    step (the given `outer_lr` if there is one)."""
    if inner_lr is not None and outer_lr is not None:
        return inner_lr, outer_lr, outer_lr
    draws = jnp.arange(min(data.epoch_length, PROBE_BATCHES), dtype=jnp.int32)
    batch_key, curvature_key = jr.split(key)
    upper, lower = (
        jax.vmap(draw, in_axes=(None, 0))(batch_key, draws)
        for draw in (data.upper_batch, data.lower_batch)
    )
    rho, gamma, ceiling = single_loop_step_sizes(
        problem, x, y, upper, lower, curvature_key
    )
    if outer_lr is not None:
        gamma = ceiling = outer_lr
    return (rho if inner_lr is None else inner_lr, gamma, ceiling)


def refresh_steps(
    problem: Any,
    state: SingleLoopState,
    data: AbstractData,
    key: PRNGKeyArray,
    solver: AbstractBilevelSolver,
) -> SingleLoopState:
    r"""On deterministic data, every `solver.curvature_every` steps (0: never), the
    derived base steps re-estimated at the current iterates (`base_steps`, whose
    draws of such data are the whole data); the given ones kept. `key` is the step's
    key: the estimate draws from a fold of it, apart from the step's own draws.

    The curvatures behind the steps move with $x$. On `logreg_hpo` the lower curvature
    $\mu$ falls as the regularisation weights $e^{x_j}$ shrink: an $x$ step that was
    slow next to the lag of $y$ and $v$ at $x_0$ no longer is, and the joint iteration
    diverged after about 1800 steps. On stochastic data the steps decrease over time
    and an estimate would need many batches: no refresh there."""
    inner_lr, outer_lr = solver.inner_lr, solver.outer_lr
    due = refresh_due(state.step, solver.curvature_every, data.deterministic)
    if (inner_lr is not None and outer_lr is not None) or due is False:
        return state

    def estimate(state):
        steps = base_steps(
            problem, state.x, state.y, jr.fold_in(key, 1), data, inner_lr, outer_lr
        )
        rho, gamma, ceiling = (jnp.asarray(s, state.outer_lr.dtype) for s in steps)
        control = state.control.rebound(gamma, ceiling)
        return eqx.tree_at(
            lambda s: (s.inner_lr, s.outer_lr, s.control),
            state,
            lax.stop_gradient((rho, gamma, control)),
        )

    return lax.cond(due, estimate, lambda state: state, state)


def directions(o: Oracles) -> tuple[PyTree, PyTree, PyTree]:
    """$(D_y, D_v, D_x)$ from one oracle bundle."""
    d_v = jtu.tree_map(jnp.add, o.hvp, o.upper_grad_y)
    d_x = jtu.tree_map(jnp.add, o.cross, o.upper_grad_x)
    return o.lower_grad, d_v, d_x


def draw_oracles(
    problem: Any, state: SingleLoopState, data: AbstractData, key: PRNGKeyArray
) -> tuple[Oracles, Any]:
    """The oracle bundle at the current iterates on this step's lower and upper batch
    (independent draws number `state.step` of stream 0), and the lower batch."""
    upper_key, lower_key = jr.split(key)
    upper_batch = data.upper_batch(upper_key, state.step)
    lower_batch = data.lower_batch(lower_key, state.step)
    bundle = oracles(problem, state.x, state.y, state.v, upper_batch, lower_batch)
    return bundle, lower_batch


def guarded_inner_lr(
    problem: Any,
    state: SingleLoopState,
    lower_batch: Any,
    d_y: PyTree,
    derived: bool,
    fraction: float = 0.5,
) -> Scalar:
    r"""The base step $\rho$ of $y$ and $v$ for this step: `state.inner_lr`, lowered
    when it is derived (not given) to $c / L_u$, $L_u = \|\nabla^2_{yy} g\, u\|$ the
    lower curvature along $u = D_y / \|D_y\|$ on the step's lower batch, $c$ =
    `fraction`. The estimate of `init` holds at $(x_0, y_0)$; as $x$ moves the lower
    curvature can grow (a regularisation weight $e^{x_j}$) and a step that was safe
    would let $y$ and $v$ diverge. $y$ moves along $D_y$, so the curvature along it is
    the one that matters first. Never raised; one Hessian-vector product."""
    if not derived:
        return state.inner_lr
    unit = tree_scale(inverse_or_zero(tree_norm(d_y)), d_y)
    lower = lambda w: problem.lower(state.x, w, lower_batch)  # noqa: E731
    along = tree_norm(hessian_product(lower, state.y)(unit))
    bound = fraction * inverse_or_zero(along)
    lowered = jnp.where(bound > 0, jnp.minimum(state.inner_lr, bound), state.inner_lr)
    return lax.stop_gradient(lowered.astype(state.inner_lr.dtype))


def _adapts_outer_lr(solver: AbstractBilevelSolver, data: AbstractData) -> bool:
    """Whether `controlled_outer_lr` sets the $x$ step: derived, on deterministic
    data, and constant (no decay horizon)."""
    horizon = getattr(solver, "decay_steps", None)
    return solver.outer_lr is None and data.deterministic and horizon is None


def controlled_outer_lr(
    solver: AbstractBilevelSolver,
    state: SingleLoopState,
    data: AbstractData,
    d_y: PyTree,
    d_v: PyTree,
) -> tuple[Scalar, LagControl]:
    r"""The $x$ step $\gamma_t$ of this iteration and the next control state.

    The base step `state.outer_lr`, unless it is derived on deterministic data without
    a decay horizon: then `bilevel._stepsize.lag_controlled` between the safe step
    $\gamma_0 = \tfrac12\min(1/L_\Phi, \rho\mu/L_c)$ of `single_loop_step_sizes` and
    the ceiling $\tfrac12/L_\Phi$, on the lag residuals $\|D_y\|$, $\|D_v\|$ ($y$ or
    $v$ falling behind $y^*(x)$, $v^*(x)$ makes one grow).

    Why: $\rho\mu/L_c$ is a worst case, the stability limit of a joint iteration whose
    coupling runs through the slowest lower direction, and it can be far below what a
    problem tolerates. On hyper-cleaning ($\mu/L_g \approx 4\cdot10^{-3}$) it held $x$
    at 1/500 of $\tfrac12/L_\Phi$ and no weight moved in 500 steps; that problem runs
    stably at the ceiling."""
    if not _adapts_outer_lr(solver, data):
        return state.outer_lr, state.control
    control = lag_controlled(
        state.control, state.outer_lr, (tree_norm(d_y), tree_norm(d_v))
    )
    return control.step, control


def joint_step(
    problem: Any,
    state: SingleLoopState,
    d_y: PyTree,
    d_v: PyTree,
    d_x: PyTree,
    rho,
    gamma,
) -> tuple[PyTree, PyTree, PyTree]:
    """$(x, y, v)$ after one simultaneous step along $(D_x, D_y, D_v)$."""
    y = tree_axpy(-rho, d_y, state.y)
    v = tree_axpy(-rho, d_v, state.v)
    x = apply_project_x(problem, tree_axpy(-gamma, d_x, state.x))
    return x, y, v


def direction_norm(
    problem: Any, x: PyTree, new_x: PyTree, d_x: PyTree, gamma
) -> Scalar:
    r"""$\|D_x\|$, or the gradient mapping $\|x - P_X(x - \gamma D_x)\|/\gamma$ when
    $X$ is constrained (`new_x` is $P_X(x - \gamma D_x)$)."""
    if problem.project_x is None:
        return tree_norm(d_x)
    return tree_norm(tree_sub(x, new_x)) / gamma


def oracle_metrics(o: Oracles, grad_norm: Scalar, gamma: Scalar) -> dict[str, Scalar]:
    r"""The metric contract from one oracle bundle: `upper_loss`, `grad_norm`,
    `lower_residual` $\|\nabla_y g\|$ and `linear_residual`
    $\|\nabla^2_{yy} g\, v + \nabla_y f\|$ on the step's batches, and the step's
    `outer_step` $\gamma_t$."""
    return {
        "upper_loss": o.upper_loss,
        "grad_norm": grad_norm,
        "lower_residual": tree_norm(o.lower_grad),
        "linear_residual": tree_norm(jtu.tree_map(jnp.add, o.hvp, o.upper_grad_y)),
        "outer_step": gamma,
    }


def decay_horizon(decay_steps: int | None, data: AbstractData) -> float:
    r"""$\tau$ of the decreasing schedules: `decay_steps` if given, else the data's
    epoch length, or $\infty$ (constant steps) on deterministic data, where the
    decrease that averages out the noise of the batches would only slow the method
    down."""
    if decay_steps is not None:
        return decay_steps
    return math.inf if data.deterministic else data.epoch_length


def decayed(base, step, decay, horizon: float) -> Scalar:
    r"""$\text{base}\,(1 + t/\tau)^{-a}$ with $t$ = `step`, $a$ = `decay`, $\tau$ =
    `horizon` steps."""
    t = jnp.asarray(step, jnp.result_type(base))
    return base * (1 + t / horizon) ** (-jnp.asarray(decay, t.dtype))


class SOBA(AbstractBilevelSolver):
    r"""SOBA (Dagréou, Ablin, Vaiter and Moreau, NeurIPS 2022): the stochastic
    single-loop method in which $y$, the linear-system variable $v$ and $x$ move
    together, each step drawing one lower and one upper batch.

    With $D_y = \nabla_y g$, $D_v = \nabla^2_{yy} g\, v + \nabla_y f$ and
    $D_x = \nabla^2_{xy} g\, v + \nabla_x f$ evaluated at $(x_t, y_t, v_t)$ (the
    $g$-terms on the lower batch, the $f$-terms on an independent upper batch):

    $y_{t+1} = y_t - \rho_t D_y$, $\quad v_{t+1} = v_t - \rho_t D_v$,
    $\quad x_{t+1} = P_X(x_t - \gamma_t D_x)$.

    $v$ tracks $v^*(x) = -[\nabla^2_{yy} g]^{-1}\nabla_y f$, so that $D_x$ is an
    estimate of the hypergradient $\nabla h(x) = \nabla_x f + \nabla^2_{xy} g\, v^*$.
    One gradient of $f$, one gradient of $g$ and one vector-Jacobian product of
    $\nabla_y g$ (which gives both second-order products) per step.

    **Step sizes.** The paper's analysis decreases them, $\rho_t \propto t^{-2/5}$,
    $\gamma_t \propto t^{-3/5}$; here $\rho_t = \rho_0 (1 + t/\tau)^{-2/5}$ and
    $\gamma_t = \gamma_0 (1 + t/\tau)^{-3/5}$, flat over the first $\tau$ steps (one
    epoch of the data by default; constant on deterministic data). By default
    $\rho_0 = \tfrac12 / L_g$, $L_g$ the largest lower curvature over the first
    batches, and $\gamma_0 = \tfrac12\min(1/L_\Phi,\ \rho_0\mu / L_c)$: $x$ moves
    slowly next to the lag $1/(\rho_0\mu)$ of $y$ and $v$ behind $y^*(x)$ and
    $v^*(x)$ (two time scales; $L_c$ the curvature of the hyper-objective through
    $y^*$, $\mu$ the lower curvature along its responses; see
    `bilevel._stepsize.single_loop_step_sizes`). On deterministic data (no
    `decay_steps`) the derived $\gamma_t$ moves between $\gamma_0$ and
    $\tfrac12/L_\Phi$ with the lag residuals $\|D_y\|$, $\|D_v\|$: cut in half when
    one grew, grown by 5% otherwise (`controlled_outer_lr`; a deviation from the
    paper's constant steps: the lag limit is a worst case, and on hyper-cleaning it
    held $x$ still for 500 steps). An explicit value wins.

    **Arguments:**

    - `inner_lr`: $\rho_0$, the step of $y$ and $v$ (default: from the problem).
    - `outer_lr`: $\gamma_0$, the step of $x$ (default: from the problem).
    - `inner_decay`, `outer_decay`: the exponents (defaults 2/5 and 3/5; 0 keeps the
      steps constant).
    - `decay_steps`: $\tau$ (default: the data's epoch length; on deterministic data
      such as full batches the steps stay constant).
    - `curvature_every`: on deterministic data, steps between two re-estimates of the
      derived steps at the current iterates (default 500; 0: only at `init`).

    Metrics: `upper_loss`, `grad_norm` $\|D_x\|$, `lower_residual`
    $\|\nabla_y g\|$ and `linear_residual` $\|D_v\|$, all on the step's batches, and
    `outer_step` $\gamma_t$.

    `init` needs the run's data (`bl.run` and `bl.solve` pass it) to estimate the
    default steps.

    ??? cite "References"

        ```bibtex
        @inproceedings{dagreou2022framework,
          title={A framework for bilevel optimization that enables stochastic and
                 global variance reduction algorithms},
          author={Dagr{\'e}ou, Mathieu and Ablin, Pierre and Vaiter, Samuel and
                  Moreau, Thomas},
          booktitle={Advances in Neural Information Processing Systems},
          year={2022}
        }
        ```
    """

    supports: ClassVar[frozenset[str]] = SUPPORTS
    init_needs_data: ClassVar[bool] = True

    inner_lr: float | None = positive(None, optional=True)
    outer_lr: float | None = positive(None, optional=True)
    inner_decay: float = nonnegative(0.4)
    outer_decay: float = nonnegative(0.6)
    decay_steps: int | None = count(None, optional=True)
    curvature_every: int = count(500, minimum=0)

    def unsupported_reason(self, feature: str) -> str:
        return UNSUPPORTED.get(feature, "")

    def _init(self, problem, x0, y0, key, data=None):
        return init_state(problem, x0, y0, key, data, self.inner_lr, self.outer_lr)

    def _step(self, problem, state, data, key):
        state = refresh_steps(problem, state, data, key, self)
        o, lower_batch = draw_oracles(problem, state, data, key)
        d_y, d_v, d_x = directions(o)
        base = guarded_inner_lr(problem, state, lower_batch, d_y, self.inner_lr is None)
        horizon = decay_horizon(self.decay_steps, data)
        rho = decayed(base, state.step, self.inner_decay, horizon)
        gamma, control = controlled_outer_lr(self, state, data, d_y, d_v)
        gamma = decayed(gamma, state.step, self.outer_decay, horizon)
        x, y, v = joint_step(problem, state, d_y, d_v, d_x, rho, gamma)
        grad_norm = direction_norm(problem, state.x, x, d_x, gamma)
        new_state = SingleLoopState(
            x, y, v, base, state.outer_lr, control, None, state.step + 1
        )
        return new_state, oracle_metrics(o, grad_norm, gamma)

    def _params(self, state):
        return state.x, state.y
