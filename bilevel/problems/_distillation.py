r"""Dataset distillation on digits: learn a few synthetic images per class such that a
model trained on them alone does well on the real data."""

import functools as ft
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
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
    load_dataset,
    minimize,
    softmax_cross_entropy,
    split_indices,
    standardize,
)
from ._hypercleaning import classifier_logits


_NUM_CLASSES = 10
_REFIT_STEPS = 300  # L-BFGS iterations when an MLP is retrained on a synthetic set


def rbf_kernel(
    a: Float[Array, "n d"], b: Float[Array, "m d"], gamma: float
) -> Float[Array, "n m"]:
    r"""$k(a, b) = \exp(-\gamma \|a - b\|^2)$, from explicit differences so that the
    diagonal of $k(a, a)$ is exactly 1 and its derivative exactly 0."""
    diff = a[:, None, :] - b[None, :, :]
    return jnp.exp(-gamma * jnp.sum(diff**2, axis=-1))


class _KernelRidgeLower(eqx.Module):
    """$g(x, \\alpha) = \\frac12 \\mathrm{tr}\\,\\alpha^\\top (K(x, x) + \\lambda
    I)\\alpha - \\mathrm{tr}\\,\\alpha^\\top Y_s$: its minimiser is the kernel ridge
    regression fit of the one-hot labels $Y_s$ on the synthetic images $x$."""

    targets: Array
    gamma: float
    reg: float

    def __call__(self, x, y, batch):
        gram = rbf_kernel(x, x, self.gamma)
        fitted = gram @ y + self.reg * y
        return 0.5 * jnp.sum(y * fitted) - jnp.sum(y * self.targets)


class _KernelRidgeUpper(eqx.Module):
    gamma: float

    def __call__(self, x, y, batch):
        inputs, labels = batch
        predictions = rbf_kernel(inputs, x, self.gamma) @ y
        one_hot = jax.nn.one_hot(labels, _NUM_CLASSES, dtype=predictions.dtype)
        return 0.5 * jnp.mean(jnp.sum((predictions - one_hot) ** 2, axis=-1))


class _MLPLower(eqx.Module):
    labels: Array
    reg: float

    def __call__(self, x, y, batch):
        logits = classifier_logits(y, x)
        penalty = jnp.sum(y["w1"] ** 2) + jnp.sum(y["w2"] ** 2)
        loss = jnp.mean(softmax_cross_entropy(logits, self.labels))
        return loss + 0.5 * self.reg * penalty


class _MLPUpper(eqx.Module):
    def __call__(self, x, y, batch):
        inputs, labels = batch
        return jnp.mean(softmax_cross_entropy(classifier_logits(y, inputs), labels))


def _retrain_mlp(y, x, labels, reg):
    return _MLPLower(labels, reg)(x, y, None)


def kernel_ridge_solution(
    x: Float[Array, "m d"], targets: Float[Array, "m c"], gamma: float, reg: float
) -> Float[Array, "m c"]:
    r"""$\alpha^*(x) = (K(x, x) + \lambda I)^{-1} Y_s$ by a direct solve."""
    gram = rbf_kernel(x, x, gamma)
    return jnp.linalg.solve(gram + reg * jnp.eye(x.shape[0], dtype=x.dtype), targets)


def _mlp_init(dim: int, hidden: int, seed: int, dtype) -> dict:
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return {
        "w1": jax.random.normal(k1, (dim, hidden), dtype) / np.sqrt(dim),
        "b1": jnp.zeros(hidden, dtype),
        "w2": jax.random.normal(k2, (hidden, _NUM_CLASSES), dtype) / np.sqrt(hidden),
        "b2": jnp.zeros(_NUM_CLASSES, dtype),
    }


def distillation(
    images_per_class: int = 1,
    lower: Literal["krr", "mlp"] = "krr",
    num_train: int = 500,
    seed: int = 0,
    *,
    gamma: float | None = None,
    reg: float = 1e-2,
    hidden: int = 32,
    batch_size: int | None = None,
) -> Benchmark:
    r"""Dataset distillation (Wang et al. 2018) on scikit-learn's digits: learn
    $k$ synthetic images per class, $x \in \mathbb{R}^{10k \times 64}$ with fixed
    labels, such that a model trained on them alone fits the real training data.

    - `lower="krr"` (KIP, Nguyen et al. 2021): the model is kernel ridge regression with
      the RBF kernel $k(a, b) = e^{-\gamma\|a - b\|^2}$; the lower variable is the dual
      coefficient matrix $\alpha \in \mathbb{R}^{10k \times 10}$,
      $g(x, \alpha) = \frac12\mathrm{tr}\,\alpha^\top(K(x, x) + \lambda I)\alpha -
      \mathrm{tr}\,\alpha^\top Y_s$ (strongly convex), and
      $f(x, \alpha) = \frac{1}{2n}\sum_i \|K(a_i, x)\alpha - e_{t_i}\|^2$ on the real
      training data. $\alpha^*(x) = (K + \lambda I)^{-1}Y_s$ is `bench.lower_solution`,
      and `bench.hypergradient` differentiates $f(x, \alpha^*(x))$ through that direct
      solve (an oracle independent of the IFT code).
    - `lower="mlp"` (the set-up of Blondel et al. 2022 with an MLP in place of logistic
      regression): the lower variable is a one-hidden-layer tanh MLP trained on the
      synthetic set, $g = $ mean cross-entropy $+ \frac{\lambda}{2}\|W\|^2$, and $f$ is
      the cross-entropy on the real training data. The hypergradient comes from
      implicit differentiation of the (non-convex) stationarity condition, declared
      symmetric but not positive semidefinite (GMRES).

    `x0` is a random real subset with `images_per_class` images of each class (seeded),
    so the baseline "model trained on random real images of the same size" is the model
    trained on `x0`. The 1797 images are split into `num_train` training images (the
    upper-level data; `batch_size` draws minibatches of them) and the rest test images;
    pixels are standardised with training statistics. The lower level has no data: its
    training set is $x$ itself.

    **Arguments:**

    - `images_per_class`: $k$.
    - `lower`: `"krr"` or `"mlp"`.
    - `num_train`: real training images (the rest are test images).
    - `seed`: seeds the split, the initial subset and the MLP initialisation.
    - `gamma`: RBF width $\gamma$ (default $1/64$, one over the number of pixels).
    - `reg`: $\lambda$, the kernel ridge (or MLP weight-decay) parameter.
    - `hidden`: MLP width.
    - `batch_size`: minibatch size of real images for the upper level.

    `evaluate(x, y)` returns `test_accuracy` of the model $y$ (with $x$ as its support
    set for KRR), `train_loss` $f(x, y)$, `distilled_test_accuracy` of a model trained
    from scratch on $x$ (KRR: exact; MLP: 300 L-BFGS steps from the fixed
    initialisation `y0`), and `baseline_test_accuracy`, the same for the random real
    subset `x0`.

    ??? cite "References"
        ```bibtex
        @article{wang2018dataset,
          title={Dataset Distillation}, author={Wang, Tongzhou and Zhu, Jun-Yan and
          Torralba, Antonio and Efros, Alexei A}, journal={arXiv:1811.10959},
          year={2018}}
        @inproceedings{nguyen2021dataset,
          title={Dataset Meta-Learning from Kernel Ridge-Regression},
          author={Nguyen, Timothy and Chen, Zhourong and Lee, Jaehoon},
          booktitle={ICLR}, year={2021}}
        @inproceedings{blondel2022efficient,
          title={Efficient and Modular Implicit Differentiation},
          author={Blondel, Mathieu and others}, booktitle={NeurIPS}, year={2022}}
        ```
    """
    check_int("distillation", "images_per_class", images_per_class)
    check_int("distillation", "num_train", num_train)
    check_int("distillation", "hidden", hidden)
    if batch_size is not None:
        check_int("distillation", "batch_size", batch_size)
    if lower not in ("krr", "mlp"):
        raise ValueError(f"distillation: `lower` must be 'krr' or 'mlp', got {lower!r}")
    if not reg > 0:
        raise ValueError(f"distillation: `reg` must be > 0, got {reg!r}")
    features, labels = load_dataset("digits")
    train, test = split_indices(
        features.shape[0], (num_train, None), seed, "distillation"
    )
    a_train, a_test = standardize(features[train], features[test])
    counts = np.bincount(labels[train], minlength=_NUM_CLASSES)
    if counts.min() < images_per_class:
        raise ValueError(
            f"distillation: `images_per_class={images_per_class}` exceeds the smallest "
            f"class count {counts.min()} among the {num_train} training images"
        )
    rng = np.random.default_rng(seed + 2)
    subset = np.concatenate(
        [
            rng.choice(
                np.flatnonzero(labels[train] == c), images_per_class, replace=False
            )
            for c in range(_NUM_CLASSES)
        ]
    )
    synthetic_labels = np.repeat(np.arange(_NUM_CLASSES), images_per_class)
    train_data = (as_float(a_train), as_int(labels[train]))
    test_data = (as_float(a_test), as_int(labels[test]))
    dtype = train_data[0].dtype
    x0 = as_float(a_train[subset])
    gamma = 1.0 / a_train.shape[1] if gamma is None else float(gamma)
    num_synthetic = synthetic_labels.shape[0]

    if lower == "krr":
        targets = jax.nn.one_hot(as_int(synthetic_labels), _NUM_CLASSES, dtype=dtype)
        lower_fn = _KernelRidgeLower(targets, gamma, reg)
        upper_fn = _KernelRidgeUpper(gamma)
        problem = BilevelProblem(upper_fn, lower_fn)
        y0 = jnp.zeros((num_synthetic, _NUM_CLASSES), dtype)

        def lower_solution(x):
            return kernel_ridge_solution(x, targets, gamma, reg)

        def hypergradient(x):
            return jax.grad(lambda u: upper_fn(u, lower_solution(u), train_data))(x)

        def test_accuracy(x, y):
            return accuracy(rbf_kernel(test_data[0], x, gamma) @ y, test_data[1])

        def retrained_accuracy(x):
            return test_accuracy(x, lower_solution(x))

    else:
        lower_fn = _MLPLower(as_int(synthetic_labels), reg)
        upper_fn = _MLPUpper()
        condition = OptimalityCondition(
            stationarity_condition(lower_fn).fn, symmetric=True
        )
        problem = BilevelProblem(upper_fn, lower_fn, optimality=condition)
        y0 = _mlp_init(a_train.shape[1], hidden, seed, dtype)
        lower_solution = hypergradient = None

        def test_accuracy(x, y):
            return accuracy(classifier_logits(y, test_data[0]), test_data[1])

        def retrained_accuracy(x):
            y = minimize(_retrain_mlp, y0, (x, lower_fn.labels, reg), _REFIT_STEPS)
            return test_accuracy(x, y)

    @ft.cache
    def baseline():  # computed on the first call of `evaluate` only
        return {"baseline_test_accuracy": retrained_accuracy(x0)}

    def evaluate(x, y):
        return {
            "test_accuracy": test_accuracy(x, y),
            "train_loss": upper_fn(x, y, train_data),
            "distilled_test_accuracy": retrained_accuracy(x),
            **baseline(),
        }

    if batch_size is None:
        data = FullBatch(upper=train_data, lower=None)
    else:
        data = Minibatch(upper=train_data, lower=None, batch_size=batch_size)
    return Benchmark(
        name="distillation",
        problem=problem,
        x0=x0,
        y0=y0,
        data=data,
        evaluate=evaluate,
        lower_solution=lower_solution,
        hypergradient=hypergradient,
        metric="distilled_test_accuracy",
        maximize=True,
        baseline="baseline_test_accuracy",
    )
