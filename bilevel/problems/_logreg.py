r"""Logistic regression with one learned $\ell_2$ weight per feature (breast cancer)."""

import functools as ft

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._data import FullBatch, Minibatch
from .._problem import BilevelProblem
from ._benchmark import Benchmark
from ._common import (
    as_float,
    check_int,
    load_dataset,
    minimize,
    split_indices,
    standardize,
)


# Global regularisation grid of the baseline: log10 lambda from -5 to 1.
_GRID = tuple(np.linspace(-5.0, 1.0, 13) * np.log(10.0))
_REFIT_STEPS = 100  # L-BFGS iterations of a refit: the 31-parameter problem converges


def _scores(y, inputs):
    return inputs @ y["weights"] + y["bias"]


def logistic_loss(y: dict, batch: tuple[Array, Array]) -> Float[Array, ""]:
    r"""Mean $\log(1 + e^{-s_i (a_i^\top w + c)})$ over a batch of inputs $a_i$ and
    labels $s_i \in \{0, 1\}$ (mapped to $\pm 1$)."""
    inputs, labels = batch
    return jnp.mean(jax.nn.softplus(-(2 * labels - 1) * _scores(y, inputs)))


class _RegularisedLoss(eqx.Module):
    def __call__(self, x, y, batch):
        return logistic_loss(y, batch) + 0.5 * jnp.sum(jnp.exp(x) * y["weights"] ** 2)


class _ValidationLoss(eqx.Module):
    def __call__(self, x, y, batch):
        return logistic_loss(y, batch)


def _refit_objective(y, log_reg, inputs, labels):
    return _RegularisedLoss()(log_reg, y, (inputs, labels))


def _accuracy(y, batch):
    inputs, labels = batch
    predicted = (_scores(y, inputs) > 0).astype(labels.dtype)
    return jnp.mean((predicted == labels).astype(labels.dtype))


def logreg_hpo(
    num_train: int = 200,
    num_val: int = 150,
    seed: int = 0,
    *,
    batch_size: int | None = None,
    init_log_reg: float = 0.0,
) -> Benchmark:
    r"""Binary logistic regression on scikit-learn's breast-cancer data with a learned
    $\ell_2$ weight per feature (Pedregosa 2016; Blondel et al. 2022):

    $g(x, y) = \frac1n\sum_i \log(1 + e^{-s_i(a_i^\top w + c)}) + \frac12\sum_j e^{x_j}
    w_j^2$ (training data), $f(x, y) =$ the same mean logistic loss on validation data,
    without the penalty.

    $x \in \mathbb{R}^{30}$ holds log-regularisation weights; $y$ is the dict
    `{"weights": w, "bias": c}` (the intercept is not penalised). The lower level is
    strongly convex in $w$ and convex in $c$. The 569 samples are split at random into
    `num_train` training, `num_val` validation and the rest test samples; features are
    standardised with training statistics.

    **Arguments:**

    - `num_train`, `num_val`: split sizes (the test set gets the rest).
    - `seed`: seeds the split.
    - `batch_size`: minibatch size for both levels (default: full batches).
    - `init_log_reg`: the value of every entry of `x0`.

    `evaluate(x, y)` returns `validation_loss` ($F(x)$ with $y^*(x)$ refitted by 100
    L-BFGS steps) and `refit_test_accuracy` of that refitted model (comparable across
    solvers), `test_accuracy` and `test_loss` of the model $y$, and the baseline
    `baseline_validation_loss`, `baseline_test_accuracy`: one global weight
    $e^{x_j} = \lambda$, the best of 13 values $\lambda \in [10^{-5}, 10]$ on the
    validation loss.

    ??? cite "References"
        ```bibtex
        @inproceedings{pedregosa2016hyperparameter,
          title={Hyperparameter optimization with approximate gradient},
          author={Pedregosa, Fabian}, booktitle={ICML}, year={2016}}
        @inproceedings{blondel2022efficient,
          title={Efficient and Modular Implicit Differentiation},
          author={Blondel, Mathieu and others}, booktitle={NeurIPS}, year={2022}}
        ```
    """
    check_int("logreg_hpo", "num_train", num_train)
    check_int("logreg_hpo", "num_val", num_val)
    if batch_size is not None:
        check_int("logreg_hpo", "batch_size", batch_size)
    features, labels = load_dataset("breast_cancer")
    train, val, test = split_indices(
        features.shape[0], (num_train, num_val, None), seed, "logreg_hpo"
    )
    a_train, a_val, a_test = standardize(features[train], features[val], features[test])
    train_data = (as_float(a_train), as_float(labels[train]))
    val_data = (as_float(a_val), as_float(labels[val]))
    test_data = (as_float(a_test), as_float(labels[test]))
    dim = a_train.shape[1]
    dtype = train_data[0].dtype
    y0 = {"weights": jnp.zeros(dim, dtype), "bias": jnp.zeros((), dtype)}

    def refit(x):
        return minimize(_refit_objective, y0, (x, *train_data), _REFIT_STEPS)

    @ft.cache
    def baseline():  # grid search on the first call of `evaluate` only
        models = [refit(jnp.full(dim, v, dtype)) for v in as_float(_GRID)]
        losses = [float(logistic_loss(m, val_data)) for m in models]
        best = models[int(np.argmin(losses))]
        return {
            "baseline_validation_loss": as_float(min(losses)),
            "baseline_test_accuracy": _accuracy(best, test_data),
        }

    def evaluate(x, y):
        model = refit(x)
        return {
            "validation_loss": logistic_loss(model, val_data),
            "test_accuracy": _accuracy(y, test_data),
            "refit_test_accuracy": _accuracy(model, test_data),
            "test_loss": logistic_loss(y, test_data),
            **baseline(),
        }

    if batch_size is None:
        data = FullBatch(upper=val_data, lower=train_data)
    else:
        data = Minibatch(upper=val_data, lower=train_data, batch_size=batch_size)
    return Benchmark(
        name="logreg_hpo",
        problem=BilevelProblem(_ValidationLoss(), _RegularisedLoss()),
        x0=jnp.full(dim, init_log_reg, dtype),
        y0=y0,
        data=data,
        evaluate=evaluate,
        metric="validation_loss",
        maximize=False,
        baseline="baseline_validation_loss",
    )
