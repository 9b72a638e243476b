r"""Multi-block bilevel problems $\min_x \frac1m\sum_i f_i(x, y_i^*(x))$,
$y_i^*(x) = \arg\min_{y_i} g_i(x, y_i)$: a closed-form quadratic (test oracle) and
per-class hyperparameter optimisation on scikit-learn's digits."""

import functools as ft

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float

from .._data import BlockMinibatch, FullBatch, Minibatch
from .._problem import MultiBlockProblem
from ._benchmark import Benchmark
from ._common import (
    accuracy,
    as_float,
    check_int,
    load_dataset,
    split_indices,
    standardize,
)
from ._quadratic import _rows_with_spectrum


def multiblock_quadratic(
    num_blocks: int = 8,
    dim_x: int = 3,
    dim_y: int = 4,
    seed: int = 0,
    *,
    num_samples: int = 16,
    batch_size: int | None = None,
    lower_reg: float = 1.0,
    upper_reg: float = 0.1,
    lower_condition: float | None = None,
    lower_scale: float = 1.0,
    upper_scale: float = 1.0,
) -> Benchmark:
    r"""Multi-block quadratic with finite-sum lower levels (the multi-block test problem
    of Hu et al., ICML 2023, in closed form):

    $g_i(x, y_i) = s\,[\frac{1}{2n}\sum_{k=1}^n (a_{ik}^\top y_i)^2 +
    \frac{\mu}{2}\|y_i\|^2 - y_i^\top(B_i x - c_i)]$, $\quad f_i(x, y_i) =
    t\,[\frac12\|y_i - b_i\|^2 + \frac{\rho}{2}\|x\|^2]$.

    With $A_i = \frac1n\sum_k a_{ik}a_{ik}^\top + \mu I$ and $M_i = A_i^{-1}B_i$:
    $y_i^*(x) = A_i^{-1}(B_i x - c_i)$,
    $\nabla F(x) = t\,[\frac1m\sum_i M_i^\top(y_i^* - b_i) + \rho x]$, and
    $x^* = (\frac1m\sum_i M_i^\top M_i + \rho I)^{-1}\frac1m\sum_i M_i^\top(b_i +
    A_i^{-1}c_i)$; none depends on $s$, and only $\nabla F$ on $t$.

    **Arguments:**

    - `num_blocks` ($m$), `dim_x`, `dim_y`, `seed`.
    - `num_samples`: $n$ rows $a_{ik}$ per block.
    - `batch_size`: rows per lower batch ($B$; default: all $n$, deterministic).
    - `lower_reg` $\mu > 0$, `upper_reg` $\rho \ge 0$.
    - `lower_condition`: if given, every block's rows are built so that $A_i$ has
      eigenvalues log-spaced on $[\mu, \mu\kappa]$, $\kappa$ = `lower_condition`
      (needs $n \ge$ `dim_y`; default: Gaussian rows).
    - `lower_scale`, `upper_scale`: $s > 0$ and $t > 0$.

    Data: a [`bilevel.BlockMinibatch`][] over the rows, shape `(m, n, dim_y)`;
    the upper level has none.
    """
    if min(num_blocks, dim_x, dim_y, num_samples) < 1:
        raise ValueError("multiblock_quadratic: sizes must be >= 1")
    if lower_reg <= 0 or upper_reg < 0:
        raise ValueError("multiblock_quadratic: need lower_reg > 0 and upper_reg >= 0")
    if lower_scale <= 0 or upper_scale <= 0:
        raise ValueError(
            "multiblock_quadratic: need lower_scale > 0 and upper_scale > 0"
        )
    if lower_condition is not None and not 1 <= lower_condition < float("inf"):
        raise ValueError(
            f"multiblock_quadratic: lower_condition must be >= 1, got {lower_condition}"
        )
    if lower_condition is not None and num_samples < dim_y:
        raise ValueError(
            "multiblock_quadratic: lower_condition needs num_samples >= dim_y, got "
            f"{num_samples} < {dim_y}"
        )
    rows, coupling, shift, target, response, offset, solution = _quadratic_arrays(
        seed,
        num_blocks,
        dim_x,
        dim_y,
        num_samples,
        lower_reg,
        upper_reg,
        lower_condition,
    )

    def lower(x, y, batch, i):
        value = (
            0.5 * jnp.mean((batch @ y) ** 2)
            + 0.5 * lower_reg * y @ y
            - y @ (coupling[i] @ x - shift[i])
        )
        return lower_scale * value

    def upper(x, y, batch, i):
        value = 0.5 * jnp.sum((y - target[i]) ** 2) + 0.5 * upper_reg * x @ x
        return upper_scale * value

    def lower_solution(x):
        return response @ x - offset

    def hypergradient(x):
        residual = lower_solution(x) - target
        mean = jnp.einsum("mkd,mk->d", response, residual) / num_blocks
        return upper_scale * (mean + upper_reg * x)

    def evaluate(x, y):
        y_star = lower_solution(x)
        blocks = jnp.arange(num_blocks)
        objective = jnp.mean(
            jax.vmap(upper, (None, 0, None, 0))(x, y_star, None, blocks)
        )
        return {
            "hyper_objective": objective,
            "hypergradient_norm": jnp.linalg.norm(hypergradient(x)),
            "x_error": jnp.linalg.norm(x - solution),
            "y_error": jnp.linalg.norm(y - y_star),
        }

    return Benchmark(
        name="multiblock_quadratic",
        problem=MultiBlockProblem(upper, lower, num_blocks=num_blocks),
        x0=jnp.zeros(dim_x),
        y0=jnp.zeros((num_blocks, dim_y)),
        data=BlockMinibatch(upper=None, lower=rows, batch_size=batch_size),
        evaluate=evaluate,
        solution=solution,
        lower_solution=lower_solution,
        hypergradient=hypergradient,
        metric="hyper_objective",
        maximize=False,
    )


@ft.partial(jax.jit, static_argnums=(1, 2, 3, 4, 7))
def _quadratic_arrays(
    seed, num_blocks, dim_x, dim_y, num_samples, lower_reg, upper_reg, condition
):
    """Random data and closed forms of `multiblock_quadratic` (one compiled call)."""
    k_rows, k_b, k_c, k_t = jr.split(jr.PRNGKey(seed), 4)
    if condition is None:
        rows = jr.normal(k_rows, (num_blocks, num_samples, dim_y))
    else:  # (the helper broadcasts a vector against a matrix: allow rank promotion)
        with jax.numpy_rank_promotion("allow"):
            rows = jax.vmap(
                lambda k: _rows_with_spectrum(
                    k, num_samples, dim_y, lower_reg, condition
                )
            )(jr.split(k_rows, num_blocks))
    coupling = jr.normal(k_b, (num_blocks, dim_y, dim_x)) / np.sqrt(dim_x)
    shift = jr.normal(k_c, (num_blocks, dim_y))
    target = jr.normal(k_t, (num_blocks, dim_y))
    eye = jnp.eye(dim_y)[None]
    hessians = jnp.einsum("mnk,mnl->mkl", rows, rows) / num_samples + lower_reg * eye
    response = jnp.linalg.solve(hessians, coupling)  # M_i = A_i^{-1} B_i
    offset = jnp.linalg.solve(hessians, shift[..., None])[..., 0]  # A_i^{-1} c_i
    normal = jnp.einsum("mkd,mke->de", response, response) / num_blocks
    rhs = jnp.einsum("mkd,mk->d", response, target + offset) / num_blocks
    solution = jnp.linalg.solve(normal + upper_reg * jnp.eye(dim_x), rhs)
    return rows, coupling, shift, target, response, offset, solution


def multiblock_hpo(
    seed: int = 0,
    *,
    batch_size: int | None = None,
    upper_batch_size: int | None = None,
    init_log_reg: float = -4.0,
    newton_steps: int = 25,
) -> Benchmark:
    r"""Per-class regularisation of one-vs-rest logistic regression on scikit-learn's
    handwritten digits: $m = 10$ blocks, one per class (after the multi-block
    hyperparameter-optimisation experiments of Hu et al., ICML 2023, with classes in
    place of temperatures).

    Block $i$ is the binary classifier "digit $= i$" with weights $w_i \in
    \mathbb{R}^{65}$ (64 standardised pixels and a bias), labels $s \in \{\pm1\}$ and
    $\ell(w; a, s) = \log(1 + e^{-s\, w^\top a})$. The upper variable
    $x \in \mathbb{R}^{10}$ holds one log-regularisation per class:

    $g_i(x, w_i) = \frac{1}{n_{\rm tr}}\sum_{\rm train}\ell(w_i; a, s) +
    \frac{e^{x_i}}{2}\|w_i\|^2$, $\quad f_i(x, w_i) = \frac{1}{n_{\rm val}}
    \sum_{\rm val}\ell(w_i; a, s)$.

    $g_i$ is $e^{x_i}$-strongly convex (use `hessian_floor` below it for BSVRB v1).

    **Arguments:**

    - `seed`: the train / validation / test split (50% / 25% / 25% of 1797 images).
    - `batch_size`, `upper_batch_size`: training / validation rows per batch (default:
      full batches); the pool is shared by the blocks (a [`bilevel.Minibatch`][] of
      `(pixels, digit)` pairs), each block making its own labels from the digit.
    - `init_log_reg`: $x_0$ (every class).
    - `newton_steps`: Newton iterations used by `evaluate` for $y^*(x)$.

    `evaluate(x, y)` returns the validation loss $F$ at $y$ and at $y^*(x)$ (Newton,
    float64 where enabled), the test accuracy of the argmax over the 10 classifiers at
    both, and $\max_i\|y_i - y_i^*(x)\|$.
    """
    check_int("multiblock_hpo", "newton_steps", newton_steps)
    images, digits = load_dataset("digits")
    n_train, n_val = len(digits) // 2, len(digits) // 4
    train, val, test = split_indices(
        len(digits), (n_train, n_val, None), seed, "multiblock_hpo"
    )
    features = standardize(images[train], images)[1]
    features = np.concatenate([features, np.ones((len(digits), 1))], axis=1)

    def split(index):
        return as_float(features[index]), jnp.asarray(digits[index], jnp.int32)

    train_data, val_data, test_data = split(train), split(val), split(test)
    num_blocks, dim = 10, features.shape[1]

    def loss(w, batch, i):
        pixels, digit = batch
        sign = jnp.where(digit == i, 1.0, -1.0).astype(w.dtype)
        return jnp.mean(jax.nn.softplus(-sign * (pixels @ w)))

    def lower(x, w, batch, i):
        return loss(w, batch, i) + 0.5 * jnp.exp(x[i]) * w @ w

    def upper(x, w, batch, i):
        return loss(w, batch, i)

    problem = MultiBlockProblem(upper, lower, num_blocks=num_blocks)
    blocks = jnp.arange(num_blocks, dtype=jnp.int32)

    def lower_solution(x: Float[Array, " 10"]) -> Float[Array, "10 65"]:
        def newton(i):
            grad = jax.grad(lower, argnums=1)
            hess = jax.hessian(lower, argnums=1)

            def body(_, w):
                step = jnp.linalg.solve(
                    hess(x, w, train_data, i), grad(x, w, train_data, i)
                )
                return w - step

            return jax.lax.fori_loop(0, newton_steps, body, jnp.zeros(dim, x.dtype))

        return jax.vmap(newton)(blocks)

    def objective(w):
        return jnp.mean(jax.vmap(upper, (None, 0, None, 0))(None, w, val_data, blocks))

    def test_accuracy(w):
        pixels, digit = test_data
        return accuracy(pixels @ w.T, digit)

    def evaluate(x, y):
        y_star = lower_solution(x)
        return {
            "val_loss": objective(y),
            "val_loss_at_solution": objective(y_star),
            "test_accuracy": test_accuracy(y),
            "test_accuracy_at_solution": test_accuracy(y_star),
            "y_error": jnp.max(jnp.linalg.norm(y - y_star, axis=1)),
        }

    if batch_size is None and upper_batch_size is None:
        data = FullBatch(upper=val_data, lower=train_data)
    else:
        data = Minibatch(
            upper=val_data,
            lower=train_data,
            batch_size=batch_size,
            upper_batch_size=upper_batch_size,
        )
    return Benchmark(
        name="multiblock_hpo",
        problem=problem,
        x0=as_float(np.full(num_blocks, init_log_reg)),
        y0=as_float(np.zeros((num_blocks, dim))),
        data=data,
        evaluate=evaluate,
        lower_solution=lower_solution,
        metric="val_loss",
        maximize=False,
    )
