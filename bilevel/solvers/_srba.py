r"""SRBA: SOBA's joint steps with SARAH-type recursive directions and periodic full
passes (Dagréou, Moreau, Vaiter and Ablin, AISTATS 2024)."""

from typing import ClassVar

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from .._oracles import oracles
from .._solver import AbstractBilevelSolver, count, positive
from ._soba import (
    SUPPORTS,
    UNSUPPORTED,
    SingleLoopState,
    controlled_outer_lr,
    direction_norm,
    directions,
    guarded_inner_lr,
    init_state,
    joint_step,
    oracle_metrics,
    refresh_steps,
)


class _Recursion(eqx.Module):
    """SRBA's memory: the current directions and the previous iterates."""

    d_y: PyTree[Array]
    d_v: PyTree[Array]
    d_x: PyTree[Array]
    x_old: PyTree[Array]
    y_old: PyTree[Array]
    v_old: PyTree[Array]


def _add_difference(d, new, old):
    return jtu.tree_map(lambda a, b, c: a + (b - c), d, new, old)


class SRBA(AbstractBilevelSolver):
    r"""SRBA (Dagréou, Moreau, Vaiter and Ablin, AISTATS 2024): the joint
    $(y, v, x)$ steps of [`bilevel.solvers.SOBA`][] along directions estimated by a
    SARAH-type recursion, restarted from a full pass over the data every $q$ steps.
    For a finite sum of $n + m$ samples it needs $O((n+m)^{1/2}\varepsilon^{-1})$
    oracle calls to reach an $\varepsilon$-stationary point, which matches the lower
    bound the same paper proves.

    With $(D_y, D_v, D_x)(y, v, x; \text{batches})$ SOBA's directions:

    - if $t \bmod q = 0$: $d^t = (D_y, D_v, D_x)(y_t, v_t, x_t)$ on the **full** data;
    - otherwise, with a fresh lower and upper batch evaluated at **both** the current
      and the previous iterates,
      $d^t = d^{t-1} + (D_y, D_v, D_x)(y_t, v_t, x_t) -
      (D_y, D_v, D_x)(y_{t-1}, v_{t-1}, x_{t-1})$;

    then $y_{t+1} = y_t - \rho d^t_y$, $v_{t+1} = v_t - \rho d^t_v$,
    $x_{t+1} = P_X(x_t - \gamma d^t_x)$ with constant $\rho$, $\gamma$.

    **Arguments:**

    - `inner_lr`: $\rho$ for $y$ and $v$ (default: $\tfrac12 / L_g$, the largest lower
      curvature over the first batches; see [`bilevel.solvers.SOBA`][]).
    - `outer_lr`: $\gamma$ for $x$ (default: from the lag of $y$ and $v$
      behind the lower solution: see [`bilevel.solvers.SOBA`][]).
    - `period`: $q$ (default: the data's epoch length, so a full pass costs about as
      much as the steps between two of them; this is the authors' benchmark setting
      $q = \frac12 (n + m) / B$ for equal batch sizes).
    - `curvature_every`: on deterministic data, steps between two re-estimates of the
      derived steps at the current iterates (default 500; 0: only at `init`).

    The data must give its whole content for the full passes ([`bilevel.Minibatch`][],
    [`bilevel.FixedBatches`][] or full batches). The paper's analysis also projects
    $y$ and $v$ onto bounded sets; like the authors' benchmark code, this
    implementation does not.

    Cost: two oracle bundles per step (the same batches at two points), one full
    bundle every $q$ steps; memory: the three directions and the previous iterates.

    Metrics: `upper_loss`, `grad_norm` $\|d_x\|$, `lower_residual` $\|\nabla_y g\|$
    and `linear_residual` $\|D_v\|$ at the current iterates on the step's batches (the
    full data on full-pass steps), and `full_pass` (1 on full-pass steps).

    ??? cite "References"

        ```bibtex
        @inproceedings{dagreou2024lower,
          title={A Lower Bound and a Near-Optimal Algorithm for Bilevel Empirical Risk
                 Minimization},
          author={Dagr{\'e}ou, Mathieu and Moreau, Thomas and Vaiter, Samuel and
                  Ablin, Pierre},
          booktitle={International Conference on Artificial Intelligence and
                     Statistics},
          year={2024}
        }
        ```
    """

    supports: ClassVar[frozenset[str]] = SUPPORTS
    init_needs_data: ClassVar[bool] = True

    inner_lr: float | None = positive(None, optional=True)
    outer_lr: float | None = positive(None, optional=True)
    period: int | None = count(None, optional=True)
    curvature_every: int = count(500, minimum=0)

    def unsupported_reason(self, feature: str) -> str:
        return UNSUPPORTED.get(feature, "")

    def _init(self, problem, x0, y0, key, data=None):
        zeros = jtu.tree_map(jnp.zeros_like, (y0, y0, x0))
        memory = _Recursion(*zeros, x0, y0, zeros[0])
        return init_state(
            problem, x0, y0, key, data, self.inner_lr, self.outer_lr, memory
        )

    def _step(self, problem, state, data, key):
        state = refresh_steps(problem, state, data, key, self)
        period = self.period or data.epoch_length
        full_upper, full_lower = data.full_upper(), data.full_lower()
        x, y, v, memory = state.x, state.y, state.v, state.memory

        derived = self.inner_lr is None

        def full_pass(_):
            o = oracles(problem, x, y, v, full_upper, full_lower)
            d = directions(o)
            return d, o, guarded_inner_lr(problem, state, full_lower, d[0], derived)

        def recursion(_):
            upper_key, lower_key = jr.split(key)
            upper_batch = data.upper_batch(upper_key, state.step)
            lower_batch = data.lower_batch(lower_key, state.step)
            o = oracles(problem, x, y, v, upper_batch, lower_batch)
            o_old = oracles(
                problem,
                memory.x_old,
                memory.y_old,
                memory.v_old,
                upper_batch,
                lower_batch,
            )
            new, old = directions(o), directions(o_old)
            d = (memory.d_y, memory.d_v, memory.d_x)
            d = tuple(map(_add_difference, d, new, old))
            return d, o, guarded_inner_lr(problem, state, lower_batch, d[0], derived)

        refresh = state.step % period == 0
        (d_y, d_v, d_x), o, rho = lax.cond(refresh, full_pass, recursion, None)
        gamma, control = controlled_outer_lr(self, state, data, d_y, d_v)
        new_x, new_y, new_v = joint_step(problem, state, d_y, d_v, d_x, rho, gamma)
        grad_norm = direction_norm(problem, x, new_x, d_x, gamma)
        memory = _Recursion(d_y, d_v, d_x, x, y, v)
        new_state = SingleLoopState(
            new_x, new_y, new_v, rho, state.outer_lr, control, memory, state.step + 1
        )
        metrics = oracle_metrics(o, grad_norm, gamma)
        metrics["full_pass"] = refresh.astype(grad_norm.dtype)
        return new_state, metrics

    def _params(self, state):
        return state.x, state.y
