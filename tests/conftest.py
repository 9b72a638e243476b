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
