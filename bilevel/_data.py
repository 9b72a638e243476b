"""Data samplers: full batches and jit-able minibatches drawn from a PRNG key.

A solver asks its data for an upper and a lower batch at each draw. `stream` separates
independent draws within one step (algorithms that need independent samples use
different streams); `draw` counts the draws of a stream, which is what epoch shuffling
needs to visit every sample once per epoch. Shuffling that must stay the same for a
whole run (epoch permutations, the split into fixed batches) comes from a key that
[`bilevel.run`][] and [`bilevel.solve`][] bind to the data (`with_key`), so runs with
different keys draw different batches.
"""

import abc
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from jaxtyping import Array, Int, PRNGKeyArray, PyTree

from ._sharding import constrain


class AbstractData(eqx.Module):
    """Where batches come from. Subclasses implement `upper_batch` and `lower_batch`."""

    @property
    def deterministic(self) -> bool:
        """True when every draw returns the same batches (full-batch data). Solvers that
        need exact oracles (line searches, inner tolerances) require it."""
        return False

    @abc.abstractmethod
    def upper_batch(
        self, key: PRNGKeyArray, draw: Int[Array, ""], stream: int = 0
    ) -> Any:
        """A batch for the upper objective."""

    @abc.abstractmethod
    def lower_batch(
        self, key: PRNGKeyArray, draw: Int[Array, ""], stream: int = 0
    ) -> Any:
        """A batch for the lower objective."""

    def with_key(self, key: PRNGKeyArray) -> "AbstractData":
        """This data with its run-level randomness (shuffles that last a whole run)
        taken from `key`; [`bilevel.run`][] and [`bilevel.solve`][] call it with a key
        derived from theirs. Data without such randomness returns itself."""
        return self

    def full_upper(self) -> Any:
        """All the upper data as one batch (for solvers that make full passes): any
        draw of deterministic data."""
        if self.deterministic:
            return self.upper_batch(jr.PRNGKey(0), 0)
        raise TypeError(f"{type(self).__name__} cannot give all its upper data at once")

    def full_lower(self) -> Any:
        """All the lower data as one batch (for solvers that make full passes): any
        draw of deterministic data."""
        if self.deterministic:
            return self.lower_batch(jr.PRNGKey(0), 0)
        raise TypeError(f"{type(self).__name__} cannot give all its lower data at once")

    @property
    def epoch_length(self) -> int:
        """Draws per epoch: how many batches it takes to see the larger level's data
        once (1 for full batches)."""
        return 1


class FullBatch(AbstractData):
    """Deterministic data: every draw returns the whole upper / lower data.

    `FullBatch(data)` gives the same pytree to both levels;
    `FullBatch(upper=u, lower=l)` gives each level its own.
    """

    upper: PyTree
    lower: PyTree

    def __init__(
        self, data: PyTree = None, *, upper: PyTree = None, lower: PyTree = None
    ):
        if data is not None and (upper is not None or lower is not None):
            raise ValueError(
                "FullBatch: give either `data` or `upper=`/`lower=`, not both"
            )
        self.upper = data if data is not None else upper
        self.lower = data if data is not None else lower

    @property
    def deterministic(self) -> bool:
        return True

    def upper_batch(self, key, draw, stream=0):
        return self.upper

    def lower_batch(self, key, draw, stream=0):
        return self.lower

    def full_upper(self):
        return self.upper

    def full_lower(self):
        return self.lower


Sampling = Literal["epoch", "with_replacement", "without_replacement"]


class Minibatch(AbstractData):
    """Minibatches drawn inside jit from arrays held on device.

    **Arguments:**

    - `upper`, `lower`: pytrees of arrays sharing a leading sample axis (per level), or
      `None` for a level without data.
    - `batch_size`: samples per lower batch (`None`: the full lower data).
    - `upper_batch_size`: samples per upper batch (default: `batch_size`).
    - `sampling`: `"epoch"` (default: a fresh permutation per epoch, every sample
      visited once per epoch; the last `n % batch_size` positions of each permutation
      are dropped), `"without_replacement"` (distinct samples within a batch,
      independent batches) or `"with_replacement"` (i.i.d. indices).
    - `seed`: an explicit seed for the epoch permutations, the same for every run. By
      default (`None`) they come from the run's key: [`bilevel.run`][] and
      [`bilevel.solve`][] bind it with `with_key`, so runs with different keys (e.g.
      `jax.vmap(bl.run)` over keys) see different batches. When you call
      `solver.step` yourself, bind a key with `data.with_key(key)` (unbound data uses
      key 0).
    - `key`: the bound run key (set by `with_key`; rarely given by hand).
    - `sharding`: optional `jax.sharding.Sharding` applied to every batch (e.g. a
      `NamedSharding` over a mesh's data axis) so data-parallel work spreads over
      devices.
    """

    upper: PyTree
    lower: PyTree
    batch_size: int | None = eqx.field(static=True, default=None)
    upper_batch_size: int | None = eqx.field(static=True, default=None)
    sampling: Sampling = eqx.field(static=True, default="epoch")
    seed: int | None = eqx.field(static=True, default=None)
    key: PRNGKeyArray | None = None
    sharding: Any = eqx.field(static=True, default=None)

    def __check_init__(self):
        if self.sampling not in ("epoch", "with_replacement", "without_replacement"):
            raise ValueError(f"Minibatch: unknown `sampling` {self.sampling!r}")
        _check_samples("Minibatch", self.upper, self.lower)
        _check_batch_sizes("Minibatch", self.batch_size, self.upper_batch_size)
        _check_seed("Minibatch", self.seed)

    @property
    def deterministic(self) -> bool:
        if self.sampling == "with_replacement":
            return False
        upper_size = self.upper_batch_size or self.batch_size
        return _is_whole(self.upper, upper_size) and _is_whole(
            self.lower, self.batch_size
        )

    @property
    def epoch_length(self) -> int:
        upper_size = self.upper_batch_size or self.batch_size
        return max(
            _batches(self.upper, upper_size),
            _batches(self.lower, self.batch_size),
        )

    def with_key(self, key):
        return self if self.seed is not None else _bind_key(self, key)

    def full_upper(self):
        return self.upper

    def full_lower(self):
        return self.lower

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
            run_key = _run_key(self.seed, self.key)
            index = _epoch_indices(jr.fold_in(run_key, stream_id), num, size, draw)
        return _take(tree, index, self.sharding)


class FixedBatches(AbstractData):
    r"""Finite sums split once into fixed batches, visited in a fresh random order every
    epoch; every draw also says which batch it is.

    Variance-reduced methods that keep one memory per batch (SAGA tables in
    [`bilevel.solvers.SABA`][]) need batches that always hold the same samples. At
    the start of a run each level's $n$ samples are shuffled once and cut into $n/B$
    batches of $B$ samples (so $B$ must divide $n$: every sample then carries the same
    weight and the batch means average exactly to the full mean); each epoch visits all
    of them in a new order. Any stochastic solver can use this data: `upper_batch` /
    `lower_batch` return the batch alone.

    **Arguments:**

    - `upper`, `lower`: pytrees of arrays sharing a leading sample axis (per level), or
      `None` for a level without data. A level taken whole (its batch size `None`) is
      one batch and may be any pytree (e.g. a few scalars).
    - `batch_size`: $B$, samples per lower batch; it must divide the number of lower
      samples (`None`: one batch, the full data).
    - `upper_batch_size`: samples per upper batch (default: `batch_size`); it must
      divide the number of upper samples.
    - `seed`: an explicit seed for the split and the orders, the same for every run;
      by default they come from the run's key (as for [`bilevel.Minibatch`][]).
    - `key`: the bound run key (set by `with_key`).
    - `sharding`: optional `jax.sharding.Sharding` applied to every batch.

    **Indexed draws:** `lower_indexed(key, draw, stream)` and `upper_indexed(...)`
    return `(index, batch)` with `index` in `range(num_lower_batches)` (resp.
    `num_upper_batches`); draw $t$ of a stream is position $t \bmod K$ of epoch
    $\lfloor t/K \rfloor$'s order. `lower_batch_at(index)` / `upper_batch_at(index)`
    give a batch by its index. The per-draw `key` is not used: given the bound key,
    batches depend only on the draw count and the stream.
    """

    upper: PyTree
    lower: PyTree
    batch_size: int | None = eqx.field(static=True, default=None)
    upper_batch_size: int | None = eqx.field(static=True, default=None)
    seed: int | None = eqx.field(static=True, default=None)
    key: PRNGKeyArray | None = None
    sharding: Any = eqx.field(static=True, default=None)

    def __check_init__(self):
        # a level taken whole (batch size None) is one batch: any pytree will do
        _check_samples(
            "FixedBatches",
            self.upper,
            self.lower,
            upper_whole=self._upper_size is None,
            lower_whole=self.batch_size is None,
        )
        _check_batch_sizes("FixedBatches", self.batch_size, self.upper_batch_size)
        _check_seed("FixedBatches", self.seed)
        for name, tree, size in (
            ("batch_size", self.lower, self.batch_size),
            ("upper_batch_size", self.upper, self._upper_size),
        ):
            num = _num_samples(tree)
            if size is not None and num is not None and size < num and num % size:
                divisors = [d for d in range(1, num + 1) if num % d == 0]
                nearest = sorted(divisors, key=lambda d: abs(d - size))[:3]
                raise ValueError(
                    f"FixedBatches: `{name}`={size} must divide the {num} samples of "
                    "its level (equal fixed batches); nearest divisors: "
                    f"{sorted(nearest)} (or None for the full data)"
                )

    @property
    def _upper_size(self) -> int | None:
        return self.upper_batch_size or self.batch_size

    @property
    def num_upper_batches(self) -> int:
        """$K$ of the upper level: the number of fixed upper batches."""
        return _batches(self.upper, self._upper_size)

    @property
    def num_lower_batches(self) -> int:
        """$K$ of the lower level: the number of fixed lower batches."""
        return _batches(self.lower, self.batch_size)

    @property
    def deterministic(self) -> bool:
        return self.num_upper_batches == 1 and self.num_lower_batches == 1

    @property
    def epoch_length(self) -> int:
        return max(self.num_upper_batches, self.num_lower_batches)

    def with_key(self, key):
        return self if self.seed is not None else _bind_key(self, key)

    def full_upper(self):
        return self.upper

    def full_lower(self):
        return self.lower

    def upper_indexed(
        self, key: PRNGKeyArray, draw: Int[Array, ""], stream: int = 0
    ) -> tuple[Int[Array, ""], Any]:
        """`(index, batch)` of an upper draw."""
        index = self._order(self.num_upper_batches, draw, 3 + 2 * stream)
        return index, self.upper_batch_at(index)

    def lower_indexed(
        self, key: PRNGKeyArray, draw: Int[Array, ""], stream: int = 0
    ) -> tuple[Int[Array, ""], Any]:
        """`(index, batch)` of a lower draw."""
        index = self._order(self.num_lower_batches, draw, 2 + 2 * stream)
        return index, self.lower_batch_at(index)

    def upper_batch_at(self, index: Int[Array, ""]) -> Any:
        """Upper batch number `index` of the split."""
        return self._batch_at(self.upper, self._upper_size, index, 1)

    def lower_batch_at(self, index: Int[Array, ""]) -> Any:
        """Lower batch number `index` of the split."""
        return self._batch_at(self.lower, self.batch_size, index, 0)

    def upper_batch(self, key, draw, stream=0):
        return self.upper_indexed(key, draw, stream)[1]

    def lower_batch(self, key, draw, stream=0):
        return self.lower_indexed(key, draw, stream)[1]

    def _order(self, num_batches: int, draw, stream_id: int) -> Int[Array, ""]:
        epoch, position = jnp.divmod(jnp.asarray(draw), num_batches)
        key = jr.fold_in(jr.fold_in(_run_key(self.seed, self.key), stream_id), epoch)
        return index_shuffle(key, position, num_batches)

    def _batch_at(self, tree, size, index, level: int):
        num = _num_samples(tree)
        if num is None or size is None or size >= num:
            return tree
        key = jr.fold_in(_run_key(self.seed, self.key), level)
        index = jnp.asarray(index)
        positions = index * size + jnp.arange(size, dtype=index.dtype)
        return _take(tree, index_shuffle(key, positions, num), self.sharding)


def as_fixed_batches(data: Any, owner: str) -> FixedBatches:
    """`data` as [`bilevel.FixedBatches`][]: a `Minibatch` keeps its arrays, batch
    sizes, seed and bound key; full-batch data (and any deterministic data, whose draws
    all return the whole data) becomes one batch per level. Anything else raises a
    `TypeError` naming `owner` (the solver that needs fixed batches)."""
    data = as_data(data)
    if isinstance(data, FixedBatches):
        return data
    if isinstance(data, Minibatch):
        return FixedBatches(
            data.upper,
            data.lower,
            data.batch_size,
            data.upper_batch_size,
            data.seed,
            data.key,
            data.sharding,
        )
    if isinstance(data, FullBatch):
        return FixedBatches(data.upper, data.lower)
    if data.deterministic:  # every draw is the whole data: one batch per level
        return FixedBatches(data.full_upper(), data.full_lower())
    raise TypeError(
        f"{owner} keeps one memory per batch and needs data split into fixed batches: "
        f"pass a bl.FixedBatches, bl.Minibatch or full batch, got {type(data).__name__}"
    )


def _check_samples(
    owner: str,
    upper: PyTree,
    lower: PyTree,
    upper_whole: bool = False,
    lower_whole: bool = False,
) -> None:
    """Every leaf of a level has the same leading sample axis; a level taken whole
    (`upper_whole`, `lower_whole`: one batch of any pytree) is not checked."""
    levels = (("upper", upper, upper_whole), ("lower", lower, lower_whole))
    for name, tree, whole in levels:
        if whole:
            continue
        leaves = jtu.tree_leaves(tree)
        sizes = {jnp.shape(u)[0] if jnp.ndim(u) else None for u in leaves}
        if None in sizes or len(sizes) > 1:
            raise ValueError(
                f"{owner}: every leaf of `{name}` needs the same leading sample axis; "
                f"got leading sizes {sizes}"
            )


def _check_batch_sizes(owner: str, *sizes) -> None:
    for name, size in zip(("batch_size", "upper_batch_size"), sizes):
        if size is not None and (
            not isinstance(size, int) or isinstance(size, bool) or size < 1
        ):
            raise ValueError(f"{owner}: `{name}` must be a positive int or None")


def _check_seed(owner: str, seed) -> None:
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ValueError(f"{owner}: `seed` must be an int or None, got {seed!r}")


def _bind_key(data, key):
    return eqx.tree_at(lambda d: d.key, data, key, is_leaf=lambda u: u is None)


def _run_key(seed: int | None, key) -> PRNGKeyArray:
    if seed is not None:
        return jr.PRNGKey(seed)
    return jr.PRNGKey(0) if key is None else key


def _num_samples(tree: PyTree) -> int | None:
    leaves = jtu.tree_leaves(tree)
    return jnp.shape(leaves[0])[0] if leaves and jnp.ndim(leaves[0]) else None


def _batches(tree: PyTree, size: int | None) -> int:
    """Whole batches of `size` in one pass over `tree`'s samples (at least 1)."""
    num = _num_samples(tree)
    if num is None or size is None or size >= num:
        return 1
    return num // size


def _take(tree: PyTree, index, sharding) -> PyTree:
    batch = jtu.tree_map(lambda u: jnp.take(u, index, axis=0), tree)
    return constrain(batch, sharding)


def random_subset(
    key: PRNGKeyArray, shape: tuple[int, ...], size: int
) -> Int[Array, "..."]:
    """`size` distinct indices of `range(shape[-1])` for every leading index, every
    subset equally likely: the positions of the `size` smallest of i.i.d. uniforms (one
    batched sort, which the SPMD partitioner keeps local along the leading axes, unlike
    `top_k`)."""
    order = jnp.argsort(jr.uniform(key, shape), axis=-1)
    return order[..., :size].astype(jnp.int32)


def _is_whole(tree: PyTree, size: int | None) -> bool:
    leaves = jtu.tree_leaves(tree)
    return size is None or not leaves or size >= jnp.shape(leaves[0])[0]


def _epoch_indices(run_key, num: int, size: int, draw) -> Array:
    """Positions `size * p ... size * (p + 1) - 1` of epoch `e`'s permutation, for draw
    `e * (num // size) + p`."""
    per_epoch = num // size
    epoch, position = jnp.divmod(jnp.asarray(draw), per_epoch)
    positions = position * size + jnp.arange(size, dtype=position.dtype)
    return index_shuffle(jr.fold_in(run_key, epoch), positions, num)


_SHUFFLE_ROUNDS = 10


def _mix(value, key):
    """A 32-bit integer hash of `value ^ key` (multiply-xorshift finaliser)."""
    value = value ^ key
    value = value * jnp.uint32(0x9E3779B1)
    value = value ^ (value >> jnp.uint32(15))
    value = value * jnp.uint32(0x85EBCA77)
    return value ^ (value >> jnp.uint32(13))


def index_shuffle(
    key: PRNGKeyArray, index: Int[Array, "..."], num: int
) -> Int[Array, "..."]:
    """Entries `index` of a random permutation of `range(num)` drawn from `key`,
    without forming the permutation: O(len(index)) work instead of a sort of `num`.

    A balanced Feistel network on the smallest even number of bits covering `num` (10
    rounds keyed from `key`) is a bijection of that range; repeating it until the value
    falls below `num` ("cycle walking", fewer than 4 repeats on average) restricts it
    to a bijection of `range(num)`.
    """
    index = jnp.asarray(index)
    if num == 1:
        return jnp.zeros_like(index, jnp.int32)
    half = max(1, -(-(num - 1).bit_length() // 2))
    params = (jr.bits(key, (_SHUFFLE_ROUNDS,), jnp.uint32), jnp.uint32(half))
    limit = jnp.uint32(num)
    first = _encrypt(index.astype(jnp.uint32), *params)
    _, out, _, _ = jax.lax.while_loop(_walking, _walk, (limit, first, *params))
    return out.astype(jnp.int32)


def _encrypt(value, round_keys, half):
    """The Feistel network on `2 * half` bits."""
    mask = (jnp.uint32(1) << half) - jnp.uint32(1)
    left, right = value >> half, value & mask
    for r in range(_SHUFFLE_ROUNDS):
        left, right = right, left ^ (_mix(right, round_keys[r]) & mask)
    return (left << half) | right


def _walking(carry) -> Array:
    limit, value, _, _ = carry
    return jnp.any(value >= limit)


def _walk(carry):
    limit, value, round_keys, half = carry
    value = jnp.where(value >= limit, _encrypt(value, round_keys, half), value)
    return limit, value, round_keys, half


def bind_run_key(data: AbstractData, loop_key: PRNGKeyArray) -> AbstractData:
    """`data` with its run-level randomness drawn from a run's loop key (the same
    derivation in `run` and `solve`, so both see the same batches)."""
    return data.with_key(jr.split(loop_key)[0])


def as_data(data: Any) -> AbstractData:
    """`None` -> no data; an `AbstractData` as is; any other pytree ->
    `FullBatch(data)`."""
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
