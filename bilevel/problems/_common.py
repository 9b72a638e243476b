"""Helpers shared by the real-data problems: scikit-learn's packaged datasets (no
downloads), seeded disjoint splits, standardisation, classification metrics, and a
deterministic full-batch minimiser used for refits and baselines."""

import functools as ft
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optimistix as optx
from jaxtyping import Array, Float, Int, PyTree


_LOADERS = ("digits", "breast_cancer", "diabetes")


@ft.cache
def _load(name: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets

    bunch = getattr(datasets, f"load_{name}")()
    features = np.asarray(bunch.data, dtype=np.float64)
    targets = np.asarray(bunch.target)
    features.setflags(write=False)
    targets.setflags(write=False)
    return features, targets


def load_dataset(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Features and targets of a dataset shipped inside scikit-learn (read-only numpy
    arrays, cached): `"digits"` (1797 x 64, 10 classes), `"breast_cancer"` (569 x 30,
    binary) or `"diabetes"` (442 x 10, regression)."""
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; available: {_LOADERS}")
    return _load(name)


def check_int(problem: str, name: str, value: Any, minimum: int = 1) -> None:
    """Raise a `ValueError` naming the problem and argument unless `value` is an int
    `>= minimum`."""
    is_int = isinstance(value, int | np.integer) and not isinstance(value, bool)
    if not is_int or value < minimum:
        raise ValueError(
            f"{problem}: `{name}` must be an int >= {minimum}, got {value!r}"
        )


def split_indices(
    num_samples: int, sizes: Sequence[int | None], seed: int, problem: str
) -> list[np.ndarray]:
    """Disjoint index sets drawn from one seeded permutation of `range(num_samples)`,
    of the given sizes in order (`None`: all remaining samples, last entry only)."""
    fixed = sum(s for s in sizes if s is not None)
    if fixed > num_samples or (None in sizes and fixed >= num_samples):
        raise ValueError(
            f"{problem}: split sizes {list(sizes)} need more than the {num_samples} "
            "samples the dataset has; reduce them"
        )
    order = np.random.default_rng(seed).permutation(num_samples)
    out, start = [], 0
    for size in sizes:
        stop = num_samples if size is None else start + size
        out.append(np.sort(order[start:stop]))
        start = stop
    return out


def standardize(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Centre and scale every column with the training mean and standard deviation
    (constant columns are only centred)."""
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    return [(a - mean) / std for a in (train, *others)]


def as_float(array: Any) -> Array:
    """A jax array in JAX's default floating dtype (float64 under `jax_enable_x64`)."""
    return jnp.asarray(array, dtype=float)


def as_int(array: Any) -> Array:
    """A jax array in JAX's default integer dtype."""
    return jnp.asarray(array, dtype=int)


def softmax_cross_entropy(
    logits: Float[Array, "n c"], labels: Int[Array, " n"]
) -> Float[Array, " n"]:
    r"""Per-sample $-\log \mathrm{softmax}(z_i)_{t_i}$."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]


def accuracy(logits: Float[Array, "n c"], labels: Int[Array, " n"]) -> Array:
    """Fraction of samples whose arg-max logit is the label."""
    return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(logits.dtype))


def f1_score(predicted: Array, actual: Array) -> Array:
    """F1 score of boolean predictions against boolean ground truth (0 when nothing is
    predicted and nothing is positive)."""
    dtype = jnp.result_type(float)
    tp = jnp.sum((predicted & actual).astype(dtype))
    fp = jnp.sum((predicted & ~actual).astype(dtype))
    fn = jnp.sum((~predicted & actual).astype(dtype))
    return jnp.where(tp > 0, 2 * tp / jnp.maximum(2 * tp + fp + fn, 1), 0.0)


@eqx.filter_jit
def minimize(
    fun: Callable[..., Array], y0: PyTree[Array], args: tuple, max_steps: int
) -> PyTree[Array]:
    """Minimise `fun(y, *args)` from `y0` with L-BFGS (optimistix), at most `max_steps`
    iterations, tolerance `1e-9` in float64 (`1e-5` in float32); a non-converged run
    is returned as is. Deterministic; used to refit models and compute baselines,
    never to produce hypergradients. `fun` should be a module-level function or a
    Module so that compilations are shared."""
    dtype = jnp.result_type(*jtu.tree_leaves(y0))
    tol = 1e-9 if jnp.finfo(dtype).bits >= 64 else 1e-5
    sol = optx.minimise(
        lambda y, a: fun(y, *a),
        optx.LBFGS(rtol=tol, atol=tol),
        y0,
        args,
        max_steps=max_steps,
        throw=False,
    )
    return sol.value
