r"""Data hyper-cleaning on digits: learn per-sample weights that switch off corrupted
training labels."""

import functools as ft
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float

from .._conditions import OptimalityCondition, stationarity_condition
from .._data import FullBatch, Minibatch
from .._problem import BilevelProblem
from ._benchmark import Benchmark
from ._common import (
    accuracy,
    as_float,
    as_int,
    check_int,
    f1_score,
    load_dataset,
    minimize,
    softmax_cross_entropy,
    split_indices,
    standardize,
)


_NUM_CLASSES = 10
# L-BFGS iterations of the reference fits (gradient ~1e-9 at the end).
_REFIT_STEPS = 300


def classifier_logits(y: dict, inputs: Float[Array, "n d"]) -> Float[Array, "n c"]:
    """Logits of the linear model `{"weights", "bias"}` or of the one-hidden-layer tanh
    MLP `{"w1", "b1", "w2", "b2"}`."""
    if "w1" in y:
        hidden = jnp.tanh(inputs @ y["w1"] + y["b1"][None, :])
        return hidden @ y["w2"] + y["b2"][None, :]
    return inputs @ y["weights"] + y["bias"][None, :]


def _penalty(y: dict) -> Array:
    return sum(jnp.sum(y[k] ** 2) for k in ("weights", "w1", "w2") if k in y)


class _WeightedTrainingLoss(eqx.Module):
    reg: float

    def __call__(self, x, y, batch):
        inputs, labels, index = batch
        losses = softmax_cross_entropy(classifier_logits(y, inputs), labels)
        weights = jax.nn.sigmoid(x[index])
        return jnp.mean(weights * losses) + 0.5 * self.reg * _penalty(y)


class _ValidationLoss(eqx.Module):
    def __call__(self, x, y, batch):
        inputs, labels = batch
        return jnp.mean(softmax_cross_entropy(classifier_logits(y, inputs), labels))


def _refit_objective(y, x, reg, inputs, labels, index):
    return _WeightedTrainingLoss(reg)(x, y, (inputs, labels, index))


def _init_model(model: str, dim: int, hidden: int, seed: int, dtype) -> dict:
    if model == "linear":
        return {
            "weights": jnp.zeros((dim, _NUM_CLASSES), dtype),
            "bias": jnp.zeros(_NUM_CLASSES, dtype),
        }
    k1, k2 = jr.split(jr.PRNGKey(seed))
    return {
        "w1": jr.normal(k1, (dim, hidden), dtype) / np.sqrt(dim),
        "b1": jnp.zeros(hidden, dtype),
        "w2": jr.normal(k2, (hidden, _NUM_CLASSES), dtype) / np.sqrt(hidden),
        "b2": jnp.zeros(_NUM_CLASSES, dtype),
    }


def _corrupt(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    num = int(round(fraction * labels.shape[0]))
    mask = np.zeros(labels.shape[0], dtype=bool)
    mask[rng.choice(labels.shape[0], num, replace=False)] = True
    shift = rng.integers(1, _NUM_CLASSES, size=labels.shape[0])
    return np.where(mask, (labels + shift) % _NUM_CLASSES, labels), mask


def hypercleaning(
    corruption: float = 0.3,
    model: Literal["linear", "mlp"] = "linear",
    num_train: int = 500,
    num_val: int = 200,
    seed: int = 0,
    *,
    hidden: int = 32,
    lower_reg: float = 1e-3,
    batch_size: int | None = None,
) -> Benchmark:
    r"""Data hyper-cleaning (Franceschi et al. 2017; Shaban et al. 2019) on
    scikit-learn's digits: a fraction of the training labels is replaced by a random
    wrong class, and per-sample weights $\sigma(x_i)$ are learned so that the
    classifier trained on the weighted data does well on clean validation data:

    $g(x, y) = \frac1n\sum_{i=1}^n \sigma(x_i)\,\ell(y; a_i, t_i) +
    \frac{\mu}{2}\|W\|^2$ (corrupted training data),
    $f(x, y) = \frac{1}{n_v}\sum_j \ell(y; a_j, t_j)$ (clean validation data), with
    $\ell$ the softmax cross-entropy and $W$ the weight matrices (biases are not
    penalised).

    $x \in \mathbb{R}^n$ has one entry per training sample (`x0 = 0`, all weights 1/2);
    $y$ is the classifier: `{"weights", "bias"}` for `model="linear"` (convex lower
    level; strongly convex in $W$ when $\mu > 0$, merely convex when $\mu = 0$) or
    `{"w1", "b1", "w2", "b2"}` for a one-hidden-layer tanh MLP (non-convex lower level:
    its optimality condition is declared symmetric but not positive semidefinite, so
    implicit differentiation uses GMRES instead of CG).

    The 1797 images are split at random into `num_train` training, `num_val` validation
    and the rest test samples; pixels are standardised with training statistics. Lower
    batches are `(inputs, noisy_labels, sample_index)` so minibatches pick the matching
    entries of $x$.

    **Arguments:**

    - `corruption`: fraction of training labels replaced by a uniformly random other
      class, in $[0, 1)$.
    - `model`: `"linear"` or `"mlp"`.
    - `num_train`, `num_val`: split sizes (the test set gets the rest).
    - `seed`: seeds the split, the corruption and the MLP initialisation.
    - `hidden`: MLP width; `lower_reg`: $\mu \ge 0$.
    - `batch_size`: minibatch size for both levels (default: full batches).

    `evaluate(x, y)` returns `test_accuracy` of the classifier $y$,
    `refit_test_accuracy` of a classifier refitted on the weighted training data by 300
    L-BFGS steps from `y0` (the fair measure of $x$ across solvers: penalty methods
    return a $y$ that also descends $f$, i.e. sees the validation labels),
    `f1_corrupted` (F1 score of flagging sample $i$ as corrupted when
    $\sigma(x_i) < 1/2$), `validation_loss` $f(x, y)$, and two reference models fitted
    by L-BFGS on the first call: `baseline_test_accuracy` (uniform weights, i.e.
    $y^*(x_0)$, no cleaning) and `oracle_test_accuracy` (weight 1 on clean and 0 on
    corrupted samples).

    ??? cite "References"
        ```bibtex
        @inproceedings{franceschi2017forward,
          title={Forward and Reverse Gradient-Based Hyperparameter Optimization},
          author={Franceschi, Luca and Donini, Michele and Frasconi, Paolo and
                  Pontil, Massimiliano}, booktitle={ICML}, year={2017}}
        @inproceedings{shaban2019truncated,
          title={Truncated Back-propagation for Bilevel Optimization},
          author={Shaban, Amirreza and Cheng, Ching-An and Hatch, Nathan and
                  Boots, Byron}, booktitle={AISTATS}, year={2019}}
        ```
    """
    if not 0.0 <= corruption < 1.0:
        raise ValueError(
            f"hypercleaning: `corruption` must lie in [0, 1), got {corruption!r}"
        )
    if model not in ("linear", "mlp"):
        raise ValueError(
            f"hypercleaning: `model` must be 'linear' or 'mlp', got {model!r}"
        )
    check_int("hypercleaning", "num_train", num_train)
    check_int("hypercleaning", "num_val", num_val)
    check_int("hypercleaning", "hidden", hidden)
    if batch_size is not None:
        check_int("hypercleaning", "batch_size", batch_size)
    if lower_reg < 0:
        raise ValueError(f"hypercleaning: `lower_reg` must be >= 0, got {lower_reg!r}")
    features, labels = load_dataset("digits")
    train, val, test = split_indices(
        features.shape[0], (num_train, num_val, None), seed, "hypercleaning"
    )
    a_train, a_val, a_test = standardize(features[train], features[val], features[test])
    noisy, corrupted = _corrupt(labels[train], corruption, seed)
    train_data = (as_float(a_train), as_int(noisy), as_int(np.arange(num_train)))
    val_data = (as_float(a_val), as_int(labels[val]))
    test_data = (as_float(a_test), as_int(labels[test]))
    dtype = train_data[0].dtype
    y0 = _init_model(model, a_train.shape[1], hidden, seed, dtype)
    x0 = jnp.zeros(num_train, dtype)
    is_corrupted = jnp.asarray(corrupted)

    def fit(x):
        return minimize(_refit_objective, y0, (x, lower_reg, *train_data), _REFIT_STEPS)

    def test_accuracy(y):
        return accuracy(classifier_logits(y, test_data[0]), test_data[1])

    @ft.cache
    def reference():  # fitted on the first call of `evaluate` only
        oracle_x = jnp.where(is_corrupted, -jnp.inf, jnp.inf).astype(dtype)
        return {
            "baseline_test_accuracy": test_accuracy(fit(x0)),
            "oracle_test_accuracy": test_accuracy(fit(oracle_x)),
        }

    def evaluate(x, y):
        return {
            "test_accuracy": test_accuracy(y),
            "refit_test_accuracy": test_accuracy(fit(x)),
            "f1_corrupted": f1_score(x < 0, is_corrupted),
            "validation_loss": _ValidationLoss()(x, y, val_data),
            **reference(),
        }

    lower = _WeightedTrainingLoss(lower_reg)
    if model == "linear":
        condition = stationarity_condition(lower)
    else:
        condition = OptimalityCondition(
            stationarity_condition(lower).fn, symmetric=True
        )
    if batch_size is None:
        data = FullBatch(upper=val_data, lower=train_data)
    else:
        data = Minibatch(upper=val_data, lower=train_data, batch_size=batch_size)
    return Benchmark(
        name="hypercleaning",
        problem=BilevelProblem(_ValidationLoss(), lower, optimality=condition),
        x0=x0,
        y0=y0,
        data=data,
        evaluate=evaluate,
        metric="refit_test_accuracy",
        maximize=True,
        baseline="baseline_test_accuracy",
    )
