r"""Hyper-representation learning with a recurrent feature extractor on scikit-learn's
digits, read row by row as sequences (the unbounded-smoothness setting of BO-REP)."""

import functools as ft

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float

from .._data import FullBatch, Minibatch
from .._problem import BilevelProblem
from ._benchmark import Benchmark


Params = dict[str, Array]
Batch = dict[str, Array]


def hyper_representation(
    num_tasks: int = 20,
    ways: int = 2,
    shots: int = 5,
    queries: int = 15,
    hidden: int = 16,
    num_test_tasks: int = 50,
    reg: float = 0.1,
    seed: int = 0,
    *,
    batch_size: int | None = None,
    newton_steps: int = 20,
) -> Benchmark:
    r"""Hyper-representation (meta-) learning with an Elman RNN encoder, after the
    BO-REP paper's first experiment (Hao, Gong and Liu, ICLR 2024, where the encoder is
    a 2-layer RNN on word vectors of Amazon reviews), scaled down to scikit-learn's
    $8\times 8$ digits: each image is a sequence of 8 rows of 8 pixels (values in
    $[0, 1]$).

    Upper variable $x = (W_{\text{in}}, W_{\text{rec}}, c)$, the encoder
    $h_s = \tanh(W_{\text{in}} u_s + W_{\text{rec}} h_{s-1} + c)$, $h_0 = 0$, whose
    feature is the max over the 8 time steps, $\phi_x(u) = \max_s h_s$ (max pooling, as
    in the paper). Lower variable $y = (W_t, b_t)_{t=1}^T$, one linear `ways`-way head
    per training task. Each task $t$ picks `ways` digit classes and, per class, `shots`
    support and `queries` query images from the training half of the data:

    $g(x, y) = \sum_{t=1}^T \Big[\frac{1}{|S_t|}\sum_{i\in S_t}
    \ell\big(W_t^\top\phi_x(u_i) + b_t, l_i\big) +
    \frac{\lambda}{2}\|(W_t, b_t)\|^2\Big]$,
    $\quad f(x, y) = \frac{1}{|Q|}\sum_{t}\sum_{i\in Q_t}
    \ell\big(W_t^\top\phi_x(u_i) + b_t, l_i\big)$,

    with $\ell$ the softmax cross-entropy. $g$ is $\lambda$-strongly convex in $y$ (the
    bias is regularized too, so the softmax shift invariance is removed); $f$ is
    smooth but not $L$-smooth in $x$: its curvature grows with $\|W_{\text{rec}}\|$.
    Unlike the paper (a squared-free $10^{-4}\|y\|$ penalty, a shared MLP head), we use
    a squared norm and one linear head per task so that the lower level is strongly
    convex, as the theory assumes.

    Batches hold flat samples `{"images": (n, 8, 8), "labels": (n,), "tasks": (n,)}`:
    the support set is the lower data and the query set the upper data. Written over a
    batch, $g$ is `num_tasks` times the mean support loss plus the penalty, an unbiased
    estimate under sampling with equal support sizes.

    `evaluate(x, y)` returns the full `upper_loss`, the `query_accuracy` of the heads
    $y$, the `lower_residual` $\|\nabla_y g\|$, and the meta-test metrics
    `test_accuracy` / `test_loss`: fresh heads fitted (Newton's method) on the support
    sets of `num_test_tasks` tasks drawn from the held-out half of the images, scored
    on their query sets. `lower_solution(x)` is $y^*(x)$ by the same Newton solve (not
    a closed form).

    **Arguments:**

    - `num_tasks` $T$, `ways`, `shots`, `queries`: training tasks and their sizes.
    - `hidden`: width of the recurrent state.
    - `num_test_tasks`: meta-test tasks used by `evaluate`.
    - `reg`: $\lambda > 0$.
    - `seed`: seeds the split, the tasks and $x_0$ ($W_{\text{in}} \sim
      \mathcal{N}(0, 1/8)$,
      $W_{\text{rec}} \sim \mathcal{N}(0, 1/(4\cdot\text{hidden}))$, $c = 0$);
      $y_0 = 0$.
    - `batch_size`: minibatch size over samples (`None`: full batches); the upper batch
      has the same size.
    - `newton_steps`: Newton iterations of the head fits in `evaluate` and
      `lower_solution`.

    ??? cite "References"

        ```bibtex
        @inproceedings{hao2024borep,
          title={Bilevel Optimization under Unbounded Smoothness: A New Algorithm and
                 Convergence Analysis},
          author={Hao, Jie and Gong, Xiaochuan and Liu, Mingrui},
          booktitle={International Conference on Learning Representations},
          year={2024}
        }
        ```
    """
    _check_sizes(
        num_tasks=num_tasks,
        ways=ways,
        shots=shots,
        queries=queries,
        hidden=hidden,
        num_test_tasks=num_test_tasks,
        newton_steps=newton_steps,
    )
    if ways > 10:
        raise ValueError(
            f"hyper_representation: `ways` must be <= 10 digit classes, got {ways}"
        )
    if not reg > 0:
        raise ValueError(f"hyper_representation: `reg` must be positive, got {reg!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(
            "hyper_representation: `batch_size` must be a positive int or None, got "
            f"{batch_size!r}"
        )
    images, labels = _load_digits()
    rng = np.random.default_rng(seed)
    train_pool, test_pool = _split(labels, rng)
    if min(len(p) for p in train_pool + test_pool) < shots + queries:
        raise ValueError(
            "hyper_representation: `shots + queries` exceeds the images per class in a "
            f"half of the data (at least {min(len(p) for p in train_pool + test_pool)})"
        )
    support, query = _make_tasks(
        images, train_pool, rng, num_tasks, ways, shots, queries
    )
    test_support, test_query = _make_tasks(
        images, test_pool, rng, num_test_tasks, ways, shots, queries
    )
    lower = _SupportLoss(num_tasks=num_tasks, reg=reg)
    upper = _QueryLoss()
    x0 = _init_encoder(rng, hidden)
    y0 = {
        "w": jnp.asarray(np.zeros((num_tasks, hidden, ways))),
        "b": jnp.asarray(np.zeros((num_tasks, ways))),
    }

    grouped_support = _grouped(support, num_tasks)
    grouped_test = (
        _grouped(test_support, num_test_tasks),
        _grouped(test_query, num_test_tasks),
    )

    def lower_solution(x: Params) -> Params:
        return _fit_heads(x, grouped_support, ways, reg, newton_steps)

    def evaluate(x: Params, y: Params) -> dict:
        return _evaluate(x, y, support, query, *grouped_test, lower, ways, newton_steps)

    if batch_size is None:
        data = FullBatch(upper=query, lower=support)
    else:
        data = Minibatch(upper=query, lower=support, batch_size=batch_size)
    return Benchmark(
        name="hyper_representation",
        problem=BilevelProblem(upper, lower),
        x0=x0,
        y0=y0,
        data=data,
        evaluate=evaluate,
        lower_solution=lower_solution,
        metric="test_accuracy",
        maximize=True,
    )


def encode(x: Params, images: Float[Array, "n 8 8"]) -> Float[Array, "n hidden"]:
    r"""Max-pooled hidden states of the Elman RNN $x$ over the rows of each image."""

    def cell(state, row):
        pre = row @ x["w_in"].T + state @ x["w_rec"].T + x["b"][None, :]
        state = jnp.tanh(pre)
        return state, state

    start = jnp.zeros((images.shape[0], x["w_rec"].shape[0]), images.dtype)
    _, states = lax.scan(cell, start, jnp.swapaxes(images, 0, 1))
    return jnp.max(states, axis=0)


def _cross_entropy(logits, labels) -> Array:
    """Per-sample softmax cross-entropy with integer labels."""
    picked = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
    return jax.nn.logsumexp(logits, axis=1) - picked


def _logits(features, y: Params, tasks) -> Array:
    return jnp.einsum("nh,nhw->nw", features, y["w"][tasks]) + y["b"][tasks]


class _QueryLoss(eqx.Module):
    """$f$: mean query cross-entropy of each sample's task head on the RNN features."""

    def __call__(self, x: Params, y: Params, batch: Batch) -> Array:
        logits = _logits(encode(x, batch["images"]), y, batch["tasks"])
        return jnp.mean(_cross_entropy(logits, batch["labels"]))


class _SupportLoss(eqx.Module):
    r"""$g$: `num_tasks` times the mean support cross-entropy, plus
    $\frac\lambda2\|y\|^2$."""

    num_tasks: int = eqx.field(static=True)
    reg: float

    def __call__(self, x: Params, y: Params, batch: Batch) -> Array:
        logits = _logits(encode(x, batch["images"]), y, batch["tasks"])
        penalty = jnp.sum(y["w"] ** 2) + jnp.sum(y["b"] ** 2)
        return self.num_tasks * jnp.mean(_cross_entropy(logits, batch["labels"])) + (
            0.5 * self.reg * penalty
        )


def _head_objective(theta, unravel, features, labels, reg) -> Array:
    """One task's lower objective in the flat head parameters `theta`."""
    head = unravel(theta)
    logits = features @ head["w"] + head["b"][None, :]
    return jnp.mean(_cross_entropy(logits, labels)) + 0.5 * reg * theta @ theta


@eqx.filter_jit
def _fit_heads(x: Params, grouped: Batch, ways: int, reg: float, steps: int) -> Params:
    """Per-task heads minimizing the lower objective, by `steps` Newton iterations from
    zero (the objective is smooth and `reg`-strongly convex; each Hessian is small)."""
    features = jax.vmap(lambda u: encode(x, u))(grouped["images"])
    hidden = features.shape[-1]
    zero = {
        "w": jnp.zeros((hidden, ways), features.dtype),
        "b": jnp.zeros(ways, features.dtype),
    }
    theta0, unravel = ravel_pytree(zero)

    def fit(feats, labels):
        objective = lambda t: _head_objective(t, unravel, feats, labels, reg)  # noqa: E731

        def newton(_, theta):
            grad = jax.grad(objective)(theta)
            return theta - jnp.linalg.solve(jax.hessian(objective)(theta), grad)

        return lax.fori_loop(0, steps, newton, theta0)

    thetas = jax.vmap(fit)(features, grouped["labels"])
    return jax.vmap(unravel)(thetas)


@eqx.filter_jit
def _evaluate(x, y, support, query, test_support, test_query, lower, ways, steps):
    query_logits = _logits(encode(x, query["images"]), y, query["tasks"])
    grad_y = jax.grad(lower, argnums=1)(x, y, support)
    heads = _fit_heads(x, test_support, ways, lower.reg, steps)
    features = jax.vmap(lambda u: encode(x, u))(test_query["images"])
    test_logits = (
        jnp.einsum("tnh,thw->tnw", features, heads["w"]) + heads["b"][:, None, :]
    )
    flat_logits = test_logits.reshape(-1, ways)
    flat_labels = test_query["labels"].reshape(-1)
    return {
        "upper_loss": jnp.mean(_cross_entropy(query_logits, query["labels"])),
        "query_accuracy": _accuracy(query_logits, query["labels"]),
        "lower_residual": jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grad_y))),
        "test_accuracy": _accuracy(flat_logits, flat_labels),
        "test_loss": jnp.mean(_cross_entropy(flat_logits, flat_labels)),
    }


def _accuracy(logits, labels) -> Array:
    return jnp.mean((jnp.argmax(logits, axis=1) == labels).astype(logits.dtype))


def _init_encoder(rng, hidden: int) -> Params:
    return {
        "w_in": jnp.asarray(rng.standard_normal((hidden, 8)) / np.sqrt(8.0)),
        "w_rec": jnp.asarray(
            rng.standard_normal((hidden, hidden)) / np.sqrt(4.0 * hidden)
        ),
        "b": jnp.asarray(np.zeros(hidden)),
    }


@ft.cache
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images / 16.0, digits.target


def _split(labels, rng) -> tuple[list, list]:
    """Per class, a random half of the image indices for training, the rest for test."""
    train, test = [], []
    for c in range(10):
        index = rng.permutation(np.flatnonzero(labels == c))
        train.append(index[: len(index) // 2])
        test.append(index[len(index) // 2 :])
    return train, test


def _make_tasks(
    images, pools, rng, num_tasks, ways, shots, queries
) -> tuple[Batch, Batch]:
    """Flat support and query sets of `num_tasks` random `ways`-way tasks, sorted by
    task, with labels 0..ways-1 inside each task."""
    support = {"images": [], "labels": [], "tasks": []}
    query = {"images": [], "labels": [], "tasks": []}
    for t in range(num_tasks):
        classes = rng.choice(10, ways, replace=False)
        for label, c in enumerate(classes):
            picked = rng.choice(pools[c], shots + queries, replace=False)
            for part, index in ((support, picked[:shots]), (query, picked[shots:])):
                part["images"].append(images[index])
                part["labels"].append(np.full(len(index), label))
                part["tasks"].append(np.full(len(index), t))
    return _to_arrays(support), _to_arrays(query)


def _to_arrays(part: dict) -> Batch:
    return {
        "images": jnp.asarray(np.concatenate(part["images"])),
        "labels": jnp.asarray(np.concatenate(part["labels"])),
        "tasks": jnp.asarray(np.concatenate(part["tasks"])),
    }


def _grouped(batch: Batch, num_tasks: int) -> Batch:
    """Reshape a flat, task-sorted set to a leading task axis."""
    return {
        "images": batch["images"].reshape(num_tasks, -1, 8, 8),
        "labels": batch["labels"].reshape(num_tasks, -1),
    }


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(
                f"hyper_representation: `{name}` must be an int >= 1, got {value!r}"
            )
