r"""Ridge regression with one learned regularisation weight per feature (diabetes)."""

import functools as ft

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._data import FullBatch, Minibatch
from .._problem import BilevelProblem
from ._benchmark import Benchmark
from ._common import as_float, check_int, load_dataset, split_indices, standardize


# Global regularisation grid of the baseline: log10 lambda from -4 to 2.
_GRID = tuple(np.linspace(-4.0, 2.0, 25) * np.log(10.0))


def _squared_error(y, batch):
    inputs, targets = batch
    return 0.5 * jnp.mean((inputs @ y - targets) ** 2)


class _RidgeLower(eqx.Module):
    def __call__(self, x, y, batch):
        return _squared_error(y, batch) + 0.5 * jnp.sum(jnp.exp(x) * y**2)


class _ValidationLoss(eqx.Module):
    def __call__(self, x, y, batch):
        return _squared_error(y, batch)


def ridge_solution(
    log_reg: Float[Array, " d"],
    inputs: Float[Array, "n d"],
    targets: Float[Array, " n"],
) -> Float[Array, " d"]:
    r"""$y^*(x) = (A^\top A/n + \mathrm{diag}\, e^{x})^{-1} A^\top b / n$."""
    n = inputs.shape[0]
    hessian = inputs.T @ inputs / n + jnp.diag(jnp.exp(log_reg))
    return jnp.linalg.solve(hessian, inputs.T @ targets / n)


def ridge_hypergradient(
    log_reg: Float[Array, " d"],
    train: tuple[Array, Array],
    val: tuple[Array, Array],
) -> Float[Array, " d"]:
    r"""$\nabla F(x) = -(e^{x} \odot y^*) \odot H^{-1} A_v^\top(A_v y^* - b_v)/n_v$ with
    $H = A^\top A/n + \mathrm{diag}\, e^{x}$: the IFT applied to
    $\nabla_y g = H y - A^\top b/n$, whose $x$-Jacobian is
    $\mathrm{diag}(e^x \odot y)$."""
    inputs, targets = train
    val_inputs, val_targets = val
    n = inputs.shape[0]
    hessian = inputs.T @ inputs / n + jnp.diag(jnp.exp(log_reg))
    y = jnp.linalg.solve(hessian, inputs.T @ targets / n)
    grad_y = val_inputs.T @ (val_inputs @ y - val_targets) / val_inputs.shape[0]
    return -(jnp.exp(log_reg) * y) * jnp.linalg.solve(hessian, grad_y)


def ridge_hpo(
    num_train: int = 200,
    num_val: int = 100,
    seed: int = 0,
    *,
    num_noise_features: int = 0,
    batch_size: int | None = None,
    init_log_reg: float = 0.0,
) -> Benchmark:
    r"""Ridge regression on scikit-learn's diabetes data with a learned $\ell_2$ weight
    per feature (Pedregosa 2016; the diabetes ridge set-up of Blondel et al. 2022):

    $g(x, y) = \frac{1}{2n}\|A y - b\|^2 + \frac12\sum_j e^{x_j} y_j^2$ (training data),
    $f(x, y) = \frac{1}{2n_v}\|A_v y - b_v\|^2$ (validation data).

    $x \in \mathbb{R}^d$ holds log-regularisation weights, $y \in \mathbb{R}^d$ the
    regression weights. Closed forms: $y^*(x) = H^{-1}A^\top b/n$ with
    $H = A^\top A/n + \mathrm{diag}\,e^{x}$, and the hypergradient of
    `ridge_hypergradient`; they are `bench.lower_solution` and `bench.hypergradient`.
    The optimal $x^*$ has no closed form (`bench.solution` is `None`).

    Features and target are standardised with training statistics (no intercept is
    needed). The 442 samples are split at random (by `seed`) into `num_train` training,
    `num_val` validation and the rest test samples.

    **Arguments:**

    - `num_train`, `num_val`: split sizes (the test set gets the rest, at least one).
    - `seed`: seeds the split and the noise features.
    - `num_noise_features`: extra standard-normal features carrying no signal; a good
      per-feature regularisation should learn to switch them off.
    - `batch_size`: minibatch size for both levels (default: full batches).
    - `init_log_reg`: the value of every entry of `x0`.

    `evaluate(x, y)` returns `validation_loss` ($F(x) = f(x, y^*(x))$, exact),
    `test_mse` of the model $y$ on the test split (standardised target units),
    `refit_test_mse` of the exact $y^*(x)$ (comparable across solvers), and
    `baseline_validation_loss`, `baseline_test_mse`: the best single global weight
    $e^{x_j} = \lambda$ over a grid of 25 values $\lambda \in [10^{-4}, 10^2]$ chosen on
    the validation loss.

    ??? cite "References"
        ```bibtex
        @inproceedings{pedregosa2016hyperparameter,
          title={Hyperparameter optimization with approximate gradient},
          author={Pedregosa, Fabian}, booktitle={ICML}, year={2016}}
        @inproceedings{blondel2022efficient,
          title={Efficient and Modular Implicit Differentiation},
          author={Blondel, Mathieu and Berthet, Quentin and Cuturi, Marco and
                  Frostig, Roy and Hoyer, Stephan and Llinares-L{\'o}pez, Felipe and
                  Pedregosa, Fabian and Vert, Jean-Philippe}, booktitle={NeurIPS},
          year={2022}}
        ```
    """
    check_int("ridge_hpo", "num_train", num_train)
    check_int("ridge_hpo", "num_val", num_val)
    check_int("ridge_hpo", "num_noise_features", num_noise_features, minimum=0)
    if batch_size is not None:
        check_int("ridge_hpo", "batch_size", batch_size)
    features, targets = load_dataset("diabetes")
    rng = np.random.default_rng(seed)
    if num_noise_features:
        noise = rng.standard_normal((features.shape[0], num_noise_features))
        features = np.concatenate([features, noise], axis=1)
    train, val, test = split_indices(
        features.shape[0], (num_train, num_val, None), seed, "ridge_hpo"
    )
    a_train, a_val, a_test = standardize(features[train], features[val], features[test])
    b_train, b_val, b_test = (
        t[:, 0]
        for t in standardize(
            targets[train, None], targets[val, None], targets[test, None]
        )
    )
    train_data = (as_float(a_train), as_float(b_train))
    val_data = (as_float(a_val), as_float(b_val))
    test_data = (as_float(a_test), as_float(b_test))
    dim = a_train.shape[1]

    def lower_solution(x):
        return ridge_solution(x, *train_data)

    def hypergradient(x):
        return ridge_hypergradient(x, train_data, val_data)

    def validation_loss(x):
        return _squared_error(lower_solution(x), val_data)

    @ft.cache
    def baseline():  # grid search on the first call of `evaluate` only
        grid = as_float(_GRID)
        losses = [float(validation_loss(jnp.full(dim, v))) for v in grid]
        best = jnp.full(dim, grid[int(np.argmin(losses))])
        return {
            "baseline_validation_loss": as_float(min(losses)),
            "baseline_test_mse": 2 * _squared_error(lower_solution(best), test_data),
        }

    def evaluate(x, y):
        return {
            "validation_loss": validation_loss(x),
            "test_mse": 2 * _squared_error(y, test_data),
            "refit_test_mse": 2 * _squared_error(lower_solution(x), test_data),
            **baseline(),
        }

    if batch_size is None:
        data = FullBatch(upper=val_data, lower=train_data)
    else:
        data = Minibatch(upper=val_data, lower=train_data, batch_size=batch_size)
    return Benchmark(
        name="ridge_hpo",
        problem=BilevelProblem(_ValidationLoss(), _RidgeLower()),
        x0=jnp.full(dim, init_log_reg, dtype=train_data[0].dtype),
        y0=jnp.zeros(dim, dtype=train_data[0].dtype),
        data=data,
        evaluate=evaluate,
        lower_solution=lower_solution,
        hypergradient=hypergradient,
        metric="validation_loss",
        maximize=False,
        baseline="baseline_validation_loss",
    )
