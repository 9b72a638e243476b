r"""MA-SOBA: SOBA with a moving average of the hypergradient estimate (Chen, Xiao and
Balasubramanian, 2023)."""

from typing import ClassVar

import jax.numpy as jnp
import jax.tree_util as jtu

from .._misc import tree_axpy, tree_norm, tree_project_ball
from .._problem import apply_project_x
from .._solver import AbstractBilevelSolver, count, fraction, nonnegative, positive
from ._soba import (
    SUPPORTS,
    UNSUPPORTED,
    SingleLoopState,
    controlled_outer_lr,
    decay_horizon,
    decayed,
    direction_norm,
    directions,
    draw_oracles,
    guarded_inner_lr,
    init_state,
    joint_step,
    oracle_metrics,
    refresh_steps,
)


class MASOBA(AbstractBilevelSolver):
    r"""MA-SOBA (Chen, Xiao and Balasubramanian, 2023): [`bilevel.solvers.SOBA`][]
    with a moving average of the hypergradient estimate, which gives the optimal
    $O(\varepsilon^{-2})$ sample complexity of single-level SGD without the
    higher-order smoothness SOBA's analysis needs.

    With SOBA's directions $(D_y, D_v, D_x)$ at $(x_t, y_t, v_t)$ on one lower and one
    upper batch:

    $h_{t+1} = (1 - \theta_t) h_t + \theta_t D_x$, $\quad
    y_{t+1} = y_t - \rho_t D_y$, $\quad v_{t+1} = \Pi_R(v_t - \rho_t D_v)$,
    $\quad x_{t+1} = P_X(x_t - \gamma_t h_{t+1})$,

    from $h_0 = 0$, $\Pi_R$ the projection on the ball of radius $R$ (none by
    default). The analysis takes $\rho$, $\gamma$, $\theta$ of order $K^{-1/2}$ for a
    horizon of $K$ steps; without a horizon, they decrease here as
    $(1 + t/\tau)^{-1/2}$ from $\rho_0$, $\gamma_0$, $\theta_0$, flat over the first
    $\tau$ steps (one epoch of the data by default).

    **Arguments:**

    - `inner_lr`: $\rho_0$ for $y$ and $v$ (default: $\tfrac12 / L_g$, the largest lower
      curvature over the first batches; see [`bilevel.solvers.SOBA`][]).
    - `outer_lr`: $\gamma_0$ for $x$ (default: from the lag of $y$ and $v$
      behind the lower solution: see [`bilevel.solvers.SOBA`][]).
    - `averaging`: $\theta_0 \in (0, 1]$ (default 1: the first step is SOBA's).
    - `decay`: the exponent of all three schedules (default 1/2; 0 keeps them
      constant).
    - `decay_steps`: $\tau$ (default: the data's epoch length; on deterministic data
      such as full batches the steps stay constant).
    - `v_radius`: $R$ (default `None`: no projection). A bound on
      $\|v^*\| \le \|\nabla_y f\| / \mu_g$ keeps $v$ bounded on hard problems.
    - `curvature_every`: on deterministic data, steps between two re-estimates of the
      derived steps at the current iterates (default 500; 0: only at `init`).

    Metrics: `upper_loss`, `grad_norm` $\|D_x\|$ (before averaging),
    `average_norm` $\|h_{t+1}\|$, `lower_residual` $\|\nabla_y g\|$ and
    `linear_residual` $\|D_v\|$, on the step's batches.

    ??? cite "References"

        ```bibtex
        @article{chen2023optimal,
          title={Optimal Algorithms for Stochastic Bilevel Optimization under Relaxed
                 Smoothness Conditions},
          author={Chen, Xuxing and Xiao, Tesi and Balasubramanian, Krishnakumar},
          journal={arXiv preprint arXiv:2306.12067},
          year={2023}
        }
        ```
    """

    supports: ClassVar[frozenset[str]] = SUPPORTS
    init_needs_data: ClassVar[bool] = True

    inner_lr: float | None = positive(None, optional=True)
    outer_lr: float | None = positive(None, optional=True)
    averaging: float = fraction(1.0)
    decay: float = nonnegative(0.5)
    decay_steps: int | None = count(None, optional=True)
    v_radius: float | None = positive(None, optional=True)
    curvature_every: int = count(500, minimum=0)

    def unsupported_reason(self, feature: str) -> str:
        return UNSUPPORTED.get(feature, "")

    def _init(self, problem, x0, y0, key, data=None):
        average = jtu.tree_map(jnp.zeros_like, x0)
        return init_state(
            problem, x0, y0, key, data, self.inner_lr, self.outer_lr, average
        )

    def _step(self, problem, state, data, key):
        state = refresh_steps(problem, state, data, key, self)
        o, lower_batch = draw_oracles(problem, state, data, key)
        d_y, d_v, d_x = directions(o)
        horizon = decay_horizon(self.decay_steps, data)
        base = guarded_inner_lr(
            problem, state, lower_batch, o.lower_grad, self.inner_lr is None
        )
        rho = decayed(base, state.step, self.decay, horizon)
        gamma, control = controlled_outer_lr(self, state, data, d_y, d_v)
        gamma = decayed(gamma, state.step, self.decay, horizon)
        theta = decayed(
            jnp.asarray(self.averaging, rho.dtype), state.step, self.decay, horizon
        )
        average = jtu.tree_map(
            lambda h, d: h + jnp.asarray(theta, d.dtype) * (d - h), state.memory, d_x
        )
        x, y, v = joint_step(problem, state, d_y, d_v, average, rho, gamma)
        v = tree_project_ball(v, self.v_radius)
        moved = x  # the mapping of D_x itself, not of the average, when X is a set
        if problem.project_x is not None:
            moved = apply_project_x(problem, tree_axpy(-gamma, d_x, state.x))
        grad_norm = direction_norm(problem, state.x, moved, d_x, gamma)
        new_state = SingleLoopState(
            x, y, v, base, state.outer_lr, control, average, state.step + 1
        )
        metrics = oracle_metrics(o, grad_norm, gamma)
        metrics["average_norm"] = tree_norm(average)
        return new_state, metrics

    def _params(self, state):
        return state.x, state.y
