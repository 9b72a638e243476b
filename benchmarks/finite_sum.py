"""Finite-sum bilevel problems: time to a precise hypergradient (issue: stochastic
single-loop family).

1. The proxy of benchopt's bilevel benchmark (its quadratic with rank-one samples):
   d_x = d_y = 100, n = m = 1024 samples, float32, x0 = -2, y0 = 0, batch 64. Seconds
   until ||grad h(x)||^2 <= 1e-2 / 1e-4 / 1e-6 of its value at x0, the metric computed
   exactly (float64) from the mean matrices, for SOBA, SABA, SRBA, MA-SOBA (defaults),
   SABA with the paper's settings (step 0.1, outer ratio 1), ImplicitDiff (full batch
   and minibatch), Penalty (single loop), BSVRB with one block and jaxopt's full-batch
   implicit differentiation as a reference. All run side by side in one process, in
   chunks of compiled steps (compile excluded, results blocked on); the metric is
   computed between chunks, off the clock.
2. The same solvers on `logreg_hpo` and `hypercleaning`: validation loss (the
   problems' own evaluation) against time.

Timings on a shared machine are noisy: compare ratios within one table, and re-measure
on a quiet machine before quoting absolute numbers.
"""

import time
import warnings

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from _timing import print_table

import bilevel as bl


DIM, SAMPLES, BATCH = 100, 1024, 64
MU, L, CROSS = 0.1, 1.0, 0.1
TARGETS = (1e-2, 1e-4, 1e-6)


# --- 1. the proxy problem -------------------------------------------------------------


def _sqrt_factor(rng, dim: int, eigenvalues) -> np.ndarray:
    """U diag(sqrt(eigenvalues)) U' with U a random orthogonal matrix: s = S z with
    z ~ N(0, I) has covariance S^2 of the given spectrum."""
    basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    return (basis * np.sqrt(eigenvalues)) @ basis.T


def _cross_factors(rng, num: int, dim_x: int, dim_y: int):
    """Rank-one cross terms a_i b_i' = U D u_i u_i' V' with D log-spaced on [MU, CROSS]:
    the mean is U D V' (singular values D)."""
    u_basis, _ = np.linalg.qr(rng.standard_normal((dim_x, dim_x)))
    v_basis, _ = np.linalg.qr(rng.standard_normal((dim_y, dim_y)))
    singular = np.logspace(np.log10(MU), np.log10(CROSS), min(dim_x, dim_y))
    scale = np.zeros((dim_x, dim_y))
    scale[np.arange(len(singular)), np.arange(len(singular))] = singular
    samples = rng.standard_normal((num, dim_y))
    return samples @ (u_basis @ scale).T, samples @ v_basis.T


def _sample_level(rng, num: int, with_x_hessian: bool) -> dict:
    spectrum = np.logspace(np.log10(MU), np.log10(L), DIM)
    level = {"s": rng.standard_normal((num, DIM)) @ _sqrt_factor(rng, DIM, spectrum)}
    level["a"], level["b"] = _cross_factors(rng, num, DIM, DIM)
    level["l"] = rng.standard_normal((num, DIM))
    if with_x_hessian:  # benchopt: one zero eigenvalue, the rest log-spaced on [MU, L]
        x_spectrum = np.r_[0.0, np.logspace(np.log10(MU), np.log10(L), DIM - 1)]
        level["r"] = rng.standard_normal((num, DIM)) @ _sqrt_factor(rng, DIM, x_spectrum)
        level["c"] = rng.standard_normal((num, DIM))
    return level


def _means(level: dict) -> dict:
    num = level["s"].shape[0]
    means = {
        "H": level["s"].T @ level["s"] / num,  # Hessian in y
        "A": level["a"].T @ level["b"] / num,  # cross term x' A y
        "l": level["l"].mean(0),
    }
    if "r" in level:
        means["Hx"] = level["r"].T @ level["r"] / num
        means["c"] = level["c"].mean(0)
    return means


def _hypergradient(x, lower: dict, upper: dict):
    """grad h(x) in float64 from the mean matrices (the benchmark's metric)."""
    y = -np.linalg.solve(lower["H"], lower["A"].T @ x + lower["l"])
    grad_y = upper["H"] @ y + upper["A"].T @ x + upper["l"]
    v = -np.linalg.solve(lower["H"], grad_y)
    return upper["Hx"] @ x + upper["A"] @ y + upper["c"] + lower["A"] @ v


def _hyper_hessian_min(lower: dict, upper: dict) -> float:
    jac = -np.linalg.solve(lower["H"], lower["A"].T)  # dy*/dx
    mixed = upper["A"] @ jac
    hessian = upper["Hx"] + mixed + mixed.T + jac.T @ upper["H"] @ jac
    return float(np.linalg.eigvalsh(0.5 * (hessian + hessian.T)).min())


def lower_objective(x, y, batch):
    """g on a batch: mean of 0.5 (s'y)^2 + (a'x)(b'y) + l'y."""
    s, a, b, l = batch["s"], batch["a"], batch["b"], batch["l"]
    return jnp.mean(0.5 * (s @ y) ** 2 + (a @ x) * (b @ y) + l @ y)


def upper_objective(x, y, batch):
    """f on a batch: mean of 0.5 (s'y)^2 + 0.5 (r'x)^2 + (a'x)(b'y) + l'y + c'x."""
    s, a, b, l = batch["s"], batch["a"], batch["b"], batch["l"]
    r, c = batch["r"], batch["c"]
    return jnp.mean(
        0.5 * (s @ y) ** 2 + 0.5 * (r @ x) ** 2 + (a @ x) * (b @ y) + l @ y + c @ x
    )


def proxy(seed: int = 0, batch_size: int = BATCH, dtype=jnp.float32):
    """The proxy problem: `(problem, data, x0, y0, relative_metric)` where
    `relative_metric(x)` is ||grad h(x)||^2 / ||grad h(x0)||^2 (float64). Draws are
    repeated (as benchopt does) until the hyper-objective is strongly convex."""
    rng = np.random.default_rng(seed)
    for _ in range(20):
        lower = _sample_level(rng, SAMPLES, with_x_hessian=False)
        upper = _sample_level(rng, SAMPLES, with_x_hessian=True)
        lower_means, upper_means = _means(lower), _means(upper)
        if _hyper_hessian_min(lower_means, upper_means) > 1e-12:
            break
    else:
        raise RuntimeError("no strongly convex hyper-objective in 20 draws")
    x0 = -2.0 * np.ones(DIM)
    start = np.sum(_hypergradient(x0, lower_means, upper_means) ** 2)

    def relative_metric(x):
        grad = _hypergradient(np.asarray(x, np.float64), lower_means, upper_means)
        return float(np.sum(grad**2) / start)

    as_dtype = lambda tree: jax.tree_util.tree_map(lambda u: jnp.asarray(u, dtype), tree)  # noqa: E731
    data = bl.Minibatch(upper=as_dtype(upper), lower=as_dtype(lower), batch_size=batch_size)
    problem = bl.BilevelProblem(upper_objective, lower_objective)
    return problem, data, jnp.asarray(x0, dtype), jnp.zeros(DIM, dtype), relative_metric


# --- timing: compiled chunks, metric off the clock ------------------------------------


@eqx.filter_jit
def _chunk(problem, solver, state, data, loop_key, start, num: int):
    """`num` solver steps from step `start` (the per-step keys of `bl.run`)."""

    def body(state, step):
        state, _ = solver.step(problem, state, data, jr.fold_in(loop_key, step))
        return state, None

    state, _ = lax.scan(body, state, start + jnp.arange(num))
    return state


def trace(problem, solver, x0, y0, data, metric, *, chunk, budget, target=1e-6,
          key=jr.PRNGKey(0)):
    """`[(seconds, metric), ...]` after each chunk of `chunk` steps until `metric`
    reaches `target` or `budget` seconds of compute are spent (compile excluded: one
    warm-up chunk is run and discarded first)."""
    init_key, loop_key = jr.split(key)
    data = bl.AbstractData.with_key(data, jr.split(loop_key)[0])
    init = eqx.filter_jit(lambda k: solver.init(problem, x0, y0, k, data))
    state = jax.block_until_ready(init(init_key))
    jax.block_until_ready(
        _chunk(problem, solver, state, data, loop_key, jnp.asarray(0), chunk)
    )
    points, elapsed, step = [(0.0, metric(solver.params(state)[0]))], 0.0, 0
    while elapsed < budget and points[-1][1] > target:
        begin = time.perf_counter()
        state = jax.block_until_ready(
            _chunk(problem, solver, state, data, loop_key, jnp.asarray(step), chunk)
        )
        elapsed += time.perf_counter() - begin
        step += chunk
        points.append((elapsed, metric(solver.params(state)[0])))
    return points


def time_to(points, target):
    """First time at which the traced metric is <= target (None if never)."""
    return next((t for t, value in points if value <= target), None)
