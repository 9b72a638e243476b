r"""SABA: SOBA with SAGA variance reduction of every oracle (Dagréou, Ablin, Vaiter and
Moreau, NeurIPS 2022)."""

from typing import ClassVar, Literal

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from .._data import FixedBatches, as_fixed_batches
from .._misc import tree_sub
from .._oracles import Oracles, oracles
from .._solver import AbstractBilevelSolver, choice, count, positive
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


class _Saga(eqx.Module):
    """One SAGA memory: the last value seen for every batch (leading axis $K$) and
    their mean."""

    table: PyTree[Array]
    mean: PyTree[Array]


def _saga_update(memory: _Saga, index, new: PyTree) -> tuple[PyTree, _Saga]:
    r"""Direction $\text{new} - \text{table}_k + \text{mean}$ and the memory with
    $\text{table}_k \leftarrow \text{new}$, $\text{mean} \leftarrow \text{mean} +
    (\text{new} - \text{table}_k)/K$."""
    diff = tree_sub(new, jtu.tree_map(lambda t: t[index], memory.table))
    direction = jtu.tree_map(jnp.add, diff, memory.mean)
    mean = jtu.tree_map(
        lambda m, d, t: m + d / t.shape[0], memory.mean, diff, memory.table
    )
    table = jtu.tree_map(lambda t, u: t.at[index].set(u), memory.table, new)
    return direction, _Saga(table, mean)


def _lower_part(o: Oracles) -> dict:
    return {"lower_grad": o.lower_grad, "hvp": o.hvp, "cross": o.cross}


def _upper_part(o: Oracles) -> dict:
    return {"upper_grad_y": o.upper_grad_y, "upper_grad_x": o.upper_grad_x}


def _empty_memory(like: dict, num: int) -> _Saga:
    table = jtu.tree_map(lambda u: jnp.zeros((num, *jnp.shape(u)), u.dtype), like)
    return _Saga(table, jtu.tree_map(jnp.zeros_like, like))


def _full_memory(part, batch_at, num: int) -> _Saga:
    """Tables filled with every batch's values (`part(batch_at(k))`) and their mean."""
    table = lax.map(lambda k: part(batch_at(k)), jnp.arange(num))
    return _Saga(table, jtu.tree_map(lambda t: jnp.mean(t, axis=0), table))


class SABA(AbstractBilevelSolver):
    r"""SABA (Dagréou, Ablin, Vaiter and Moreau, NeurIPS 2022): the joint
    $(y, v, x)$ steps of [`bilevel.solvers.SOBA`][] with SAGA variance reduction of
    all five oracles, which makes constant steps converge to the exact solution of a
    finite-sum problem (linearly on strongly convex ones).

    The data is split into fixed batches ([`bilevel.FixedBatches`][]; a
    [`bilevel.Minibatch`][] is split with its own batch sizes, which must divide the
    numbers of samples). For every oracle $o \in \{\nabla_y g,\ \nabla^2_{yy} g\,v,\
    \nabla^2_{xy} g\,v\}$ (indexed by the lower batch) and $o \in \{\nabla_y f,\
    \nabla_x f\}$ (indexed by the upper batch) SABA keeps a table $m_o[k]$ of the last
    value computed on batch $k$ and its mean $\bar m_o$. When batch $k$ gives the new
    value $o_k$:

    $\hat o = o_k - m_o[k] + \bar m_o$, $\quad \bar m_o \leftarrow \bar m_o +
    (o_k - m_o[k])/K$, $\quad m_o[k] \leftarrow o_k$,

    and the step is SOBA's with the $\hat o$: $y \leftarrow y - \rho \hat D_y$,
    $v \leftarrow v - \rho \hat D_v$, $x \leftarrow P_X(x - \gamma \hat D_x)$, with
    constant $\rho$, $\gamma$.

    **Arguments:**

    - `inner_lr`: $\rho$ for $y$ and $v$ (default: $\tfrac12 / L_g$, the largest lower
      curvature over the first batches; see [`bilevel.solvers.SOBA`][]).
    - `outer_lr`: $\gamma$ for $x$ (default: from the lag of $y$ and $v$
      behind the lower solution: see [`bilevel.solvers.SOBA`][]).
    - `memory_init`: `"zero"` (default, as in the authors' benchmark: the tables start
      at zero and fill during the first epoch) or `"full"` (a full pass at `init`
      fills them at $(x_0, y_0, v_0 = 0)$).
    - `curvature_every`: on deterministic data, steps between two re-estimates of the
      derived steps at the current iterates (default 500; 0: only at `init`).

    **Memory:** tables of $K_g$ rows of $(2\dim y + \dim x)$ numbers and $K_f$ rows of
    $(\dim y + \dim x)$, $K$ the numbers of batches: fine for models of modest size,
    large for big networks with many batches. Cost per step: one oracle bundle (one
    gradient of $f$, one VJP of $\nabla_y g$), as SOBA.

    `init` needs the run's data (`bl.run` and `bl.solve` pass it): it sizes the
    tables.

    Metrics: `upper_loss`, `grad_norm` $\|\hat D_x\|$, `lower_residual`
    $\|\nabla_y g\|$ and `linear_residual` $\|D_v\|$ (raw values on the step's
    batches).

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
    memory_init: Literal["zero", "full"] = choice("zero", ("zero", "full"))
    curvature_every: int = count(500, minimum=0)

    def unsupported_reason(self, feature: str) -> str:
        return UNSUPPORTED.get(feature, "")

    def _init(self, problem, x0, y0, key, data=None):
        data = as_fixed_batches(data, "SABA")
        v0 = jtu.tree_map(jnp.zeros_like, y0)
        upper0, lower0 = data.upper_batch_at(0), data.lower_batch_at(0)
        like = jax.eval_shape(lambda: oracles(problem, x0, y0, v0, upper0, lower0))
        like = jtu.tree_map(lambda u: jnp.zeros(u.shape, u.dtype), like)
        if self.memory_init == "full":
            lower = _full_memory(
                lambda b: _lower_part(oracles(problem, x0, y0, v0, upper0, b)),
                data.lower_batch_at,
                data.num_lower_batches,
            )
            upper = _full_memory(
                lambda b: _upper_part(oracles(problem, x0, y0, v0, b, lower0)),
                data.upper_batch_at,
                data.num_upper_batches,
            )
        else:
            lower = _empty_memory(_lower_part(like), data.num_lower_batches)
            upper = _empty_memory(_upper_part(like), data.num_upper_batches)
        return init_state(
            problem, x0, y0, key, data, self.inner_lr, self.outer_lr, (lower, upper)
        )

    def _step(self, problem, state, data, key):
        state = refresh_steps(problem, state, data, key, self)
        data = as_fixed_batches(data, "SABA")
        lower_memory, upper_memory = state.memory
        _check_sizes(data, lower_memory, upper_memory)
        upper_key, lower_key = jr.split(key)
        i, lower_batch = data.lower_indexed(lower_key, state.step)
        j, upper_batch = data.upper_indexed(upper_key, state.step)
        o = oracles(problem, state.x, state.y, state.v, upper_batch, lower_batch)
        lower_hat, lower_memory = _saga_update(lower_memory, i, _lower_part(o))
        upper_hat, upper_memory = _saga_update(upper_memory, j, _upper_part(o))
        d_y, d_v, d_x = directions(Oracles(o.upper_loss, **upper_hat, **lower_hat))
        derived = self.inner_lr is None
        rho = guarded_inner_lr(problem, state, lower_batch, d_y, derived)
        gamma, control = controlled_outer_lr(self, state, data, d_y, d_v)
        x, y, v = joint_step(problem, state, d_y, d_v, d_x, rho, gamma)
        grad_norm = direction_norm(problem, state.x, x, d_x, gamma)
        memory = (lower_memory, upper_memory)
        new_state = SingleLoopState(
            x, y, v, rho, state.outer_lr, control, memory, state.step + 1
        )
        return new_state, oracle_metrics(o, grad_norm, gamma)

    def _params(self, state):
        return state.x, state.y


def _check_sizes(data: FixedBatches, lower: _Saga, upper: _Saga) -> None:
    rows = (
        jtu.tree_leaves(lower.table)[0].shape[0],
        jtu.tree_leaves(upper.table)[0].shape[0],
    )
    wanted = (data.num_lower_batches, data.num_upper_batches)
    if rows != wanted:
        raise ValueError(
            f"SABA: the state holds tables for {rows[0]} lower and {rows[1]} upper "
            f"batches but the data has {wanted[0]} and {wanted[1]}: pass the run's "
            "data to `init` (bl.run and bl.solve do)"
        )
