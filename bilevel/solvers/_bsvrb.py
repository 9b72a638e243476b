r"""BSVRB v1 / v2: blockwise stochastic variance-reduced methods for multi-block bilevel
problems $\min_x \frac1m\sum_{i=1}^m f_i(x, y_i^*(x))$,
$y_i^*(x) = \arg\min_{y_i} g_i(x, y_i)$ (Hu, Qiu, Guo, Zhang, Yang, ICML 2023).

Each step samples $I$ of the $m$ blocks and one upper and one lower batch per sampled
block. Per-block estimators use MSVR (multi-block single-probe variance reduction) and
the upper direction uses STORM. The two versions differ only in how a block's
hypergradient $G_i$ is estimated, a strategy object holding its own per-block state:
`_HessianTracking` (v1) and `_LinearSystemTracking` (v2). All sampled-block work is
`vmap`ped over a `(shards, blocks per shard)` grid; with a `jax.sharding.Mesh` each
shard's blocks live, and are processed, on one device.
"""

import abc
import functools as ft
from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import lineax as lx
from jaxtyping import Array, Float, Int, PyTree

from .._data import AbstractData, FullBatch, random_subset
from .._misc import tree_axpy, tree_norm, tree_project_ball, tree_sub, tree_where
from .._oracles import oracles
from .._problem import BilevelProblem, apply_project_x
from .._sharding import constrain
from .._solver import (
    AbstractBilevelSolver,
    choice,
    count,
    fraction,
    nonnegative,
    positive,
)
from .._stepsize import (
    LagControl,
    hyper_curvature,
    hyper_hessian_product,
    lag_controlled,
    lower_curvature,
    newton_point,
    operator_norm,
    refresh_due,
)


_LOWER_UPDATES = ("all", "sampled", "lazy")
_SPD_TAGS = frozenset({lx.symmetric_tag, lx.positive_semidefinite_tag})


# -------------------------------------------------------------------------------------
# One block seen as a single-block problem (what the oracle bundle takes).


class _AtBlock(eqx.Module):
    """$f_i$ or $g_i$ as a function of `(x, y_i, batch)` for a fixed block index."""

    fn: Callable
    index: Int[Array, ""]

    def __call__(self, x, y, batch):
        return self.fn(x, y, batch, self.index)


def _block_problem(problem: Any, index) -> BilevelProblem:
    """Block `index` of a `MultiBlockProblem`; a `BilevelProblem` is its own block."""
    if isinstance(problem, BilevelProblem):
        return problem
    return BilevelProblem(
        _AtBlock(problem.upper, index), _AtBlock(problem.lower, index)
    )


def _num_blocks(problem: Any) -> int:
    return 1 if isinstance(problem, BilevelProblem) else problem.num_blocks


# -------------------------------------------------------------------------------------
# MSVR and the per-block hypergradient estimators (called inside vmap over blocks).


class _MSVR(eqx.Module):
    r"""$e \leftarrow (1-a)e + (a+c)h_{\rm new} - c\,h_{\rm old}$ with $a = \alpha$,
    $c = \gamma$, or $a = 1$, $c = 0$ for a block seen for the first time."""

    alpha: Any
    gamma: Any

    def __call__(self, estimate, new, old, fresh):
        a = jnp.where(fresh, 1.0, self.alpha)
        c = jnp.where(fresh, 0.0, self.gamma)
        return jtu.tree_map(
            lambda e, h, g: (1 - a) * e + (a + c) * h - c * g, estimate, new, old
        )


class _BlockOut(eqx.Module):
    """What one sampled block contributes: its oracles at the current and previous
    points, $G_i$ at both, its new estimator rows and squared residuals for metrics."""

    upper_loss: Array
    lower_grad: PyTree[Array]
    lower_grad_prev: PyTree[Array]
    grad: PyTree[Array]
    grad_prev: PyTree[Array]
    estimator: PyTree[Array]
    residuals: dict[str, Array]


class _AbstractEstimator(eqx.Module):
    """How a version estimates a block's hypergradient $G_i$: its per-block state (a
    Module of arrays with a leading block axis), the work for one sampled block, and
    the state update after the sampled rows are known."""

    @abc.abstractmethod
    def init(self, y0: PyTree[Array]) -> eqx.Module:
        """The per-block state for stacked lower variables `y0`."""

    @abc.abstractmethod
    def block(self, problem, msvr, point, y, y_prev, state, fresh, upper, lower):
        """`_BlockOut` of one sampled block (inside vmap): `problem` is the block's
        single-block view, `point` = $(x_t, x_{t-1})$, `state` the block's rows."""

    @abc.abstractmethod
    def update(self, state, rows, scatter, move) -> eqx.Module:
        """The new state from the sampled blocks' `rows` (`_BlockOut.estimator`);
        `scatter(full, rows)` writes rows back, `move(full, direction_full,
        direction_rows, step, radius)` takes a lower-level step (see `lower_update`)."""


class _HessianState(eqx.Module):
    hessian: Float[Array, "m dy dy"]
    hessian_prev: Float[Array, "m dy dy"]


class _HessianTracking(_AbstractEstimator):
    r"""BSVRB v1: MSVR estimates $H_i \approx \nabla^2_{yy} g_i$ projected onto
    $\{H = H^\top,\ H \succeq \mu' I\}$, and $G_i = \nabla_x f_i - \nabla^2_{xy} g_i\,
    H_i^{-1}\nabla_y f_i$ (Cholesky solve), with $H_{i,t}$ at $w_t$ and $H_{i,t-1}$ at
    $w_{t-1}$ (the values before this step's update; the fresh estimate at a block's
    first visit)."""

    floor: Any

    def init(self, y0: PyTree[Array]) -> _HessianState:
        """Zero matrices: a block's first visit replaces them by a fresh estimate."""
        num_blocks = jtu.tree_leaves(y0)[0].shape[0]
        size = jfu.ravel_pytree(jtu.tree_map(lambda u: u[0], y0))[0].size
        dtype = jnp.result_type(*jtu.tree_leaves(y0))
        hessian = jnp.zeros((num_blocks, size, size), dtype)
        return _HessianState(hessian, hessian)

    def block(self, problem, msvr, point, y, y_prev, state, fresh, upper, lower):
        x, x_prev = point
        hessian, hessian_prev = state.hessian, state.hessian_prev
        _, unravel = jfu.ravel_pytree(y)

        def at(x_, y_):
            # first-order oracles (the products with v = 0 are unused and compiled away)
            zeros = jtu.tree_map(jnp.zeros_like, y_)
            out = oracles(problem, x_, y_, zeros, upper, lower)
            flat = jfu.ravel_pytree(y_)[0]
            hess = jax.jacfwd(
                lambda w: jfu.ravel_pytree(problem.condition(x_, unravel(w), lower))[0]
            )(flat)
            return out, hess

        now, hess = at(x, y)
        before, hess_prev = at(x_prev, y_prev)
        new = project_hessian(msvr(hessian, hess, hess_prev, fresh), self.floor)
        used = jnp.where(fresh, new, hessian)
        used_prev = jnp.where(fresh, new, hessian_prev)

        def hypergrad(x_, y_, out, matrix):
            w = unravel(_spd_solve(matrix, jfu.ravel_pytree(out.upper_grad_y)[0]))
            cross = oracles(problem, x_, y_, w, upper, lower).cross
            return tree_sub(out.upper_grad_x, cross)

        return _BlockOut(
            upper_loss=now.upper_loss,
            lower_grad=now.lower_grad,
            lower_grad_prev=before.lower_grad,
            grad=hypergrad(x, y, now, used),
            grad_prev=hypergrad(x_prev, y_prev, before, used_prev),
            estimator=(new, used),
            residuals={},
        )

    def update(self, state, rows, scatter, move) -> _HessianState:
        new, used = rows
        return _HessianState(scatter(state.hessian, new), scatter(state.hessian, used))


class _LinearSystemState(eqx.Module):
    v: PyTree[Array]
    v_prev: PyTree[Array]
    s: PyTree[Array]


class _LinearSystemTracking(_AbstractEstimator):
    r"""BSVRB v2: $v_i \approx (\nabla^2_{yy} g_i)^{-1}\nabla_y f_i$ takes steps
    $v_i \leftarrow \Pi_{\|v\|\le C_v}(v_i - \tau_v d_i s_i)$ on $q_i(v) = \frac12
    v^\top\nabla^2_{yy} g_i v - v^\top\nabla_y f_i$, whose gradient $s_i$ is
    MSVR-tracked (Hessian-vector products only); $G_i = \nabla_x f_i -
    \nabla^2_{xy} g_i\, v_i$."""

    step_size: Any
    radius: Any

    def init(self, y0: PyTree[Array]) -> _LinearSystemState:
        zeros = jtu.tree_map(jnp.zeros_like, y0)
        return _LinearSystemState(zeros, zeros, zeros)

    def block(self, problem, msvr, point, y, y_prev, state, fresh, upper, lower):
        x, x_prev = point
        now = oracles(problem, x, y, state.v, upper, lower)
        before = oracles(problem, x_prev, y_prev, state.v_prev, upper, lower)
        q = tree_sub(now.hvp, now.upper_grad_y)
        q_prev = tree_sub(before.hvp, before.upper_grad_y)
        return _BlockOut(
            upper_loss=now.upper_loss,
            lower_grad=now.lower_grad,
            lower_grad_prev=before.lower_grad,
            grad=tree_sub(now.upper_grad_x, now.cross),
            grad_prev=tree_sub(before.upper_grad_x, before.cross),
            estimator=msvr(state.s, q, q_prev, fresh),
            residuals={"linear_residual": tree_norm(q) ** 2},
        )

    def update(self, state, rows, scatter, move) -> _LinearSystemState:
        s = scatter(state.s, rows)
        v = move(state.v, s, rows, self.step_size, self.radius)
        return _LinearSystemState(v, state.v, s)


def _block_step(
    estimator, problem, msvr, point, y, y_prev, u, state, fresh, batches, index
):
    """One sampled block: the estimator's oracles and $G_i$, and the MSVR of
    $u_i \\approx \\nabla_y g_i$, and $\\|\\nabla_y g_i\\|^2$."""
    upper, lower = batches
    out = estimator.block(
        _block_problem(problem, index),
        msvr,
        point,
        y,
        y_prev,
        state,
        fresh,
        upper,
        lower,
    )
    u = msvr(u, out.lower_grad, out.lower_grad_prev, fresh)
    return out, u, tree_norm(out.lower_grad) ** 2


def project_hessian(matrix: Float[Array, "n n"], floor) -> Float[Array, "n n"]:
    r"""Euclidean (Frobenius) projection onto $\{H = H^\top,\ H \succeq \mu' I\}$:
    symmetrise, then clip the eigenvalues at $\mu'$ = `floor`."""
    sym = 0.5 * (matrix + matrix.T)
    values, vectors = jnp.linalg.eigh(sym)
    return (vectors * jnp.maximum(values, floor)[None, :]) @ vectors.T


def _spd_solve(matrix, rhs):
    operator = lx.MatrixLinearOperator(matrix, _SPD_TAGS)
    return lx.linear_solve(operator, rhs, lx.Cholesky(), throw=False).value


# -------------------------------------------------------------------------------------
# The solver.


class _StepSizes(eqx.Module):
    r"""$\eta$, $\tau$, $\tau_v$ and $\mu'$: given, or estimated at the first step."""

    eta: Array
    tau: Array
    tau_v: Array
    hessian_floor: Array


class _BSVRBState(eqx.Module):
    x: PyTree[Array]
    x_prev: PyTree[Array]
    y: PyTree[Array]
    y_prev: PyTree[Array]
    u: PyTree[Array]
    estimator: _HessianState | _LinearSystemState
    z: PyTree[Array]
    last_sampled: Int[Array, " m"]
    step: Int[Array, ""]
    sampling_key: Array
    steps: _StepSizes
    control: LagControl
    single_block: bool = eqx.field(static=True)


class BSVRB(AbstractBilevelSolver):
    r"""Blockwise stochastic variance-reduced bilevel method, BSVRB$^{v1}$ and
    BSVRB$^{v2}$ (Hu et al., ICML 2023), for a [`bilevel.MultiBlockProblem`][]
    $\min_x \frac1m\sum_i f_i(x, y_i^*(x))$; a [`bilevel.BilevelProblem`][] is solved
    as one block ($m = 1$).

    Step $t$ samples a set $I_t$ of $I$ blocks (without replacement) and, for each
    $i \in I_t$, an upper batch $\xi_i$ and a lower batch $\zeta_i$. Every stochastic
    oracle $h_i$ is evaluated on the **same** batch at the current point
    $w_t = (x_t, y_{i,t}, \cdot)$ and the previous one $w_{t-1}$, and tracked by MSVR,

    $e_i \leftarrow (1-\alpha)\,e_i + (\alpha+\gamma)\,h_i(w_t) - \gamma\,h_i(w_{t-1})$
    for $i \in I_t$ (other blocks keep $e_i$),

    with $u_i \approx \nabla_y g_i$ in both versions. The hypergradient estimate
    $G_t = \frac1I\sum_{i\in I_t} G_i(w_t)$ and its value $G_t^{\rm prev}$ at
    $w_{t-1}$ (same blocks and batches) drive STORM and the upper step,

    $z_{t+1} = (1-\beta_t)(z_t - G_t^{\rm prev}) + G_t$,
    $\quad x_{t+1} = P_X(x_t - \eta\, z_{t+1})$,

    and the lower step is $y_i \leftarrow y_i - \tau\, d_i\, u_i$ (see `lower_update`).
    The versions differ in $G_i$ only:

    - **v1** (small $d_y$) tracks Hessians $H_i \approx \nabla^2_{yy} g_i$ by MSVR and
      projects them onto $\{H = H^\top,\ H \succeq \mu' I\}$ (symmetrise, clip
      eigenvalues at $\mu'$ = `hessian_floor`); $G_i = \nabla_x f_i -
      \nabla^2_{xy} g_i\, H_i^{-1} \nabla_y f_i$ with a Cholesky solve, using $H_{i,t}$
      at $w_t$ and $H_{i,t-1}$ at $w_{t-1}$ (the values before this step's update).
    - **v2** (large $d_y$) never forms a Hessian: $v_i \approx (\nabla^2_{yy} g_i)^{-1}
      \nabla_y f_i$ takes steps $v_i \leftarrow \Pi(v_i - \tau_v d_i s_i)$ on the
      quadratic $q_i(v) = \frac12 v^\top \nabla^2_{yy} g_i v - v^\top \nabla_y f_i$,
      whose gradient $s_i$ is MSVR-tracked (Hessian-vector products only), $\Pi$ the
      projection onto $\{\|v\| \le C_v\}$ if `v_radius` $= C_v$ is given;
      $G_i = \nabla_x f_i - \nabla^2_{xy} g_i\, v_i$.

    **Arguments** (a step size or weight left at `None` is derived from the problem,
    see *Defaults*):

    - `version`: 1 or 2 (default 2).
    - `blocks_per_step`: $I$ (default `None`: all $m$ blocks).
    - `eta`, `tau`, `tau_v`: step sizes of $x$, $y_i$, $v_i$.
    - `beta`: STORM weight $\beta \in (0, 1]$, constant when given.
    - `alpha`: MSVR weight $\alpha \in (0, 1]$.
    - `gamma`: MSVR correction weight $\gamma \ge 0$, or `"auto"` (default):
      $\gamma = (1-\alpha)\,m/I$.
    - `v_radius`: $C_v$ of the v2 ball projection (default `None`: no projection).
    - `hessian_floor`: $\mu'$, the eigenvalue floor of the v1 projection; keep it
      below the strong convexity of the $g_i$.
    - `lower_update`: which $y_i$ (and, in v2, $v_i$) move each step. `"sampled"`
      (default): only $i \in I_t$, $d_i = 1$. `"all"` (the eager form of the official
      v1 code): every block, unsampled ones with their stale $u_i$, $d_i = 1$. `"lazy"`
      (the official v2 code): only $i \in I_t$, with $d_i$ = the number of steps since
      block $i$ was last sampled. With $I = m$ the three coincide.
    - `block_sampling`: `"epoch"` (default, as in the official code): each epoch of
      $m/I$ steps visits the blocks in a fresh random order, $I$ at a time (the last
      $m \bmod I$ of each order are skipped); `"independent"`: a fresh uniform subset
      every step. Either way a block is in $I_t$ with probability $I/m$.
    - `num_shards`: the blocks are split into this many contiguous equal groups and
      $I/\text{num\_shards}$ blocks are sampled from each (stratified sampling).
      Default: the mesh's size along `mesh_axis`, or 1. It must divide $m$ and $I$.
    - `curvature_every`: on deterministic data, steps between two re-estimates of the
      derived step sizes at the current iterates (default 500; 0: step 0 only).
    - `mesh`, `mesh_axis`: shard over devices (below).

    **Defaults.** At the first step, on the first sampled blocks and batches at
    $(x_0, y_0)$: $L_g = \max_i \|\nabla^2_{yy} g_i\|$ and $L_F$, the norm of the
    blocks' mean hyper-objective Hessian linearised in $y$ at the blocks' Newton
    points (power iterations, `bilevel._stepsize.hyper_hessian_product`), and per
    block the curvature $L_c$ of
    its hyper-objective through $y_i^*$ and the lower curvature $\mu$ along the
    responses of $y_i^*$ and $v_i^*$ (`bilevel._stepsize.hyper_curvature`; largest
    $L_c$, smallest $\mu$ over the blocks). Then $\tau = \tau_v = 0.5/L_g$,
    $\eta = \min(0.2/L_F,\ \tau\mu/L_c)$ ($x$ slow next to the lag of $y_i$
    and $v_i$, as for [`bilevel.solvers.SOBA`][]), $\mu' = 10^{-6} L_g$;
    $\beta_t = \max(1/(t+1), 10^{-3})$ ($z$ is the running mean of the corrected
    estimates, then an exponential average over about $10^3$ steps); $\alpha = 1$
    when the data are deterministic (a block's oracles are then exact at each
    visit) and $0.1$ otherwise. Multiplying every $g_i$ by $s$ and every $f_i$ by $t$
    scales $L_g$, $\mu$ by $s$ and $L_F$, $L_c$ by $t$: the iterates $x_t$ do not
    change. On deterministic data the derived steps are estimated again every
    `curvature_every` steps at the current iterates: the curvatures move with $x$ (on
    `logreg_hpo` $\mu$ falls as the weights $e^{x_j}$ shrink, and the step of $x_0$
    left $x$ crawling: validation loss 0.237 after 2000 steps against 0.030 with the
    re-estimates, baseline 0.072). An explicit value always wins.

    **Per-block data.** Block $i$'s objectives are called as $f_i$ = `upper(x, y_i,
    batch, i)` and $g_i$ = `lower(x, y_i, batch, i)`, with `i` an int32 scalar. For the
    $s$-th sampled block of step $t$ the batches come from `data` with a key of its own
    (one split of the step's key) and draw count $tI + s$: from
    `data.block_upper_batch(key, draw, i)` / `data.block_lower_batch(key, draw, i)` when
    `data` has them (per-block rows, [`bilevel.BlockMinibatch`][]), otherwise from
    `data.upper_batch(key, draw)`, a pool shared by all blocks ([`bilevel.FullBatch`][],
    [`bilevel.Minibatch`][]), the objectives reading their block's part through `i`.
    The batch size $B$ is the data's (`batch_size=`).

    **Sharding.** Pass `mesh=jax.make_mesh((n,), ("blocks",))`: $y$, $u$, the
    estimator state ($H$ or $v$, $s$), their previous copies and the bookkeeping arrays
    are sharded along the block axis over `mesh_axis`, $x$ and $z$ are replicated, and
    each device samples and processes blocks from its own shards (`num_shards`
    defaults to the device count), so only the $d_x$-sized sum over sampled blocks
    crosses devices. The same code runs on one device; `BSVRB(num_shards=n)` without a
    mesh makes the same draws, so both runs agree to rounding. $m$ and $I$ must be
    multiples of `num_shards`. Batches are drawn from replicated data.

    ```python
    # on CPU, simulate devices with XLA_FLAGS=--xla_force_host_platform_device_count=4
    mesh = jax.make_mesh((jax.device_count(),), ("blocks",))
    solver = bl.solvers.BSVRB(blocks_per_step=8, mesh=mesh)
    state, history = bl.run(problem, solver, x0, y0, data, 1000, key)
    state.y.sharding  # NamedSharding(mesh, PartitionSpec("blocks"))
    ```

    **Initialisation.** $x_{-1} = x_0$, $y_{-1} = y_0$, $u = s = v = z = 0$ (no random
    estimators, so the first correction is not made of noise). The first time a block
    is sampled its estimators take $\alpha = 1$, $\gamma = 0$ (they start from that
    sample), and in v1 its Hessian term uses that fresh estimate; the first step takes
    $\beta = 1$ ($z_1 = G_0$).

    Metrics (sampled blocks, at the step's iterate): `upper_loss` $\frac1I\sum f_i$,
    `grad_norm` $\|G_t\|$ (the gradient mapping $\|x_t - P_X(x_t - \eta G_t)\|/\eta$
    with a set $X$), `lower_residual` $(\frac1I\sum\|\nabla_y g_i\|^2)^{1/2}$ (with
    $m = 1$: $\|\nabla_y g\|$), `direction_norm` $\|z_{t+1}\|$ (the update direction),
    and in v2 `linear_residual` $(\frac1I\sum\|\nabla^2_{yy}g_i v_i - \nabla_y
    f_i\|^2)^{1/2}$.

    !!! info "Deviations from the paper and its code"
        The v1 projection is a true projection onto $\{H \succeq \mu' I\}$, not the
        code's Frobenius rescaling; there is no `batch_size` field (the data set $B$,
        as for every solver). `gamma="auto"` is $(1-\alpha)m/I$, which makes MSVR
        unbiased for an oracle drifting linearly between two visits of a block (they
        are $m/I$ steps apart on average) and equals STORM's $1-\alpha$ at $I = m$; the
        theory's $\frac{m-I}{I(1-\alpha)} + (1-\alpha)$ agrees with it for small
        $\alpha$ but grows without bound as $\alpha \to 1$.

    ??? cite "References"
        ```bibtex
        @inproceedings{hu2023blockwise,
          title={Blockwise Stochastic Variance-Reduced Methods with Parallel Speedup
                 for Multi-Block Bilevel Optimization},
          author={Hu, Quanqi and Qiu, Zi-Hao and Guo, Zhishuai and Zhang, Lijun and
                  Yang, Tianbao},
          booktitle={International Conference on Machine Learning},
          year={2023}
        }
        ```
    """

    supports: ClassVar[frozenset[str]] = frozenset(
        {"single_block", "multi_block", "project_x", "stochastic"}
    )

    version: int = choice(2, (1, 2))
    blocks_per_step: int | None = count(None, optional=True)
    eta: float | None = nonnegative(None, optional=True)
    beta: float | None = fraction(None, optional=True)
    alpha: float | None = fraction(None, optional=True)
    gamma: float | str = nonnegative("auto", words=("auto",))
    tau: float | None = positive(None, optional=True)
    tau_v: float | None = positive(None, optional=True)
    v_radius: float | None = positive(None, optional=True)
    hessian_floor: float | None = positive(None, optional=True)
    lower_update: str = choice("sampled", _LOWER_UPDATES)
    block_sampling: str = choice("epoch", ("epoch", "independent"))
    num_shards: int | None = count(None, optional=True)
    curvature_every: int = count(500, minimum=0)
    mesh: jax.sharding.Mesh | None = eqx.field(static=True, default=None)
    mesh_axis: str = eqx.field(static=True, default="blocks")

    def __check_init__(self):
        if self.mesh is None:
            return
        if self.mesh_axis not in self.mesh.axis_names:
            raise ValueError(
                f"BSVRB: `mesh_axis={self.mesh_axis!r}` is not an axis of the mesh "
                f"{self.mesh.axis_names}"
            )
        devices = self.mesh.shape[self.mesh_axis]
        if self.num_shards is not None and self.num_shards % devices:
            raise ValueError(
                f"BSVRB: `num_shards={self.num_shards}` must be a multiple of the "
                f"mesh size {devices} along {self.mesh_axis!r}"
            )

    # -- configuration resolved against the problem ------------------------------------

    def _estimator(self, steps: _StepSizes | None = None):
        if self.version == 1:
            return _HessianTracking(None if steps is None else steps.hessian_floor)
        return _LinearSystemTracking(
            None if steps is None else steps.tau_v, self.v_radius
        )

    def _shards(self) -> int:
        if self.num_shards is not None:
            return self.num_shards
        return 1 if self.mesh is None else self.mesh.shape[self.mesh_axis]

    def _sizes(self, problem) -> tuple[int, int, int]:
        """$(m, I, S)$: blocks, blocks per step, shards."""
        num_blocks = _num_blocks(problem)
        return num_blocks, self.blocks_per_step or num_blocks, self._shards()

    def _beta(self, step, dtype):
        if self.beta is not None:
            return self.beta
        return jnp.maximum(_BETA, 1 / (step.astype(dtype) + 1))

    def _alpha(self, data: AbstractData):
        if self.alpha is not None:
            return self.alpha
        return 1.0 if data.deterministic else _STOCHASTIC_ALPHA

    def _gamma(self, alpha, num_blocks: int, per_step: int):
        r"""$\gamma = (1-\alpha)\,m/I$ for `"auto"`."""
        if not isinstance(self.gamma, str):
            return self.gamma
        return (1 - alpha) * num_blocks / per_step

    def _validate(self, problem) -> None:
        num_blocks, per_step, shards = self._sizes(problem)
        if per_step > num_blocks:
            raise ValueError(
                f"BSVRB: `blocks_per_step={per_step}` exceeds num_blocks={num_blocks}"
            )
        if num_blocks % shards or per_step % shards:
            raise ValueError(
                f"BSVRB: num_blocks={num_blocks} and blocks_per_step={per_step} must "
                f"both be multiples of num_shards={shards}"
            )

    # -- sharding ----------------------------------------------------------------------

    def _place(self, tree: PyTree, blocked: bool) -> PyTree:
        """Shard the leading (block) axis over the mesh, or replicate; no-op without."""
        if self.mesh is None:
            return tree
        spec = jax.sharding.PartitionSpec(self.mesh_axis if blocked else None)
        return constrain(tree, jax.sharding.NamedSharding(self.mesh, spec))

    # -- interface ---------------------------------------------------------------------

    def _init(self, problem, x0, y0, key) -> _BSVRBState:
        self._validate(problem)
        single = isinstance(problem, BilevelProblem)
        if single:  # one block: a leading block axis of size 1
            y0 = jtu.tree_map(lambda u: u[None], y0)
        y0 = self._place(y0, True)
        x0 = self._place(x0, False)
        dtype = jnp.result_type(*jtu.tree_leaves(x0))
        zero = jnp.zeros((), dtype)
        return _BSVRBState(
            x=x0,
            x_prev=x0,
            y=y0,
            y_prev=y0,
            u=jtu.tree_map(jnp.zeros_like, y0),
            estimator=self._place(self._estimator().init(y0), True),
            z=jtu.tree_map(jnp.zeros_like, x0),
            last_sampled=self._place(jnp.full((_num_blocks(problem),), -1), True),
            step=jnp.array(0),
            sampling_key=key,
            steps=self._given_steps(dtype),
            # bounded at step 0; lag: the lower residual and v2's linear-system one
            control=LagControl(zero, zero, (zero,) * (1 + (self.version == 2))),
            single_block=single,
        )

    def _params(self, state):
        if state.single_block:
            return state.x, jtu.tree_map(lambda u: u[0], state.y)
        return state.x, state.y

    def _step(self, problem, state, data, key):
        num_blocks, per_step, shards = self._sizes(problem)
        if getattr(data, "num_blocks", None) not in (None, num_blocks):
            raise ValueError(
                f"BSVRB: the data has {data.num_blocks} blocks but the problem has "
                f"num_blocks={num_blocks}"
            )
        local, blocks, batches = self._sample(problem, state, data, key)

        def rows(tree):
            return _gather(tree, local, shards)

        def scatter(tree, new_rows):
            return _scatter(tree, local, new_rows, shards)

        last = rows(state.last_sampled)
        fresh = last < 0
        steps, control = self._step_sizes(
            problem, state, batches, blocks, local, key, data.deterministic
        )
        estimator = self._estimator(steps)
        alpha = self._alpha(data)
        msvr = _MSVR(alpha, self._gamma(alpha, num_blocks, per_step))
        (batches, batch_axes) = batches
        fn = ft.partial(_block_step, estimator, problem, msvr, (state.x, state.x_prev))
        args = (
            rows(state.y),
            rows(state.y_prev),
            rows(state.u),
            rows(state.estimator),
            fresh,
        )
        in_axes = (0,) * len(args) + (batch_axes, 0)
        out, u_rows, lower_sq = _vmap2(fn, in_axes)(*args, batches, blocks)

        grad = _mean_over_slots(out.grad)
        grad_prev = _mean_over_slots(out.grad_prev)
        beta = self._beta(state.step, steps.eta.dtype)
        storm = tree_axpy(1 - beta, tree_sub(state.z, grad_prev), grad)
        z = tree_where(state.step == 0, grad, storm)
        squares = {"lower_residual": lower_sq, **out.residuals}
        residuals = {name: _root_mean_square(sq) for name, sq in squares.items()}
        eta = steps.eta
        if self._controls_eta(data, num_blocks, per_step):
            control = lag_controlled(control, steps.eta, tuple(residuals.values()))
            eta = control.step
        x = apply_project_x(problem, tree_axpy(-eta, z, state.x))

        scale = self._lower_scale(state.step, last, fresh, steps.tau.dtype)

        def move(full, direction_full, direction_rows, lr, radius=None):
            return self._move(
                full,
                direction_full,
                direction_rows,
                rows(full),
                scale,
                lr,
                scatter,
                radius,
            )

        u = scatter(state.u, u_rows)
        y = move(state.y, u, u_rows, steps.tau)
        estimator_state = estimator.update(
            state.estimator, out.estimator, scatter, move
        )
        last_sampled = scatter(
            state.last_sampled, jnp.broadcast_to(state.step, local.shape)
        )
        blocked = self._place((y, u, estimator_state, last_sampled), True)
        new_state = _BSVRBState(
            x=self._place(x, False),
            x_prev=state.x,
            y=blocked[0],
            y_prev=state.y,
            u=blocked[1],
            estimator=blocked[2],
            z=self._place(z, False),
            last_sampled=blocked[3],
            step=state.step + 1,
            sampling_key=state.sampling_key,
            steps=steps,
            control=control,
            single_block=state.single_block,
        )
        metrics = {
            "upper_loss": jnp.mean(out.upper_loss),
            "grad_norm": _grad_norm(problem, state.x, grad, eta),
            "outer_step": eta,
            "direction_norm": tree_norm(z),
            **residuals,
        }
        return new_state, metrics

    # -- step sizes --------------------------------------------------------------------

    def _given_steps(self, dtype) -> _StepSizes:
        """The explicit step sizes (zeros in place of those estimated at step 0)."""
        return _StepSizes(
            *(
                jnp.asarray(0 if value is None else value, dtype)
                for value in self._steps()
            )
        )

    def _steps(self) -> tuple:
        return self.eta, self.tau, self.tau_v, self.hessian_floor

    def _derives_steps(self) -> bool:
        needed = [self.eta, self.tau]
        needed.append(self.hessian_floor if self.version == 1 else self.tau_v)
        return any(value is None for value in needed)

    def _controls_eta(self, data, num_blocks: int, per_step: int) -> bool:
        r"""Whether $\eta$ follows the lag (`bilevel._stepsize.lag_controlled`):
        derived, on deterministic data, every block sampled at every step (so that
        successive residuals are comparable)."""
        return self.eta is None and data.deterministic and per_step == num_blocks

    def _step_sizes(
        self, problem, state, batches, blocks, local, key, deterministic: bool
    ) -> tuple[_StepSizes, LagControl]:
        """The state's step sizes, with the missing ones estimated at step 0 on the
        first sampled blocks and batches, and again every `curvature_every` steps
        on deterministic data at the current iterates (`lax.cond`: the other steps
        skip the work), and the lag control with the bounds of the estimate."""
        if not self._derives_steps():
            return state.steps, state.control
        refresh = refresh_due(state.step, self.curvature_every, deterministic)
        _, _, shards = self._sizes(problem)
        y = _gather(state.y, local, shards)

        def estimate(_):
            curvatures = _curvatures(
                problem, state.x, y, batches, blocks, jr.fold_in(key, 1)
            )
            derived, ceiling = _default_steps(*curvatures)
            steps = _StepSizes(
                *(
                    old if value is not None else new.astype(old.dtype)
                    for value, old, new in zip(
                        self._steps(),
                        jtu.tree_leaves(state.steps),
                        jtu.tree_leaves(derived),
                    )
                )
            )
            ceiling = jnp.maximum(ceiling.astype(steps.eta.dtype), steps.eta)
            return steps, state.control.rebound(steps.eta, ceiling)

        due = (state.step == 0) | refresh
        return lax.cond(due, estimate, lambda _: (state.steps, state.control), None)

    def _sample(self, problem, state, data, key):
        """Sampled blocks (local indices and global ones, `(shards, per_shard)`) and
        their upper and lower batches with their vmap axes."""
        num_blocks, per_step, shards = self._sizes(problem)
        per_shard, shard_size = per_step // shards, num_blocks // shards
        # one split for every key of the step (each random call site costs compile time)
        keys = jr.split(key, 1 + 2 * per_step)
        slot_keys = keys[1:].reshape((2, shards, per_shard) + keys.shape[1:])
        everything = per_step == num_blocks
        if self.block_sampling == "epoch" and not everything:
            local = _epoch_blocks(
                state.sampling_key, state.step, shards, shard_size, per_shard
            )
        else:
            local = _sample_blocks(keys[0], shards, shard_size, per_shard, everything)
        local = self._place(local, True)
        offsets = (jnp.arange(shards, dtype=jnp.int32) * shard_size)[:, None]
        blocks = local + offsets
        slots = jnp.arange(per_step).reshape(shards, per_shard)
        draws = state.step * per_step + slots
        upper, upper_axis = _block_batches(
            data, slot_keys[0], draws, blocks, upper=True
        )
        lower, lower_axis = _block_batches(
            data, slot_keys[1], draws, blocks, upper=False
        )
        return local, blocks, ((upper, lower), (upper_axis, lower_axis))

    # -- lower-level steps -------------------------------------------------------------

    def _lower_scale(self, step, last, fresh, dtype):
        """$d_i$ for the sampled blocks: 1, or the steps since the last visit (lazy)."""
        if self.lower_update != "lazy":
            return jnp.ones(last.shape, dtype)
        return jnp.where(fresh, 1, step - last).astype(dtype)

    def _move(
        self,
        full,
        direction_full,
        direction_rows,
        current_rows,
        scale,
        lr,
        scatter,
        radius,
    ):
        r"""$w_i \leftarrow \Pi(w_i - \text{lr}\, d_i\, e_i)$ on every block (`"all"`)
        or on the sampled ones, $\Pi$ the projection onto the ball of radius `radius`
        (none for `None`)."""
        if self.lower_update == "all":
            moved = tree_axpy(-lr, direction_full, full)
            if radius is not None:
                moved = jax.vmap(lambda w: tree_project_ball(w, radius))(moved)
            return moved
        step = jtu.tree_map(lambda e: _times_rows(-lr * scale, e), direction_rows)
        moved = jtu.tree_map(jnp.add, current_rows, step)
        if radius is not None:
            moved = _vmap2(lambda w: tree_project_ball(w, radius), (0,))(moved)
        return scatter(full, moved)


# Default steps: fractions of the inverse curvatures (module constants, documented on
# the class and on docs/solvers/bsvrb.md).
_LOWER_FRACTION = 0.5
_UPPER_FRACTION = 0.2
_FLOOR_FRACTION = 1e-6
_BETA = 1e-3
_STOCHASTIC_ALPHA = 0.1
_LAG_FRACTION = 1.0  # of the lag bound tau mu / L_c (see `_default_steps`)
_FLOOR_LAG = 1e-3  # mu is at least this fraction of L_g
_NEWTON_STEPS = 50  # CG products of the Newton point of `_curvatures`


def _default_steps(lower, upper, coupling, lagging) -> tuple[_StepSizes, Array]:
    r"""$\tau = \tau_v = c_y / L_g$, $\mu' = c_\mu L_g$ and
    $\eta = \min(c_x / L_F,\ c_{\rm lag}\,\tau\mu / L_c)$ from the estimates $L_g$
    (lower), $L_F$ (upper), $L_c$ (`coupling`) and $\mu$ (`lagging`, floored at
    $10^{-3} L_g$); a zero estimate borrows the other, a non-finite $L_c$ drops the
    lag bound. With them the ceiling $c_x / L_F$ of the lag-controlled $\eta$."""
    lower = jnp.where(lower > 0, lower, jnp.where(upper > 0, upper, 1.0))
    upper = jnp.where(upper > 0, upper, lower)
    tau = _LOWER_FRACTION / lower
    lagging = jnp.where(lagging > _FLOOR_LAG * lower, lagging, _FLOOR_LAG * lower)
    safe = jnp.isfinite(coupling) & (coupling > 0)
    lag_limit = _LAG_FRACTION * tau * lagging / jnp.where(safe, coupling, 1.0)
    eta = jnp.minimum(_UPPER_FRACTION / upper, jnp.where(safe, lag_limit, jnp.inf))
    ceiling = _UPPER_FRACTION / upper
    return _StepSizes(eta, tau, tau, _FLOOR_FRACTION * lower), ceiling


def _curvatures(problem, x, y, batches, blocks, key):
    r"""$L_g = \max_i \|\nabla^2_{yy} g_i\|$ over the sampled blocks, $L_F =
    \|\frac1I\sum_i \nabla^2\tilde F_i\|$ (power iterations; see
    `bilevel._stepsize.hyper_hessian_product`) at the blocks' Newton points
    $\hat y_i = y_i - (\nabla^2_{yy} g_i)^{-1}\nabla_y g_i$ (at $y_i = 0$ the
    sensitivity of a weight decay $e^x y$ vanishes: on `logreg_hpo`, $L_F$ was 0
    at $y_0$ and the step fell back on $0.2/L_g$, 1/180 of the lag bound, and $x$
    crawled), and over the blocks the largest
    curvature $L_c$ of a block's hyper-objective through $y_i^*$ and the smallest lower
    curvature $\mu$ along its responses (`bilevel._stepsize.hyper_curvature`), at
    $(x, y_i)$ on the blocks' batches."""
    (values, axes), (lower_key, upper_key, lag_key) = batches, jr.split(key, 3)
    in_axes = (0, axes, 0)

    def lower(y_i, batch, index):
        block = _block_problem(problem, index)
        return lower_curvature(block, x, y_i, batch[1], lower_key)

    def newton(y_i, batch, index):
        block = _block_problem(problem, index)
        condition = lambda u, w: block.condition(u, w, batch[1])  # noqa: E731
        return newton_point(condition, x, y_i, _NEWTON_STEPS)[0]

    y_hat = _vmap2(newton, in_axes)(y, values, blocks)

    def matvec(direction):
        def product(y_i, batch, index):
            block = _block_problem(problem, index)
            return hyper_hessian_product(block, x, y_i, direction, *batch)

        return _mean_over_slots(_vmap2(product, in_axes)(y_hat, values, blocks))

    def lag(y_i, batch, index):
        block = _block_problem(problem, index)
        upper_batch, lower_batch = batch
        coupling, lagging, _ = hyper_curvature(
            lambda u, w: block.upper(u, w, upper_batch),
            lambda u, w: block.condition(u, w, lower_batch),
            x,
            y_i,
            lag_key,
            coupling_only=True,
        )
        return coupling, lagging

    lower_max = jnp.max(_vmap2(lower, in_axes)(y, values, blocks))
    couplings, laggings = _vmap2(lag, in_axes)(y, values, blocks)
    hyper = operator_norm(matvec, x, upper_key)
    return lower_max, hyper, jnp.max(couplings), jnp.min(laggings)


def _grad_norm(problem, x, grad, eta):
    """$\\|G_t\\|$, or the gradient mapping $\\|x - P_X(x - \\eta G_t)\\|/\\eta$ with a
    set $X$ (and $\\eta > 0$)."""
    if problem.project_x is None:
        return tree_norm(grad)
    safe = jnp.where(eta > 0, eta, 1.0)
    moved = apply_project_x(problem, tree_axpy(-safe, grad, x))
    return jnp.where(eta > 0, tree_norm(tree_sub(x, moved)) / safe, tree_norm(grad))


# -------------------------------------------------------------------------------------
# Block bookkeeping: sampling, batches, gather/scatter over (shards, blocks per shard).
#
# Layout: the m blocks form S = num_shards contiguous groups of m / S; every per-block
# array (y, u, the estimator state, last_sampled) keeps its leading (m, ...) axis and is
# viewed as (S, m / S, ...) by `_grouped`. Each step draws I / S local indices per
# group (`_epoch_blocks` / `_sample_blocks`, one batched random call whose leading axis
# is the group), gathers those rows (`_gather`), vmaps the block work over the
# (S, I / S) grid and scatters the rows back (`_scatter`). With a mesh, `_place` pins
# the leading axis to `mesh_axis`, so group k lives on device k and XLA keeps the
# gather, the block work and the scatter local; only the means over the grid (the
# d_x-sized G_t, G_t^prev and the metrics) are all-reduced.


def _epoch_blocks(key, step, shards: int, shard_size: int, per_shard: int):
    """Local indices `(shards, per_shard)` from one random permutation of each shard's
    blocks per epoch of `shard_size // per_shard` steps (random reshuffling; the last
    `shard_size % per_shard` positions of a permutation are skipped)."""
    epoch, position = jnp.divmod(step, shard_size // per_shard)
    order = random_subset(jr.fold_in(key, epoch), (shards, shard_size), shard_size)
    return lax.dynamic_slice_in_dim(order, position * per_shard, per_shard, axis=1)


def _sample_blocks(key, shards: int, shard_size: int, per_shard: int, everything: bool):
    """Local indices `(shards, per_shard)`: `per_shard` distinct blocks of each
    shard."""
    if everything:
        every = jnp.arange(shard_size, dtype=jnp.int32)
        return jnp.broadcast_to(every, (shards, shard_size))
    return random_subset(key, (shards, shard_size), per_shard)


def _block_batches(data: AbstractData, keys, draws, blocks, upper: bool):
    """One batch per sampled block, shaped `(num_shards, per_shard, ...)`, and its vmap
    axis (`None` for a `FullBatch`, whose single batch all blocks share).

    With per-block data (`block_upper_batch` / `block_lower_batch`, e.g.
    [`bilevel.BlockMinibatch`][]) block $i$ draws from its own rows. Otherwise all
    blocks share `data`'s pool: slot $s$ of step $t$ makes draw $tI + s$ of that level's
    stream with its own key, so `Minibatch(sampling="epoch")` hands the $I$ sampled
    blocks consecutive disjoint slices of one permutation.
    """
    name = "block_upper_batch" if upper else "block_lower_batch"
    per_block = getattr(data, name, None)
    if per_block is not None:
        return _vmap2(per_block, (0, 0, 0))(keys, draws, blocks), 0
    shared = data.upper_batch if upper else data.lower_batch
    if isinstance(data, FullBatch):  # one batch for every block, not copied per block
        return shared(keys[0, 0], draws[0, 0]), None
    return _vmap2(shared, (0, 0))(keys, draws), 0


def _grouped(leaf, shards):
    """`(m, ...)` -> `(shards, m / shards, ...)`."""
    return leaf.reshape(shards, leaf.shape[0] // shards, *leaf.shape[1:])


def _gather(tree, local, shards):
    """Rows `local` of each shard: leaves `(m, ...)` -> `(shards, per_shard, ...)`."""
    take = jax.vmap(lambda a, i: a[i])
    return jtu.tree_map(lambda u: take(_grouped(u, shards), local), tree)


def _scatter(tree, local, new_rows, shards):
    """Inverse of `_gather`: write `new_rows` into rows `local` of each shard."""
    put = jax.vmap(lambda a, i, r: a.at[i].set(r))
    return jtu.tree_map(
        lambda u, r: put(_grouped(u, shards), local, r).reshape(u.shape), tree, new_rows
    )


def _times_rows(scale, leaf):
    """`scale` (one value per sampled block, shape `(S, P)`) times `leaf`
    `(S, P, ...)`."""
    scale = scale.astype(leaf.dtype)
    return scale.reshape(scale.shape + (1,) * (leaf.ndim - scale.ndim)) * leaf


def _mean_over_slots(tree):
    return jtu.tree_map(lambda u: jnp.mean(u, axis=(0, 1)), tree)


def _root_mean_square(squares):
    """$(\\frac1I\\sum_i a_i)^{1/2}$ over the sampled blocks' squared norms $a_i$."""
    return jnp.sqrt(jnp.mean(squares))


def _vmap2(fn, in_axes):
    """`vmap` over the two leading axes (shards, blocks per shard)."""
    return jax.vmap(jax.vmap(fn, in_axes=in_axes), in_axes=in_axes)
