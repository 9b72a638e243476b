r"""Hyperparameter optimisation of a linear SVM with per-sample weights and margin
constraints in the lower level (Xu & Zhu's GAM formulation, used by LV-HBA), on
scikit-learn's packaged breast-cancer data."""

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Float, PyTree

from .._data import FullBatch
from .._problem import BilevelProblem
from ._benchmark import Benchmark


def _tolerance(dtype) -> float:
    return 1e-10 if jnp.finfo(dtype).bits >= 64 else 1e-5


def squared_hinge_argmin(
    scale: Float[Array, " m"],
    center: Float[Array, " m"],
    weights: Float[Array, " n"],
    rows: Float[Array, "n m"],
    offsets: Float[Array, " n"],
    max_steps: int = 50,
) -> Float[Array, " m"]:
    r"""$\arg\min_v \varphi(v)$ with $\varphi(v) = \frac12\sum_j s_j (v_j - c_j)^2 +
    \frac12\sum_i \omega_i \max(0, q_i - r_i^\top v)^2$: a strongly convex piecewise
    quadratic when $s > 0$ (with some $s_j = 0$ it needs active rows spanning those
    directions).

    Semismooth Newton with Armijo backtracking, started at $v = c$: the generalised
    Hessian is $\mathrm{diag}(s) + R^\top \mathrm{diag}(\omega \odot [q > Rv]) R$, so
    once the active set $\{i : q_i > r_i^\top v\}$ is identified the full step lands on
    the exact minimiser (finite termination); the line search makes the method globally
    convergent (Qi & Sun 1993, "A nonsmooth version of Newton's method", Math.
    Programming). Stops when $\|\nabla\varphi\|_\infty \le \tau \max(1,
    \|v\|_\infty)$, $\tau$ = 1e-10 (float64) or 1e-5 (float32), or after `max_steps`.
    """
    tol = _tolerance(center.dtype)

    def value(v):
        hinge = jnp.maximum(offsets - rows @ v, 0)
        proximity = 0.5 * jnp.sum(scale * (v - center) ** 2)
        return proximity + 0.5 * jnp.sum(weights * hinge**2)

    def gradient(v):
        hinge = jnp.maximum(offsets - rows @ v, 0)
        return scale * (v - center) - rows.T @ (weights * hinge), hinge > 0

    def not_done(carry):
        v, grad, _, step = carry
        small = jnp.max(jnp.abs(grad)) <= tol * jnp.maximum(1, jnp.max(jnp.abs(v)))
        return (step < max_steps) & ~small

    def newton_step(carry):
        v, grad, active, step = carry
        curvature = weights * active.astype(v.dtype)
        hessian = jnp.diag(scale) + rows.T @ (curvature[:, None] * rows)
        direction = -jsl.cho_solve(jsl.cho_factor(hessian), grad)
        slope = jnp.dot(grad, direction)
        start = value(v)

        def too_long(t):
            return (value(v + t * direction) > start + 1e-4 * t * slope) & (t > 1e-8)

        size = jax.lax.while_loop(too_long, lambda t: t / 2, jnp.ones((), v.dtype))
        v = v + size * direction
        return (v, *gradient(v), step + 1)

    v, *_ = jax.lax.while_loop(not_done, newton_step, (center, *gradient(center), 0))
    return v


def _leaky_smoothed_zero_one(t: Array) -> Array:
    r"""$\ell(t) = \mathrm{LeakyReLU}(2\sigma(-5t) - 1)$, negative slope 0.01."""
    u = 2 * jax.nn.sigmoid(-5 * t) - 1
    return jnp.where(u >= 0, u, 0.01 * u)


def _margins(y: PyTree[Array], features: Array, labels: Array) -> Array:
    return labels * (features @ y["w"] + y["b"])


# The problem's functions are module-level and receive their data through
# `jtu.Partial`, so problems built from different seeds or splits of the same sizes
# share one compiled program.


def _upper(c, y, batch):
    features, labels = batch
    norm = jnp.sqrt(jnp.sum(y["w"] ** 2))
    return jnp.mean(_leaky_smoothed_zero_one(_margins(y, features, labels) / norm))


def _lower(c, y, batch):
    return 0.5 * jnp.sum(y["w"] ** 2) + 0.5 * jnp.sum(jnp.exp(c) * y["xi"] ** 2)


def _constraints(rows, c, y):
    """$h_i = 1 - \\xi_i - b_i(w^\\top a_i + b)$; `rows` holds $b_i (a_i, 1)$."""
    return 1 - y["xi"] - rows @ jnp.concatenate([y["w"], y["b"][None]])


def _project_x(box, c):
    return jnp.clip(c, box[0], box[1])


def _project_feasible(rows, box, c, y):
    center = jnp.concatenate([y["w"], y["b"][None]])
    ones = jnp.ones_like(y["xi"])
    v = squared_hinge_argmin(jnp.ones_like(center), center, ones, rows, 1 - y["xi"])
    xi = jnp.maximum(y["xi"], 1 - rows @ v)
    dim = center.shape[0] - 1
    return _project_x(box, c), {"w": v[:dim], "b": v[dim], "xi": xi}


def _lower_solution(rows, c):
    dim = rows.shape[1] - 1
    scale = jnp.concatenate([jnp.ones(dim, rows.dtype), jnp.zeros(1, rows.dtype)])
    center = jnp.zeros_like(scale)
    v = squared_hinge_argmin(scale, center, jnp.exp(c), rows, jnp.ones_like(c))
    return {"w": v[:dim], "b": v[dim], "xi": jnp.maximum(1 - rows @ v, 0)}


def _accuracy(y, part):
    features, labels = part
    return jnp.mean((_margins(y, features, labels) > 0).astype(features.dtype))


def _evaluate(splits, rows, c, y):
    train, val, test = splits
    optimum = _lower(c, _lower_solution(rows, c), train)
    violation = jnp.maximum(_constraints(rows, c, y), 0)
    return {
        "val_accuracy": _accuracy(y, val),
        "test_accuracy": _accuracy(y, test),
        "upper_loss": _upper(c, y, val),
        "lower_value": _lower(c, y, train),
        "lower_gap": _lower(c, y, train) - optimum,
        "constraint_violation": jnp.sqrt(jnp.sum(violation**2)),
    }


def _split(num_train: int, num_val: int, seed: int, flip_fraction: float):
    from sklearn.datasets import load_breast_cancer  # lazy: keeps `import bilevel` fast

    features, targets = load_breast_cancer(return_X_y=True)
    labels = 2.0 * targets - 1.0
    order = np.random.default_rng(seed).permutation(len(labels))
    train, val, test = np.split(order, [num_train, num_train + num_val])
    mean, std = features[train].mean(axis=0), features[train].std(axis=0)
    features = (features - mean) / (std * np.sqrt(features.shape[1]))
    train_labels = labels[train].copy()
    num_flips = int(round(flip_fraction * num_train))
    flip_rng = np.random.default_rng(seed + 1)
    flipped = flip_rng.choice(num_train, num_flips, replace=False)
    train_labels[flipped] *= -1
    return (
        (features[train], train_labels),
        (features[val], labels[val]),
        (features[test], labels[test]),
    )


def svm_hpo(
    num_train: int = 300,
    num_val: int = 150,
    seed: int = 0,
    *,
    flip_fraction: float = 0.0,
    log_weight_init: float = 0.0,
    log_weight_range: tuple[float, float] = (-8.0, 3.0),
) -> Benchmark:
    r"""Per-sample weights of a linear SVM tuned on validation data, with the margin
    constraints in the lower level (Xu & Zhu 2023, "Efficient gradient approximation
    method for constrained bilevel optimization", AAAI; experiment 1.6c of LV-HBA,
    Yao et al. 2024, ICLR).

    Upper variable $x = c \in [c_{lo}, c_{hi}]^N$ (log-weights of the $N$ training
    samples), lower variable $y = (w, b, \xi)$ as the dict
    `{"w": (d,), "b": (), "xi": (N,)}`:

    - lower: $\min_y \frac12\|w\|^2 + \frac12\sum_i e^{c_i}\xi_i^2$ s.t.
      $h_i(c, y) = 1 - \xi_i - b_i(w^\top a_i + b) \le 0$, $i = 1..N$;
    - upper: $\frac{1}{N_{val}}\sum_{j} \ell\big(b_j(w^\top a_j + b)/\|w\|\big)$ with
      the smoothed 0-1 loss $\ell(t) = \mathrm{LeakyReLU}(2\sigma(-5t) - 1)$
      (negative slope 0.01).

    Data: scikit-learn's breast-cancer set (569 samples, $d = 30$ features, shipped with
    the package), shuffled with `seed`, split into `num_train` / `num_val` / the rest
    for test, standardised with the training statistics and divided by $\sqrt d$ (rows
    of unit mean squared norm); labels $\pm 1$. With `flip_fraction`, that fraction of
    the training labels is flipped (a hyper-cleaning variant: the weights can learn to
    discount the flipped samples). The upper batch is the validation pair
    `(features, labels)`, the lower batch the training pair; `lower_constraints` holds
    the training data itself (it takes no batch).

    `project_feasible` clips $c$ into its box and is exact in $\xi$: for fixed $(w, b)$
    the projection sets $\xi_i = \max(\xi^0_i, 1 - b_i(w^\top a_i + b))$, which leaves
    the strongly convex piecewise quadratic $\frac12\|(w, b) - (w^0, b^0)\|^2 +
    \frac12\sum_i \max(0, 1 - \xi^0_i - b_i(w^\top a_i + b))^2$ in $d + 1$ variables,
    minimised by semismooth Newton (`squared_hinge_argmin`, tolerance 1e-10 in float64).
    Its output satisfies the constraints to rounding whatever the Newton accuracy.
    `lower_solution(c)` solves the lower level the same way ($\xi$ eliminated: a
    weighted squared-hinge SVM); it is numerical, not a closed form.

    Deviations from the GAM formulation: the upper loss is a mean, not a sum, over the
    validation set (step sizes then do not depend on its size); $c$ lives in a box
    (default $[-8, 3]$) because $e^{c}$ sets the curvature of the lower level, and an
    unbounded $c$ makes any fixed step size unstable; the $1/\sqrt d$ feature scaling
    keeps the constraint Jacobian's norm (hence the stable saddle step of LV-HBA)
    moderate.

    **Arguments:**

    - `num_train`, `num_val`: split sizes (the test set is the rest of the 569 samples).
    - `seed`: seeds the shuffle and the label flips.
    - `flip_fraction`: fraction of training labels flipped, in $[0, 0.5)$.
    - `log_weight_init`: the initial $c_i$ (default 0, i.e. unit weights).
    - `log_weight_range`: the box $[c_{lo}, c_{hi}]$ of $c$.

    `evaluate(x, y)` reports `val_accuracy`, `test_accuracy` (fraction of
    $b_j(w^\top a_j + b) > 0$), `upper_loss`, `lower_value` $f(c, y)$, `lower_gap`
    $f(c, y) - \min f(c, \cdot)$ and `constraint_violation`. The untuned baseline is
    `evaluate(x0, lower_solution(x0))`; a tuned $c$ is best judged by
    `evaluate(c, lower_solution(c))` (the SVM retrained with the tuned weights).

    ??? cite "References"
        ```bibtex
        @inproceedings{xu2023gam,
          title={Efficient Gradient Approximation Method for Constrained Bilevel
                 Optimization},
          author={Xu, Siyuan and Zhu, Minghui},
          booktitle={AAAI Conference on Artificial Intelligence},
          year={2023}
        }
        @inproceedings{yao2024lvhba,
          title={Constrained Bi-Level Optimization: Proximal {L}agrangian Value
                 Function Approach and {H}essian-free Algorithm},
          author={Yao, Wei and Yu, Chengming and Zeng, Shangzhi and Zhang, Jin},
          booktitle={International Conference on Learning Representations},
          year={2024}
        }
        ```
    """
    total = 569
    if num_train < 2 or num_val < 1 or num_train + num_val >= total:
        raise ValueError(
            "svm_hpo: need num_train >= 2, num_val >= 1 and "
            f"num_train + num_val < {total} "
            f"(the rest is the test set); got num_train={num_train}, num_val={num_val}"
        )
    low, high = log_weight_range
    if not low < high:
        raise ValueError(
            f"svm_hpo: `log_weight_range` must be increasing, got {log_weight_range}"
        )
    if not low <= log_weight_init <= high:
        raise ValueError(
            f"svm_hpo: `log_weight_init`={log_weight_init} must lie in "
            f"`log_weight_range`={log_weight_range}"
        )
    if not 0 <= flip_fraction < 0.5:
        raise ValueError(
            f"svm_hpo: `flip_fraction` must lie in [0, 0.5), got {flip_fraction}"
        )
    splits = tuple(
        tuple(jnp.asarray(a) for a in part)
        for part in _split(num_train, num_val, seed, flip_fraction)
    )
    train, val, _ = splits
    features, labels = train
    rows = jnp.concatenate([labels[:, None] * features, labels[:, None]], axis=1)
    dtype = features.dtype
    box = jnp.asarray(log_weight_range, dtype)
    problem = BilevelProblem(
        _upper,
        _lower,
        lower_constraints=jtu.Partial(_constraints, rows),
        project_x=jtu.Partial(_project_x, box),
        project_feasible=jtu.Partial(_project_feasible, rows, box),
    )
    y0 = {
        "w": jnp.ones(features.shape[1], dtype),
        "b": jnp.zeros((), dtype),
        "xi": jnp.ones(num_train, dtype),
    }
    return Benchmark(
        name="svm_hpo",
        problem=problem,
        x0=jnp.full((num_train,), log_weight_init, dtype),
        y0=y0,
        data=FullBatch(upper=val, lower=train),
        evaluate=jtu.Partial(_evaluate, splits, rows),
        lower_solution=jtu.Partial(_lower_solution, rows),
        metric="test_accuracy",
        maximize=True,
    )
