r"""BSVRB v1 / v2: blockwise stochastic variance-reduced methods for multi-block bilevel
problems $\min_x \frac1m\sum_{i=1}^m f_i(x, y_i^*(x))$,
$y_i^*(x) = \arg\min_{y_i} g_i(x, y_i)$ (Hu, Qiu, Guo, Zhang, Yang, ICML 2023).

Each step samples $I$ of the $m$ blocks and one upper and one lower batch per sampled
block. Per-block estimators use MSVR (multi-block single-probe variance reduction) and the
upper direction uses STORM; all sampled-block work is `vmap`ped, and with a
`jax.sharding.Mesh` it runs on the devices that hold the blocks.
"""

import functools as ft
from typing import Any, ClassVar, Literal

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import lineax as lx
from jaxtyping import Array, Float, Int, PyTree

from .._data import AbstractData, FullBatch, as_data, random_subset
from .._misc import tree_axpy, tree_norm, tree_scale, tree_sub, tree_where
from .._problem import apply_project_x
from .._solver import AbstractBilevelSolver


LowerUpdate = Literal["all", "sampled", "lazy"]
_LOWER_UPDATES = ("all", "sampled", "lazy")
_SPD_TAGS = frozenset({lx.symmetric_tag, lx.positive_semidefinite_tag})


# ---------------------------------------------------------------------------------------
# Per-block data.


class BlockMinibatch(AbstractData):
    r"""Per-block data: every leaf has a leading block axis of size $m$ followed by a
    sample axis, and block $i$'s batch is drawn from its own rows.

    [`bilevel.solvers.BSVRB`][] calls `block_upper_batch(key, draw, block, stream)` /
    `block_lower_batch(...)` inside `vmap` over the sampled blocks (`block` is a traced
    int32 index). The plain `upper_batch` / `lower_batch` of the
    [`bilevel.AbstractData`][] interface return block 0's batch; they exist so that
    `problem.check` sees the shape one block's objective receives.

    **Arguments:**

    - `upper`, `lower`: pytrees whose leaves have shape `(m, n, ...)` (per level), or
      `None` for a level without data.
    - `batch_size`: samples per lower batch (`None`: all `n` rows of the block).
    - `upper_batch_size`: samples per upper batch (default: `batch_size`).
    - `sampling`: `"without_replacement"` (default; distinct rows within a batch,
      independent batches) or `"with_replacement"`.

    Blocks share nothing here; for one data pool shared by all blocks (e.g. one data set
    and one model per class) use [`bilevel.Minibatch`][] and read the block index in
    the objectives instead.
    """

    upper: PyTree
    lower: PyTree
    batch_size: int | None = eqx.field(static=True, default=None)
    upper_batch_size: int | None = eqx.field(static=True, default=None)
    sampling: Literal["without_replacement", "with_replacement"] = eqx.field(
        static=True, default="without_replacement"
    )

    def __check_init__(self):
        if self.sampling not in ("without_replacement", "with_replacement"):
            raise ValueError(f"BlockMinibatch: unknown `sampling` {self.sampling!r}")
        blocks = set()
        for name, tree in (("upper", self.upper), ("lower", self.lower)):
            shapes = {jnp.shape(u)[:2] for u in jtu.tree_leaves(tree)}
            if any(len(s) < 2 for s in shapes) or len(shapes) > 1:
                raise ValueError(
                    f"BlockMinibatch: every leaf of `{name}` needs the same leading "
                    f"(block, sample) axes; got leading shapes {sorted(shapes)}"
                )
            blocks |= {s[0] for s in shapes}
        if len(blocks) > 1:
            raise ValueError(
                f"BlockMinibatch: `upper` and `lower` disagree on the number of blocks: "
                f"{sorted(blocks)}"
            )
        for name in ("batch_size", "upper_batch_size"):
            size = getattr(self, name)
            if size is not None and (not isinstance(size, int) or size < 1):
                raise ValueError(f"BlockMinibatch: `{name}` must be a positive int or None")

    @property
    def num_blocks(self) -> int | None:
        """$m$, the size of the leading block axis (`None` without data)."""
        leaves = jtu.tree_leaves((self.upper, self.lower))
        return jnp.shape(leaves[0])[0] if leaves else None

    def block_upper_batch(self, key, draw, block, stream=0):
        """Block `block`'s upper batch (a fresh sample for every key)."""
        size = self.upper_batch_size or self.batch_size
        return self._draw(self.upper, size, key, block, 2 * stream + 1)

    def block_lower_batch(self, key, draw, block, stream=0):
        """Block `block`'s lower batch (a fresh sample for every key)."""
        return self._draw(self.lower, self.batch_size, key, block, 2 * stream)

    def upper_batch(self, key, draw, stream=0):
        return self.block_upper_batch(key, draw, jnp.zeros((), jnp.int32), stream)

    def lower_batch(self, key, draw, stream=0):
        return self.block_lower_batch(key, draw, jnp.zeros((), jnp.int32), stream)

    def _draw(self, tree, size, key, block, stream_id):
        rows = jtu.tree_map(lambda u: u[block], tree)
        leaves = jtu.tree_leaves(rows)
        if not leaves:
            return rows
        num = jnp.shape(leaves[0])[0]
        if size is None or (size >= num and self.sampling == "without_replacement"):
            return rows
        key = jr.fold_in(key, stream_id)
        if self.sampling == "with_replacement":
            index = jr.randint(key, (size,), 0, num)
        else:
            index = random_subset(key, (num,), size)
        return jtu.tree_map(lambda u: jnp.take(u, index, axis=0), rows)


def _block_batches(data: AbstractData, keys, draws, blocks, upper: bool):
    """One batch per sampled block, shaped `(num_shards, per_shard, ...)`, and its vmap
    axis (`None` for a `FullBatch`, whose single batch all blocks share).

    With per-block data (`block_upper_batch` / `block_lower_batch`, e.g.
    [`bilevel.solvers.BlockMinibatch`][]) block $i$ draws from its own rows. Otherwise
    all blocks share `data`'s pool: slot $s$ of step $t$ makes draw $tI + s$ of that
    level's stream with its own key, so `Minibatch(sampling="epoch")` hands the $I$
    sampled blocks consecutive disjoint slices of one permutation.
    """
    name = "block_upper_batch" if upper else "block_lower_batch"
    per_block = getattr(data, name, None)
    if per_block is not None:
        return _vmap2(per_block, (0, 0, 0))(keys, draws, blocks), 0
    shared = data.upper_batch if upper else data.lower_batch
    if isinstance(data, FullBatch):  # the same batch for every block: not copied per block
        return shared(keys[0, 0], draws[0, 0]), None
    return _vmap2(shared, (0, 0))(keys, draws), 0


# ---------------------------------------------------------------------------------------
# The solver.


class _BSVRBState(eqx.Module):
    x: PyTree[Array]
    x_prev: PyTree[Array]
    y: PyTree[Array]
    y_prev: PyTree[Array]
    u: PyTree[Array]
    hessian: Float[Array, "m dy dy"] | None
    hessian_prev: Float[Array, "m dy dy"] | None
    v: PyTree[Array] | None
    v_prev: PyTree[Array] | None
    s: PyTree[Array] | None
    z: PyTree[Array]
    last_sampled: Int[Array, " m"]
    step: Int[Array, ""]


class BSVRB(AbstractBilevelSolver):
    r"""Blockwise stochastic variance-reduced bilevel method, BSVRB$^{v1}$ and
    BSVRB$^{v2}$ (Hu et al., ICML 2023), for a [`bilevel.MultiBlockProblem`][].

    Step $t$ samples a set $I_t$ of $I$ blocks (without replacement) and, for each
    $i \in I_t$, an upper batch $\xi_i$ and a lower batch $\zeta_i$. Every stochastic
    oracle $h_i$ is evaluated on the **same** batch at the current point
    $w_t = (x_t, y_{i,t}, \cdot)$ and the previous one $w_{t-1}$, and tracked by MSVR,

    $e_i \leftarrow (1-\alpha)\,e_i + (\alpha+\gamma)\,h_i(w_t) - \gamma\,h_i(w_{t-1})$
    for $i \in I_t$ (other blocks keep $e_i$),

    with $u_i \approx \nabla_y g_i$ in both versions. The hypergradient estimate
    $G_t = \frac1I\sum_{i\in I_t} G_i(w_t)$ and its value $G_t^{\rm prev}$ at
    $w_{t-1}$ (same blocks and batches) drive STORM and the upper step,

    $z_{t+1} = (1-\beta)(z_t - G_t^{\rm prev}) + G_t$,
    $\quad x_{t+1} = P_X(x_t - \eta\, z_{t+1})$,

    and the lower step is $y_i \leftarrow y_i - \tau\, d_i\, u_i$ (see `lower_update`).

    - **v1** (small $d_y$) tracks Hessians $H_i \approx \nabla^2_{yy} g_i$ by MSVR and
      projects them onto $\{H = H^\top,\ H \succeq \mu' I\}$ (symmetrise, clip
      eigenvalues at $\mu'$ = `hessian_floor`); $G_i = \nabla_x f_i - \nabla^2_{xy} g_i\,
      H_i^{-1} \nabla_y f_i$ with a Cholesky solve, using $H_{i,t}$ at $w_t$ and
      $H_{i,t-1}$ at $w_{t-1}$ (the values before this step's update).
    - **v2** (large $d_y$) never forms a Hessian: $v_i \approx (\nabla^2_{yy} g_i)^{-1}
      \nabla_y f_i$ takes projected steps $v_i \leftarrow \Pi_{\|v\|\le C_v}(v_i -
      \tau_v d_i s_i)$ on the quadratic $q_i(v) = \frac12 v^\top \nabla^2_{yy} g_i v -
      v^\top \nabla_y f_i$, whose gradient $s_i$ is MSVR-tracked (Hessian-vector products
      only); $G_i = \nabla_x f_i - \nabla^2_{xy} g_i\, v_i$.

    **Arguments:**

    - `version`: 1 or 2 (default 2).
    - `blocks_per_step`: $I$ (default `None`: all $m$ blocks).
    - `eta`, `tau`, `tau_v`: step sizes of $x$, $y_i$, $v_i$ (defaults 0.01, 0.5, 1.0).
    - `beta`: STORM weight $\beta \in (0, 1]$ (default 0.9, the official scripts').
    - `alpha`: MSVR weight $\alpha \in (0, 1]$ (default 0.9, the official scripts').
    - `gamma`: MSVR correction weight $\gamma \ge 0$, or `"auto"` (default) for the
      theory's $\gamma = \frac{m - I}{I(1-\alpha)} + (1-\alpha)$; with $I = m$ it is
      $1-\alpha$, and MSVR is then STORM. The theory takes $\alpha$ small; with $\alpha$
      near 1 and $I \ll m$ this $\gamma$ is large and needs small $\tau$, $\eta$. The
      official scripts use $\gamma = 1$ with $\alpha = 0.9$.
    - `v_radius`: $C_v$ of the v2 ball projection, a bound on $\|(\nabla^2_{yy}
      g_i)^{-1}\nabla_y f_i\| \le C_f/\mu$ (default 10, the official code's; `None`: no
      projection).
    - `hessian_floor`: $\mu' \le \mu$, the eigenvalue floor of the v1 projection
      (default 1e-3); choose it below the lower level's strong convexity.
    - `lower_update`: which $y_i$ (and, in v2, $v_i$) move each step. `"all"` (default,
      the eager form; the official v1 code): every block, unsampled ones with their stale
      $u_i$, $d_i = 1$. `"sampled"`: only $i \in I_t$, $d_i = 1$. `"lazy"` (the official v2
      code): only $i \in I_t$, with $d_i$ = the number of steps since block $i$ was last
      sampled, a catch-up of the skipped eager steps that uses the new $u_i$. With
      $I = m$ the three coincide.
    - `num_shards`: the blocks are split into this many contiguous equal groups and
      $I/\text{num\_shards}$ blocks are sampled from each (stratified sampling; each block
      is still in $I_t$ with probability $I/m$). Default: the mesh's size along
      `mesh_axis`, or 1 (plain uniform sampling). It must divide both $m$ and $I$.
    - `mesh`, `mesh_axis`: shard over devices (below).

    **Per-block data.** Block $i$'s objectives are called as $f_i$ = `upper(x, y_i,
    batch, i)` and $g_i$ = `lower(x, y_i, batch, i)`, with `i` an int32 scalar. For the
    $s$-th sampled block of step $t$ the batches come from `data` with a key of its own
    (one split of the step's key) and draw count $tI + s$: from
    `data.block_upper_batch(key, draw, i)` / `data.block_lower_batch(key, draw, i)` when
    `data` has them (per-block rows, [`bilevel.solvers.BlockMinibatch`][]),
    otherwise from `data.upper_batch(key, draw)`, a pool shared by all blocks
    ([`bilevel.FullBatch`][], [`bilevel.Minibatch`][]), the objectives reading their
    block's part through `i`. The batch size $B$ is the data's (`batch_size=`).

    **Sharding.** Pass `mesh=jax.make_mesh((n,), ("blocks",))`: $y$, $u$, $H$ / $v$,
    $s$, their previous copies and the bookkeeping arrays are sharded along the block
    axis over `mesh_axis`, $x$ and $z$ are replicated, and each device samples and
    processes blocks from its own shards (`num_shards` defaults to the device count), so
    only the $d_x$-sized sum over sampled blocks crosses devices. The same code runs on
    one device; `BSVRB(num_shards=n)` without a mesh makes the same draws, so both runs
    agree to rounding. $m$ and $I$ must be multiples of `num_shards`. Batches are drawn
    from replicated data.

    ```python
    # on CPU, simulate devices with XLA_FLAGS=--xla_force_host_platform_device_count=4
    mesh = jax.make_mesh((jax.device_count(),), ("blocks",))
    solver = bl.solvers.BSVRB(blocks_per_step=8, mesh=mesh)
    state, history = bl.run(problem, solver, x0, y0, data, 1000, key)
    state.y.sharding  # NamedSharding(mesh, PartitionSpec("blocks"))
    ```

    **Initialisation** (spec pitfall 2: no random estimators, no garbage first
    correction): $x_{-1} = x_0$, $y_{-1} = y_0$, $u = s = v = z = 0$. The first time a
    block is sampled its estimators take $\alpha = 1$, $\gamma = 0$ (they start from
    that sample), and in v1 its Hessian term uses that fresh estimate; the first step
    takes $\beta = 1$ ($z_1 = G_0$).

    Metrics (sampled blocks, current point): `upper_loss` $\frac1I\sum f_i$,
    `grad_norm` $\|z_{t+1}\|$ (the update direction), `lower_residual`
    $(\frac1I\sum\|\nabla_y g_i\|^2)^{1/2}$, `hypergradient_norm` $\|G_t\|$, and in v2
    `linear_residual` $(\frac1I\sum\|\nabla^2_{yy}g_i v_i - \nabla_y f_i\|^2)^{1/2}$.

    !!! info "Deviations from the paper's code"
        The v1 projection is a true projection onto $\{H \succeq \mu' I\}$, not the
        code's Frobenius rescaling; there is no `batch_size` field (the data sets $B$,
        as for every solver).

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
        {"multi_block", "project_x", "stochastic"}
    )

    version: int = eqx.field(static=True, default=2)
    blocks_per_step: int | None = eqx.field(static=True, default=None)
    eta: float = 0.01
    beta: float = 0.9
    alpha: float = 0.9
    gamma: float | str = "auto"
    tau: float = 0.5
    tau_v: float = 1.0
    v_radius: float | None = 10.0
    hessian_floor: float = 1e-3
    lower_update: LowerUpdate = eqx.field(static=True, default="all")
    num_shards: int | None = eqx.field(static=True, default=None)
    mesh: jax.sharding.Mesh | None = eqx.field(static=True, default=None)
    mesh_axis: str = eqx.field(static=True, default="blocks")

    def __check_init__(self):
        if self.version not in (1, 2):
            raise ValueError(f"BSVRB: `version` must be 1 or 2, got {self.version!r}")
        for name in ("blocks_per_step", "num_shards"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(
                    f"BSVRB: `{name}` must be a positive int or None, got {value!r}"
                )
        if self.lower_update not in _LOWER_UPDATES:
            raise ValueError(
                f"BSVRB: `lower_update` must be one of {_LOWER_UPDATES}, "
                f"got {self.lower_update!r}"
            )
        if isinstance(self.gamma, str) and self.gamma != "auto":
            raise ValueError(
                f"BSVRB: `gamma` must be a number >= 0 or 'auto', got {self.gamma!r}"
            )
        checks = {
            "eta": lambda a: a >= 0,
            "beta": lambda a: 0 < a <= 1,
            "alpha": lambda a: 0 < a <= 1,
            "gamma": lambda a: a >= 0,
            "tau": lambda a: a > 0,
            "tau_v": lambda a: a > 0,
            "v_radius": lambda a: a > 0,
            "hessian_floor": lambda a: a > 0,
        }
        bounds = {"beta": "in (0, 1]", "alpha": "in (0, 1]", "eta": ">= 0", "gamma": ">= 0"}
        for name, ok in checks.items():
            value = getattr(self, name)
            concrete = isinstance(value, (int, float)) and not isinstance(value, bool)
            if concrete and not ok(value):
                raise ValueError(
                    f"BSVRB: `{name}` must be {bounds.get(name, '> 0')}, got {value!r}"
                )
        if self.mesh is not None:
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

    def _shards(self) -> int:
        if self.num_shards is not None:
            return self.num_shards
        return 1 if self.mesh is None else self.mesh.shape[self.mesh_axis]

    def _sizes(self, problem) -> tuple[int, int, int]:
        """$(m, I, S)$: blocks, blocks per step, shards."""
        num_blocks = problem.num_blocks
        return num_blocks, self.blocks_per_step or num_blocks, self._shards()

    def _gamma(self, num_blocks: int, per_step: int):
        if not isinstance(self.gamma, str):
            return self.gamma
        if per_step == num_blocks:
            return 1 - self.alpha
        return (num_blocks - per_step) / (per_step * (1 - self.alpha)) + (1 - self.alpha)

    def _validate(self, problem) -> None:
        num_blocks, per_step, shards = self._sizes(problem)
        if per_step > num_blocks:
            raise ValueError(
                f"BSVRB: `blocks_per_step={per_step}` exceeds num_blocks={num_blocks}"
            )
        if num_blocks % shards or per_step % shards:
            raise ValueError(
                f"BSVRB: num_blocks={num_blocks} and blocks_per_step={per_step} must both "
                f"be multiples of num_shards={shards}"
            )
        if (
            isinstance(self.gamma, str)
            and per_step < num_blocks
            and isinstance(self.alpha, (int, float))
            and self.alpha == 1
        ):
            raise ValueError(
                "BSVRB: gamma='auto' is infinite for alpha=1 with blocks_per_step < "
                "num_blocks; pass alpha < 1 or a number for `gamma`"
            )

    # -- sharding ----------------------------------------------------------------------

    def _place(self, tree: PyTree, blocked: bool) -> PyTree:
        """Shard the leading (block) axis over the mesh, or replicate; no-op without."""
        if self.mesh is None:
            return tree
        spec = jax.sharding.PartitionSpec(self.mesh_axis if blocked else None)
        sharding = jax.sharding.NamedSharding(_auto_mesh(self.mesh), spec)
        return jtu.tree_map(lambda u: lax.with_sharding_constraint(u, sharding), tree)

    # -- interface ---------------------------------------------------------------------

    def _init(self, problem, x0, y0, key) -> _BSVRBState:
        self._validate(problem)
        num_blocks = problem.num_blocks
        y0 = self._place(y0, True)
        x0 = self._place(x0, False)
        zeros_y = jtu.tree_map(jnp.zeros_like, y0)
        hessian = v = None
        if self.version == 1:
            size = jfu.ravel_pytree(jtu.tree_map(lambda u: u[0], y0))[0].size
            dtype = jnp.result_type(*jtu.tree_leaves(y0))
            eye = self.hessian_floor * jnp.eye(size, dtype=dtype)
            hessian = self._place(jnp.broadcast_to(eye, (num_blocks, size, size)), True)
        else:
            v = zeros_y
        return _BSVRBState(
            x=x0,
            x_prev=x0,
            y=y0,
            y_prev=y0,
            u=zeros_y,
            hessian=hessian,
            hessian_prev=hessian,
            v=v,
            v_prev=v,
            s=v,
            z=jtu.tree_map(jnp.zeros_like, x0),
            last_sampled=self._place(jnp.full((num_blocks,), -1), True),
            step=jnp.array(0),
        )

    def _params(self, state):
        return state.x, state.y

    def _step(self, problem, state, data, key):
        data = as_data(data)
        num_blocks, _, shards = self._sizes(problem)
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
        out = self._block_terms(problem, state, rows, fresh, batches, blocks)

        grad = _mean_over_slots(out.grad)
        grad_prev = _mean_over_slots(out.grad_prev)
        storm = tree_axpy(1 - self.beta, tree_sub(state.z, grad_prev), grad)
        z = tree_where(state.step == 0, grad, storm)
        x = apply_project_x(problem, tree_axpy(-self.eta, z, state.x))

        u = scatter(state.u, out.u)
        scale = self._lower_steps(state.step, last, fresh)
        y = self._lower_step(state.y, u, out.u, rows(state.y), scale, self.tau, scatter)
        hessian = hessian_prev = v = s = None
        if self.version == 1:
            hessian = scatter(state.hessian, out.hessian)
            hessian_prev = scatter(state.hessian, out.hessian_used)
        else:
            s = scatter(state.s, out.s)
            v = self._lower_step(
                state.v, s, out.s, rows(state.v), scale, self.tau_v, scatter, project=True
            )
        last_sampled = scatter(state.last_sampled, jnp.broadcast_to(state.step, local.shape))

        metrics = {
            "upper_loss": jnp.mean(out.upper_loss),
            "grad_norm": tree_norm(z),
            "lower_residual": jnp.sqrt(jnp.mean(out.lower_residual_sq)),
            "hypergradient_norm": tree_norm(grad),
        }
        if self.version == 2:
            metrics["linear_residual"] = jnp.sqrt(jnp.mean(out.linear_residual_sq))
        blocked = self._place(
            dict(y=y, u=u, hessian=hessian, hessian_prev=hessian_prev, v=v, s=s,
                 last_sampled=last_sampled),
            True,
        )
        new_state = _BSVRBState(
            x=self._place(x, False),
            x_prev=state.x,
            y_prev=state.y,
            v_prev=state.v,
            z=self._place(z, False),
            step=state.step + 1,
            **blocked,
        )
        return new_state, metrics

    def _sample(self, problem, state, data, key):
        """Sampled blocks (local indices and global ones, `(shards, per_shard)`) and
        their upper and lower batches."""
        num_blocks, per_step, shards = self._sizes(problem)
        per_shard, shard_size = per_step // shards, num_blocks // shards
        # one split for every key of the step (each random call site costs compile time)
        keys = jr.split(key, 1 + 2 * per_step)
        slot_keys = keys[1:].reshape((2, shards, per_shard) + keys.shape[1:])
        everything = per_step == num_blocks
        local = _sample_blocks(keys[0], shards, shard_size, per_shard, everything)
        local = self._place(local, True)
        offsets = (jnp.arange(shards, dtype=jnp.int32) * shard_size)[:, None]
        blocks = local + offsets
        slots = jnp.arange(per_step).reshape(shards, per_shard)
        draws = state.step * per_step + slots
        upper, upper_axis = _block_batches(data, slot_keys[0], draws, blocks, upper=True)
        lower, lower_axis = _block_batches(data, slot_keys[1], draws, blocks, upper=False)
        return local, blocks, ((upper, lower), (upper_axis, lower_axis))

    def _block_terms(self, problem, state, rows, fresh, batches, blocks) -> "_BlockOut":
        """The per-block oracles and estimator updates, vmapped over sampled blocks."""
        num_blocks, per_step, _ = self._sizes(problem)
        coeffs = _Coefficients(self.alpha, self._gamma(num_blocks, per_step))
        point = (state.x, state.x_prev)
        if self.version == 1:
            fn = ft.partial(_v1_block, problem, coeffs, self.hessian_floor)
            estimators = (rows(state.hessian), rows(state.hessian_prev))
        else:
            fn = ft.partial(_v2_block, problem, coeffs)
            estimators = (rows(state.v), rows(state.v_prev), rows(state.s))
        args = (rows(state.y), rows(state.y_prev), rows(state.u), *estimators, fresh)
        batches, batch_axes = batches
        in_axes = (None,) + (0,) * len(args) + (batch_axes, 0)
        return _vmap2(fn, in_axes)(point, *args, batches, blocks)

    # -- lower-level steps -------------------------------------------------------------

    def _lower_steps(self, step, last, fresh):
        """$d_i$ for the sampled blocks: 1, or the steps since the last visit (lazy)."""
        if self.lower_update != "lazy":
            return jnp.ones(last.shape, jnp.result_type(float))
        return jnp.where(fresh, 1, step - last).astype(jnp.result_type(float))

    def _lower_step(
        self, full, direction_full, direction_rows, current_rows, scale, lr, scatter,
        project=False,
    ):
        r"""$w_i \leftarrow w_i - \text{lr}\, d_i\, e_i$ on every block (`"all"`) or on
        the sampled ones, then the ball projection when `project` (the $v$ step)."""
        project = project and self.v_radius is not None
        if self.lower_update == "all":
            moved = tree_axpy(-lr, direction_full, full)
            if project:
                moved = jax.vmap(ft.partial(_project_ball, self.v_radius))(moved)
            return moved
        step = jtu.tree_map(lambda e: _times_rows(-lr * scale, e), direction_rows)
        moved = jtu.tree_map(jnp.add, current_rows, step)
        if project:
            moved = _vmap2(ft.partial(_project_ball, self.v_radius), (0,))(moved)
        return scatter(full, moved)


# ---------------------------------------------------------------------------------------
# Per-block oracles (called inside vmap over the sampled blocks).


class _Coefficients(eqx.Module):
    alpha: Any
    gamma: Any

    def msvr(self, estimate, new, old, fresh):
        r"""$(1-a)e + (a+c)h_{\rm new} - c\,h_{\rm old}$, with $a = 1$, $c = 0$ for a
        block seen for the first time."""
        a = jnp.where(fresh, 1.0, self.alpha)
        c = jnp.where(fresh, 0.0, self.gamma)
        return jtu.tree_map(
            lambda e, h, g: (1 - a) * e + (a + c) * h - c * g, estimate, new, old
        )


class _BlockOut(eqx.Module):
    upper_loss: Array
    lower_residual_sq: Array
    grad: PyTree[Array]
    grad_prev: PyTree[Array]
    u: PyTree[Array]
    hessian: Array | None = None
    hessian_used: Array | None = None
    s: PyTree[Array] | None = None
    linear_residual_sq: Array | None = None


def _upper_grads(problem, x, y, batch, index):
    """$f_i$, $\\nabla_x f_i$, $\\nabla_y f_i$."""
    return jax.value_and_grad(problem.upper, argnums=(0, 1))(x, y, batch, index)


def _lower_grad_y(problem, batch, index):
    return lambda x, y: jax.grad(problem.lower, argnums=1)(x, y, batch, index)


def _v2_block(problem, coeffs, point, y, y_prev, u, v, v_prev, s, fresh, batches, index):
    """BSVRB v2 for one sampled block: MSVR of $\\nabla_y g_i$ and of $\\nabla q_i$,
    and $G_i$ at the current and previous points."""
    (x, x_prev), (upper, lower) = point, batches
    grad_y_g = _lower_grad_y(problem, lower, index)

    def at(x_, y_, v_):
        loss, (gx_f, gy_f) = _upper_grads(problem, x_, y_, upper, index)
        gy_g, vjp = jax.vjp(grad_y_g, x_, y_)
        cross, hvp = vjp(v_)  # [d2_xy g v, d2_yy g v]: the y part is the HVP by symmetry
        return loss, gy_g, tree_sub(gx_f, cross), tree_sub(hvp, gy_f)

    loss, gy_g, grad, q = at(x, y, v)
    _, gy_g_prev, grad_prev, q_prev = at(x_prev, y_prev, v_prev)
    return _BlockOut(
        upper_loss=loss,
        lower_residual_sq=tree_norm(gy_g) ** 2,
        grad=grad,
        grad_prev=grad_prev,
        u=coeffs.msvr(u, gy_g, gy_g_prev, fresh),
        s=coeffs.msvr(s, q, q_prev, fresh),
        linear_residual_sq=tree_norm(q) ** 2,
    )


def _v1_block(problem, coeffs, floor, point, y, y_prev, u, hessian, hessian_prev, fresh,
              batches, index):
    """BSVRB v1 for one sampled block: MSVR of $\\nabla_y g_i$ and of the projected
    Hessian, and $G_i$ at the current and previous points."""
    (x, x_prev), (upper, lower) = point, batches
    grad_y_g = _lower_grad_y(problem, lower, index)
    _, unravel = jfu.ravel_pytree(y)

    def oracles(x_, y_):
        loss, (gx_f, gy_f) = _upper_grads(problem, x_, y_, upper, index)
        gy_g, vjp_x = jax.vjp(lambda xx: grad_y_g(xx, y_), x_)
        flat = jfu.ravel_pytree(y_)[0]
        hess = jax.jacfwd(lambda w: jfu.ravel_pytree(grad_y_g(x_, unravel(w)))[0])(flat)
        return loss, gx_f, gy_f, gy_g, vjp_x, hess

    loss, gx_f, gy_f, gy_g, vjp_x, hess = oracles(x, y)
    _, gx_f_p, gy_f_p, gy_g_p, vjp_x_p, hess_p = oracles(x_prev, y_prev)
    new_hessian = project_hessian(coeffs.msvr(hessian, hess, hess_p, fresh), floor)
    used = jnp.where(fresh, new_hessian, hessian)
    used_prev = jnp.where(fresh, new_hessian, hessian_prev)

    def hypergrad(gx_f_, gy_f_, vjp_, matrix):
        w = _spd_solve(matrix, jfu.ravel_pytree(gy_f_)[0])
        (cross,) = vjp_(unravel(w))
        return tree_sub(gx_f_, cross)

    return _BlockOut(
        upper_loss=loss,
        lower_residual_sq=tree_norm(gy_g) ** 2,
        grad=hypergrad(gx_f, gy_f, vjp_x, used),
        grad_prev=hypergrad(gx_f_p, gy_f_p, vjp_x_p, used_prev),
        u=coeffs.msvr(u, gy_g, gy_g_p, fresh),
        hessian=new_hessian,
        hessian_used=used,
    )


def project_hessian(matrix: Float[Array, "n n"], floor) -> Float[Array, "n n"]:
    r"""Euclidean (Frobenius) projection onto $\{H = H^\top,\ H \succeq \mu' I\}$:
    symmetrise, then clip the eigenvalues at $\mu'$ = `floor`."""
    sym = 0.5 * (matrix + matrix.T)
    values, vectors = jnp.linalg.eigh(sym)
    return (vectors * jnp.maximum(values, floor)[None, :]) @ vectors.T


def _spd_solve(matrix, rhs):
    operator = lx.MatrixLinearOperator(matrix, _SPD_TAGS)
    return lx.linear_solve(operator, rhs, lx.Cholesky(), throw=False).value


def _project_ball(radius, tree):
    r"""$\Pi_{\|v\| \le C_v}(v)$ for one block's $v$ (a pytree)."""
    norm = tree_norm(tree)
    return tree_scale(jnp.minimum(1.0, radius / jnp.maximum(norm, 1e-30)), tree)


# ---------------------------------------------------------------------------------------
# Block bookkeeping: sampling, gather/scatter over (shards, blocks per shard).


def _auto_mesh(mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
    """The same devices and axis names with every axis `Auto` (compiler-propagated
    shardings), whatever the axis types of the user's mesh (`jax.make_mesh` makes them
    `Explicit`)."""
    auto = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
    return jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=auto)


def _sample_blocks(key, shards: int, shard_size: int, per_shard: int, everything: bool):
    """Local indices `(shards, per_shard)`: `per_shard` distinct blocks of each shard."""
    if everything:
        every = jnp.arange(shard_size, dtype=jnp.int32)
        return jnp.broadcast_to(every, (shards, shard_size))
    return random_subset(key, (shards, shard_size), per_shard)


def _grouped(leaf, shards):
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
    """`scale` (one value per sampled block, shape `(S, P)`) times `leaf` `(S, P, ...)`."""
    scale = scale.astype(leaf.dtype)
    return scale.reshape(scale.shape + (1,) * (leaf.ndim - scale.ndim)) * leaf


def _mean_over_slots(tree):
    return jtu.tree_map(lambda u: jnp.mean(u, axis=(0, 1)), tree)


def _vmap2(fn, in_axes):
    """`vmap` over the two leading axes (shards, blocks per shard)."""
    return jax.vmap(jax.vmap(fn, in_axes=in_axes), in_axes=in_axes)
