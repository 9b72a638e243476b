"""Data samplers: full batches and jit-able minibatches drawn from a PRNG key.

A solver asks its data for an upper and a lower batch at each draw. `stream` separates
independent draws within one step (algorithms that need independent samples use
different streams); `draw` counts the draws of a stream, which is what epoch shuffling
needs to visit every sample once per epoch.
"""

import abc
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from jaxtyping import Array, Int, PRNGKeyArray, PyTree


class AbstractData(eqx.Module):
    """Where batches come from. Subclasses implement `upper_batch` and `lower_batch`."""

    @property
    def deterministic(self) -> bool:
        """True when every draw returns the same batches (full-batch data). Solvers that
        need exact oracles (line searches, inner tolerances) require it."""
        return False

    @abc.abstractmethod
    def upper_batch(self, key: PRNGKeyArray, draw: Int[Array, ""], stream: int = 0) -> Any:
        """A batch for the upper objective."""

    @abc.abstractmethod
    def lower_batch(self, key: PRNGKeyArray, draw: Int[Array, ""], stream: int = 0) -> Any:
        """A batch for the lower objective."""


class FullBatch(AbstractData):
    """Deterministic data: every draw returns the whole upper / lower data.

    `FullBatch(data)` gives the same pytree to both levels; `FullBatch(upper=u, lower=l)`
    gives each level its own.
    """

    upper: PyTree
    lower: PyTree

    def __init__(self, data: PyTree = None, *, upper: PyTree = None, lower: PyTree = None):
        if data is not None and (upper is not None or lower is not None):
            raise ValueError("FullBatch: give either `data` or `upper=`/`lower=`, not both")
        self.upper = data if data is not None else upper
        self.lower = data if data is not None else lower

    @property
    def deterministic(self) -> bool:
        return True

    def upper_batch(self, key, draw, stream=0):
        return self.upper

    def lower_batch(self, key, draw, stream=0):
        return self.lower


Sampling = Literal["epoch", "with_replacement", "without_replacement"]


class Minibatch(AbstractData):
    """Minibatches drawn inside jit from arrays held on device.

    **Arguments:**

    - `upper`, `lower`: pytrees of arrays sharing a leading sample axis (per level), or
      `None` for a level without data.
    - `batch_size`: samples per lower batch (`None`: the full lower data).
    - `upper_batch_size`: samples per upper batch (default: `batch_size`).
    - `sampling`: `"epoch"` (default: a fresh permutation per epoch, every sample visited
      once per epoch; the last `n % batch_size` positions of each permutation are dropped),
      `"without_replacement"` (distinct samples within a batch, independent batches) or
      `"with_replacement"` (i.i.d. indices).
    - `seed`: seeds the epoch permutations.
    - `sharding`: optional `jax.sharding.Sharding` applied to every batch (e.g. a
      `NamedSharding` over a mesh's data axis) so data-parallel work spreads over devices.
    """

    upper: PyTree
    lower: PyTree
    batch_size: int | None = eqx.field(static=True, default=None)
    upper_batch_size: int | None = eqx.field(static=True, default=None)
    sampling: Sampling = eqx.field(static=True, default="epoch")
    seed: int = eqx.field(static=True, default=0)
    sharding: Any = eqx.field(static=True, default=None)

    def __check_init__(self):
        if self.sampling not in ("epoch", "with_replacement", "without_replacement"):
            raise ValueError(f"Minibatch: unknown `sampling` {self.sampling!r}")
        for name, tree in (("upper", self.upper), ("lower", self.lower)):
            sizes = {jnp.shape(u)[0] if jnp.ndim(u) else None for u in jtu.tree_leaves(tree)}
            if None in sizes or len(sizes) > 1:
                raise ValueError(
                    f"Minibatch: every leaf of `{name}` needs the same leading sample axis; "
                    f"got leading sizes {sizes}"
                )
        for name in ("batch_size", "upper_batch_size"):
            size = getattr(self, name)
            if size is not None and (not isinstance(size, int) or size < 1):
                raise ValueError(f"Minibatch: `{name}` must be a positive int or None")

    @property
    def deterministic(self) -> bool:
        if self.sampling == "with_replacement":
            return False
        upper_size = self.upper_batch_size or self.batch_size
        return _is_whole(self.upper, upper_size) and _is_whole(self.lower, self.batch_size)

    def upper_batch(self, key, draw, stream=0):
        size = self.upper_batch_size or self.batch_size
        return self._draw(self.upper, size, key, draw, 2 * stream + 1)

    def lower_batch(self, key, draw, stream=0):
        return self._draw(self.lower, self.batch_size, key, draw, 2 * stream)

    def _draw(self, tree, size, key, draw, stream_id):
        leaves = jtu.tree_leaves(tree)
        if not leaves:
            return tree
        num = jnp.shape(leaves[0])[0]
        if size is None or (size >= num and self.sampling != "with_replacement"):
            return tree
        key = jr.fold_in(key, stream_id)
        if self.sampling == "with_replacement":
            index = jr.randint(key, (size,), 0, num)
        elif self.sampling == "without_replacement":
            index = jr.choice(key, num, (size,), replace=False)
        else:
            index = _epoch_indices(jr.fold_in(jr.PRNGKey(self.seed), stream_id), num, size, draw)
        batch = jtu.tree_map(lambda u: jnp.take(u, index, axis=0), tree)
        if self.sharding is not None:
            batch = jax.lax.with_sharding_constraint(batch, self.sharding)
        return batch


def random_subset(key: PRNGKeyArray, shape: tuple[int, ...], size: int) -> Int[Array, "..."]:
    """`size` distinct indices of `range(shape[-1])` for every leading index, every
    subset equally likely: the positions of the `size` smallest of i.i.d. uniforms (one
    batched sort, which the SPMD partitioner keeps local along the leading axes, unlike
    `top_k`)."""
    order = jnp.argsort(jr.uniform(key, shape), axis=-1)
    return order[..., :size].astype(jnp.int32)


def _is_whole(tree: PyTree, size: int | None) -> bool:
    leaves = jtu.tree_leaves(tree)
    return size is None or not leaves or size >= jnp.shape(leaves[0])[0]


def _epoch_indices(seed_key, num: int, size: int, draw) -> Array:
    per_epoch = num // size
    epoch, position = jnp.divmod(jnp.asarray(draw), per_epoch)
    permutation = jr.permutation(jr.fold_in(seed_key, epoch), num)
    return jax.lax.dynamic_slice_in_dim(permutation, position * size, size)


def as_data(data: Any) -> AbstractData:
    """`None` -> no data; an `AbstractData` as is; any other pytree -> `FullBatch(data)`."""
    if isinstance(data, AbstractData):
        return data
    if data is None:
        return FullBatch(upper=None, lower=None)
    return FullBatch(data)


# -------------------------------------------------------------------------------------
# Per-block data (multi-block problems).


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
                "BlockMinibatch: `upper` and `lower` disagree on the number of "
                f"blocks: {sorted(blocks)}"
            )
        for name in ("batch_size", "upper_batch_size"):
            size = getattr(self, name)
            if size is not None and (not isinstance(size, int) or size < 1):
                raise ValueError(
                    f"BlockMinibatch: `{name}` must be a positive int or None"
                )

    @property
    def deterministic(self) -> bool:
        if self.sampling == "with_replacement":
            return False
        upper_size = self.upper_batch_size or self.batch_size
        return _is_whole_block(self.upper, upper_size) and _is_whole_block(
            self.lower, self.batch_size
        )

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


def _is_whole_block(tree: PyTree, size: int | None) -> bool:
    leaves = jtu.tree_leaves(tree)
    return size is None or not leaves or size >= jnp.shape(leaves[0])[1]
