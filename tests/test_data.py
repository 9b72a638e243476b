"""Data layer: the index shuffle, run-key epoch permutations (issue 13, section 5) and
the fixed-batch sampler of the variance-reduced solvers."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import bilevel as bl
from bilevel._data import as_fixed_batches, index_shuffle


# --- index shuffle -------------------------------------------------------------------


@pytest.mark.parametrize("num", [1, 2, 7, 64, 1000, 1025])
def test_index_shuffle_is_a_permutation(num):
    perms = [
        np.asarray(index_shuffle(jr.PRNGKey(seed), jnp.arange(num), num))
        for seed in range(3)
    ]
    for perm in perms:
        assert sorted(perm.tolist()) == list(range(num))
    if num >= 7:  # 3 equal permutations out of num! would be a broken key schedule
        assert not np.array_equal(perms[0], perms[1])
    # Entries are computed independently: any subset of positions gives the same values.
    part = index_shuffle(jr.PRNGKey(0), jnp.arange(num)[num // 2 :], num)
    assert np.array_equal(np.asarray(part), perms[0][num // 2 :])


def test_index_shuffle_is_uniform():
    # Over 20000 keys, the (first, second) entries of a permutation of 10 must be
    # uniform on the 90 ordered pairs: chi^2/dof is 1 +- 0.15 for a uniform law; 1.5 is
    # 3.3 sigma. (A 6-round network gave 1.8 here: the test can fail.) The keys are
    # fixed, so the statistic is deterministic.
    num, draws = 10, 20000
    keys = jr.split(jr.PRNGKey(0), draws)
    values = np.asarray(jax.vmap(lambda k: index_shuffle(k, jnp.arange(2), num))(keys))
    counts = np.zeros((num, num))
    np.add.at(counts, (values[:, 0], values[:, 1]), 1)
    off_diagonal = ~np.eye(num, dtype=bool)
    assert counts[~off_diagonal].sum() == 0  # a permutation: no repeated entry
    expected = draws / (num * (num - 1))
    chi2 = np.sum((counts[off_diagonal] - expected) ** 2 / expected)
    assert chi2 / (num * (num - 1) - 1) < 1.5


# --- Minibatch epochs from the run key (issue 13, section 5) -------------------------


@eqx.filter_jit
def _draws(data, draws):
    return jax.vmap(lambda d: data.lower_batch(jr.PRNGKey(0), d))(draws)


def _epoch(data, epoch, per_epoch):
    return np.asarray(_draws(data, per_epoch * epoch + jnp.arange(per_epoch))).ravel()


def test_minibatch_epochs_come_from_the_bound_key():
    data = bl.Minibatch(upper=None, lower=jnp.arange(12.0), batch_size=4)
    first = data.with_key(jr.PRNGKey(1))
    second = data.with_key(jr.PRNGKey(2))
    for bound in (first, second):
        for epoch in range(2):
            assert sorted(_epoch(bound, epoch, 3).tolist()) == list(range(12))
    assert not np.array_equal(_epoch(first, 0, 3), _epoch(second, 0, 3))
    assert not np.array_equal(_epoch(first, 0, 3), _epoch(first, 1, 3))
    # Unbound data uses key 0; an explicit seed overrides any bound key.
    assert np.array_equal(
        _epoch(data, 0, 3), _epoch(data.with_key(jr.PRNGKey(0)), 0, 3)
    )
    seeded = bl.Minibatch(upper=None, lower=jnp.arange(12.0), batch_size=4, seed=5)
    assert seeded.with_key(jr.PRNGKey(1)) is seeded
    assert data.epoch_length == 3


@pytest.fixture(scope="module")
def quadratic_runs():
    """SOBA with fixed steps on a minibatch quadratic: its only randomness is the
    data's."""
    bench = bl.problems.quadratic(
        dim_x=2, dim_y=4, seed=0, num_samples=16, batch_size=4
    )
    solver = bl.solvers.SOBA(inner_lr=0.1, outer_lr=0.1)

    @eqx.filter_jit
    def runs(data, keys):
        def run(key):
            _, history = bl.run(
                bench.problem, solver, bench.x0, bench.y0, data, 12, key
            )
            return history["lower_residual"]

        return jax.vmap(run)(keys)

    return bench, solver, runs


def test_vmapped_runs_with_different_keys_differ(quadratic_runs):
    bench, _, runs = quadratic_runs
    keys = jr.split(jr.PRNGKey(0), 3)
    histories = np.asarray(runs(bench.data, keys))
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert not np.array_equal(histories[a], histories[b])
    again = np.asarray(runs(bench.data, jnp.stack([keys[1], keys[1]])))
    assert np.array_equal(again[0], histories[1]) and np.array_equal(
        again[1], histories[1]
    )
    # An explicit seed is the documented way to get the same batches in every run.
    seeded = bl.Minibatch(upper=None, lower=bench.data.lower, batch_size=4, seed=3)
    fixed = np.asarray(runs(seeded, keys))
    assert np.array_equal(fixed[0], fixed[1]) and np.array_equal(fixed[0], fixed[2])


def test_solve_and_run_bind_the_same_key(quadratic_runs):
    bench, solver, _ = quadratic_runs
    key = jr.PRNGKey(7)
    result = bl.solve(
        bench.problem,
        solver,
        bench.x0,
        bench.y0,
        bench.data,
        12,
        key,
        log_every=5,
        progress=False,
    )
    state, _ = bl.run(bench.problem, solver, bench.x0, bench.y0, bench.data, 12, key)
    assert np.array_equal(np.asarray(result.x), np.asarray(solver.params(state)[0]))


def test_problems_sample_from_the_run_key():
    assert bl.problems.quadratic(batch_size=4).data.seed is None


# --- FixedBatches --------------------------------------------------------------------


def _fixed(**kwargs):
    return bl.FixedBatches(
        upper=jnp.arange(9.0),
        lower={"i": jnp.arange(12)},
        batch_size=4,
        upper_batch_size=3,
        **kwargs,
    )


@eqx.filter_jit
def _split(data):
    return jax.vmap(lambda k: data.lower_batch_at(k)["i"])(jnp.arange(3))


def test_fixed_batches_split_the_samples():
    data = _fixed().with_key(jr.PRNGKey(3))
    sizes = (data.num_lower_batches, data.num_upper_batches, data.epoch_length)
    assert sizes == (3, 3, 3)
    rows = np.asarray(_split(data))
    assert sorted(rows.ravel().tolist()) == list(range(12))  # a partition
    assert not np.array_equal(rows, _split(_fixed().with_key(jr.PRNGKey(4))))
    assert _fixed(seed=2).with_key(jr.PRNGKey(4)).key is None  # the seed wins


@eqx.filter_jit
def _indexed(data, draws, stream):
    def one(t):
        index, batch = data.lower_indexed(None, t, stream)
        return (
            index,
            batch["i"],
            data.lower_batch_at(index)["i"],
            data.lower_batch(None, t, stream)["i"],
        )

    return jax.vmap(one)(draws)


def test_fixed_batches_indexed_draws():
    data = _fixed().with_key(jr.PRNGKey(3))
    index, batch, by_index, plain = map(np.asarray, _indexed(data, jnp.arange(12), 0))
    assert np.array_equal(batch, by_index) and np.array_equal(batch, plain)
    orders = index.reshape(4, 3)
    # Every batch once per epoch, in a new order each epoch.
    assert all(sorted(order) == [0, 1, 2] for order in orders.tolist())
    assert len({tuple(order) for order in orders.tolist()}) > 1
    assert not np.array_equal(index, np.asarray(_indexed(data, jnp.arange(12), 1)[0]))
    upper_index, upper = data.upper_indexed(None, jnp.array(0))
    assert upper.shape == (3,) and 0 <= int(upper_index) < 3


def test_fixed_batches_conversions_and_errors():
    with pytest.raises(
        ValueError, match=r"`batch_size`=5 must divide the 12 .* \[3, 4, 6\]"
    ):
        bl.FixedBatches(upper=None, lower=jnp.arange(12.0), batch_size=5)
    with pytest.raises(ValueError, match="upper_batch_size"):
        bl.FixedBatches(upper=jnp.arange(9.0), lower=jnp.arange(12.0), batch_size=4)
    minibatch = bl.Minibatch(
        upper=jnp.arange(9.0), lower=jnp.arange(12.0), batch_size=3
    )
    converted = as_fixed_batches(minibatch.with_key(jr.PRNGKey(1)), "SABA")
    assert (converted.num_lower_batches, converted.num_upper_batches) == (4, 3)
    assert np.array_equal(converted.key, jr.PRNGKey(1))
    full = as_fixed_batches(bl.FullBatch(upper=jnp.arange(9.0), lower=None), "SABA")
    assert full.deterministic and full.epoch_length == 1
    assert np.array_equal(full.upper_batch_at(0), jnp.arange(9.0))
    assert np.array_equal(full.full_upper(), jnp.arange(9.0))

    class Custom(bl.AbstractData):
        def upper_batch(self, key, draw, stream=0):
            return None

        def lower_batch(self, key, draw, stream=0):
            return None

    with pytest.raises(TypeError, match="SABA keeps one memory per batch"):
        as_fixed_batches(Custom(), "SABA")
    with pytest.raises(TypeError, match="cannot give all its lower data"):
        Custom().full_lower()


def test_full_batches_of_any_pytree_run_the_memory_solvers():
    """Full-batch data whose leaves have no sample axis (here the scales of the
    objectives) is one fixed batch per level: SABA runs on it and matches the same
    problem with the scales written into the objectives (no data); a split level
    still needs a common sample axis."""
    scales = {"s": jnp.asarray(3.0), "t": jnp.asarray(0.5)}
    whole = as_fixed_batches(bl.FullBatch(upper=scales, lower=scales), "SABA")
    assert whole.deterministic and whole.upper_batch_at(0) is scales
    with pytest.raises(ValueError, match="same leading sample axis"):
        bl.FixedBatches(upper=None, lower=scales, batch_size=1)

    def problem(data_scales):
        def lower(x, y, d):
            d = data_scales if d is None else d
            return d["s"] * (0.5 * jnp.sum(y**2) - jnp.dot(x, y))

        def upper(x, y, d):
            d = data_scales if d is None else d
            return d["t"] * 0.5 * jnp.sum((y - 1.0) ** 2)

        return bl.BilevelProblem(upper=upper, lower=lower)

    x0, y0 = jnp.zeros(3), jnp.zeros(3)
    solver = bl.solvers.SABA()
    with_data, _ = bl.run(
        problem(None),
        solver,
        x0,
        y0,
        bl.FullBatch(upper=scales, lower=scales),
        50,
        jr.PRNGKey(0),
    )
    baked, _ = bl.run(problem(scales), solver, x0, y0, None, 50, jr.PRNGKey(0))
    np.testing.assert_allclose(with_data.x, baked.x, rtol=1e-6)
    assert float(jnp.max(jnp.abs(with_data.x - x0))) > 1e-3  # it moved
