"""Test configuration: float64, strict dtype and rank promotion, key fixture."""

import jax
import jax.random as jr
import pytest


jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def getkey():
    """Hands out fresh PRNG keys, deterministically per test."""
    state = {"key": jr.PRNGKey(1234)}

    def _next():
        state["key"], sub = jr.split(state["key"])
        return sub

    return _next


# The slowest modules first: pytest-xdist hands whole modules to its workers
# (`--dist loadscope`), so a slow module collected last would run alone at the end.
_SLOW_MODULES = (
    "test_distributed.py",
    "test_migration.py",
    "test_bsvrb.py",
    "test_stochastic.py",
    "test_unrolled.py",
    "test_solve.py",
)


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in _SLOW_MODULES)
