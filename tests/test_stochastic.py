"""SOBA, SABA, SRBA and MA-SOBA: NumPy transcriptions of their updates, convergence of
the variance-reduced ones to the exact solution of a finite sum, default step sizes,
capabilities.

The test problem is a small finite-sum quadratic with the structure of benchopt's
bilevel benchmark: per sample, g_i = 0.5 (s_i'y)^2 + (a_i'x)(b_i'y) + l_i'y and
f_j = 0.5 (s_j'y)^2 + 0.5 (r_j'x)^2 + (a_j'x)(b_j'y) + l_j'y + c_j'x.
"""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import bilevel as bl


DX, DY, N, M = 3, 4, 12, 9  # lower batches of 4 (3 of them), upper batches of 3
LOWER_KEYS, UPPER_KEYS = "sabl", "sablrc"
DTYPES = [jnp.float32, jnp.float64]
# Transcriptions: float64 agrees to rounding (1e-10 after 10 steps of O(1) updates);
# float32 to 1e-4 (rounding of ~1e-7 amplified by the iteration and by NumPy's
# float64 reference).
RTOL = {jnp.float32: 1e-4, jnp.float64: 1e-10}


def lower_objective(x, y, batch):
    s, a, b, l = (batch[k] for k in LOWER_KEYS)
    return jnp.mean(0.5 * (s @ y) ** 2 + (a @ x) * (b @ y) + l @ y)


def upper_objective(x, y, batch):
    s, a, b, l, r, c = (batch[k] for k in UPPER_KEYS)
    terms = 0.5 * (s @ y) ** 2 + 0.5 * (r @ x) ** 2 + (a @ x) * (b @ y) + l @ y + c @ x
    return jnp.mean(terms)


PROBLEM = bl.BilevelProblem(upper_objective, lower_objective)


def _arrays(seed, n=N, m=M):
    rng = np.random.default_rng(seed)
    sizes = {"s": DY, "a": DX, "b": DY, "l": DY, "r": DX, "c": DX}
    lower = {k: rng.standard_normal((n, sizes[k])) for k in LOWER_KEYS}
    upper = {k: rng.standard_normal((m, sizes[k])) for k in UPPER_KEYS}
    lower["a"] *= 0.3  # moderate coupling: a well-conditioned hyper-objective
    upper["a"] *= 0.3
    return lower, upper


def _cast(tree, dtype):
    return jax.tree_util.tree_map(lambda u: jnp.asarray(u, dtype), tree)


# --- NumPy reference -------------------------------------------------------------------


def np_oracles(x, y, v, upper, lower):
    """(f, grad_x f, grad_y f, grad_y g, d2_yy g v, d2_xy g v) on the given rows."""
    s, a, b, l = (lower[k] for k in LOWER_KEYS)
    lower_grad = np.mean(s * (s @ y)[:, None] + b * (a @ x)[:, None] + l, axis=0)
    hvp = s.T @ (s @ v) / len(s)
    cross = a.T @ (b @ v) / len(s)
    s, a, b, l, r, c = (upper[k] for k in UPPER_KEYS)
    value = np.mean(
        0.5 * (s @ y) ** 2 + 0.5 * (r @ x) ** 2 + (a @ x) * (b @ y) + l @ y + c @ x
    )
    grad_y = np.mean(s * (s @ y)[:, None] + b * (a @ x)[:, None] + l, axis=0)
    grad_x = np.mean(r * (r @ x)[:, None] + a * (b @ y)[:, None] + c, axis=0)
    return value, grad_x, grad_y, lower_grad, hvp, cross


def np_hypergradient(x, lower, upper):
    """grad h(x) from the mean matrices."""
    n, m = len(lower["s"]), len(upper["s"])
    hessian = lower["s"].T @ lower["s"] / n
    coupling = lower["a"].T @ lower["b"] / n
    y = -np.linalg.solve(hessian, coupling.T @ x + lower["l"].mean(0))
    grad_y = (
        upper["s"].T @ (upper["s"] @ y) / m
        + (upper["a"].T @ upper["b"] / m).T @ x
        + upper["l"].mean(0)
    )
    v = -np.linalg.solve(hessian, grad_y)
    x_terms = upper["r"].T @ (upper["r"] @ x) / m + upper["c"].mean(0)
    return x_terms + (upper["a"].T @ upper["b"] / m) @ y + coupling @ v


class Batches:
    """The fixed batches of `data` as float64 NumPy rows, and the batch indices of draws
    0..steps-1 (stream 0), computed once (eager draws would be slow)."""

    def __init__(self, data, steps):
        num_l, num_u = data.num_lower_batches, data.num_upper_batches

        @jax.jit
        def tables():
            lower = jax.vmap(data.lower_batch_at)(jnp.arange(num_l))
            upper = jax.vmap(data.upper_batch_at)(jnp.arange(num_u))
            draws = jnp.arange(steps)
            return (
                lower, upper,
                jax.vmap(lambda t: data.lower_indexed(None, t)[0])(draws),
                jax.vmap(lambda t: data.upper_indexed(None, t)[0])(draws),
            )

        lower, upper, lower_index, upper_index = jax.device_get(tables())
        as64 = lambda tree, k: {key: np.asarray(u[k], np.float64) for key, u in tree.items()}  # noqa: E731
        self.lower = [as64(lower, k) for k in range(num_l)]
        self.upper = [as64(upper, k) for k in range(num_u)]
        self.index = list(zip(lower_index.tolist(), upper_index.tolist()))
        self.full_lower = as64(jax.device_get(data.full_lower()), slice(None))
        self.full_upper = as64(jax.device_get(data.full_upper()), slice(None))

    def at(self, step):
        i, j = self.index[step]
        return i, j, self.lower[i], self.upper[j]


def _metrics(value, d_x, lower_grad, d_v):
    return {
        "upper_loss": value,
        "grad_norm": np.linalg.norm(d_x),
        "lower_residual": np.linalg.norm(lower_grad),
        "linear_residual": np.linalg.norm(d_v),
    }


def reference_soba(data, x, y, steps, rho0, gamma0, decays, horizon):
    v, history = np.zeros_like(y), []
    for t in range(steps):
        _, _, lower, upper = data.at(t)
        value, fx, fy, gy, hvp, cross = np_oracles(x, y, v, upper, lower)
        d_v, d_x = hvp + fy, cross + fx
        history.append(_metrics(value, d_x, gy, d_v))
        rho = rho0 * (1 + t / horizon) ** -decays[0]
        gamma = gamma0 * (1 + t / horizon) ** -decays[1]
        x, y, v = x - gamma * d_x, y - rho * gy, v - rho * d_v
    return x, y, v, history


def reference_saba(data, x, y, steps, rho, gamma, full_memory):
    v, history = np.zeros_like(y), []
    lower_rows, upper_rows = data.lower, data.upper
    tables = {
        "lower": np.zeros((len(lower_rows), 2 * DY + DX)),
        "upper": np.zeros((len(upper_rows), DY + DX)),
    }
    if full_memory:  # at v0 = 0 the second-order products vanish
        for k, rows in enumerate(lower_rows):
            tables["lower"][k, :DY] = np_oracles(x, y, v, upper_rows[0], rows)[3]
        for k, rows in enumerate(upper_rows):
            _, fx, fy, *_ = np_oracles(x, y, v, rows, lower_rows[0])
            tables["upper"][k] = np.r_[fy, fx]
    means = {name: table.mean(0) for name, table in tables.items()}
    for t in range(steps):
        i, j, lower, upper = data.at(t)
        value, fx, fy, gy, hvp, cross = np_oracles(x, y, v, upper, lower)
        hats = {}
        for name, k, new in (
            ("lower", i, np.r_[gy, hvp, cross]),
            ("upper", j, np.r_[fy, fx]),
        ):
            diff = new - tables[name][k]
            hats[name] = diff + means[name]
            means[name] = means[name] + diff / len(tables[name])
            tables[name][k] = new
        gy_hat, hvp_hat = hats["lower"][:DY], hats["lower"][DY : 2 * DY]
        cross_hat, fy_hat, fx_hat = hats["lower"][2 * DY :], hats["upper"][:DY], hats["upper"][DY:]
        d_v, d_x = hvp_hat + fy_hat, cross_hat + fx_hat
        history.append(_metrics(value, d_x, gy, hvp + fy))
        x, y, v = x - gamma * d_x, y - rho * gy_hat, v - rho * d_v
    return x, y, v, history


def reference_srba(data, x, y, steps, rho, gamma, period):
    v, history = np.zeros_like(y), []

    def directions(point, upper, lower):
        value, fx, fy, gy, hvp, cross = np_oracles(*point, upper, lower)
        return value, np.r_[gy, hvp + fy, cross + fx]

    old = None
    for t in range(steps):
        point = (x, y, v)
        if t % period == 0:
            value, d = directions(point, data.full_upper, data.full_lower)
            raw = d
        else:
            _, _, lower, upper = data.at(t)
            value, raw = directions(point, upper, lower)
            d = d + raw - directions(old, upper, lower)[1]
        history.append(_metrics(value, d[2 * DY :], raw[:DY], raw[DY : 2 * DY]))
        old = point
        x, y, v = x - gamma * d[2 * DY :], y - rho * d[:DY], v - rho * d[DY : 2 * DY]
    return x, y, v, history


def reference_masoba(data, x, y, steps, rho0, gamma0, theta0, decay, horizon, radius):
    v, h, history = np.zeros_like(y), np.zeros_like(x), []
    for t in range(steps):
        _, _, lower, upper = data.at(t)
        value, fx, fy, gy, hvp, cross = np_oracles(x, y, v, upper, lower)
        d_v, d_x = hvp + fy, cross + fx
        history.append(_metrics(value, d_x, gy, d_v))
        scale = (1 + t / horizon) ** -decay
        h = h + theta0 * scale * (d_x - h)
        y, v, x = y - rho0 * scale * gy, v - rho0 * scale * d_v, x - gamma0 * scale * h
        v = v * min(1.0, radius / np.linalg.norm(v))
    return x, y, v, history


# --- transcription tests ---------------------------------------------------------------


def _run(solver, data, dtype, steps):
    x0, y0 = -jnp.ones(DX, dtype), jnp.zeros(DY, dtype)
    state, history = bl.run(PROBLEM, solver, x0, y0, data, steps, jr.PRNGKey(0))
    return state, history


def _check(state, history, reference, dtype):
    x, y, v, rows = reference
    rtol = RTOL[dtype]
    for name, value in (("x", x), ("y", y), ("v", v)):
        np.testing.assert_allclose(getattr(state, name), value, rtol=rtol, atol=rtol, err_msg=name)
    for name in rows[0]:
        expected = np.array([row[name] for row in rows])
        np.testing.assert_allclose(history[name], expected, rtol=rtol, atol=rtol, err_msg=name)


def _data(dtype):
    lower, upper = _arrays(0)
    return bl.FixedBatches(
        upper=_cast(upper, dtype), lower=_cast(lower, dtype), batch_size=4,
        upper_batch_size=3, seed=11,
    )


STEPS = 10
X0, Y0 = -np.ones(DX), np.zeros(DY)


@pytest.mark.parametrize("dtype", DTYPES)
def test_soba_matches_numpy(dtype):
    data = _data(dtype)
    solver = bl.solvers.SOBA(inner_lr=0.3, outer_lr=0.2, decay_steps=3)
    state, history = _run(solver, data, dtype, STEPS)
    reference = reference_soba(Batches(data, STEPS), X0, Y0, STEPS, 0.3, 0.2, (0.4, 0.6), 3)
    _check(state, history, reference, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("memory_init", ["zero", "full"])
def test_saba_matches_numpy(dtype, memory_init):
    data = _data(dtype)
    solver = bl.solvers.SABA(inner_lr=0.3, outer_lr=0.2, memory_init=memory_init)
    state, history = _run(solver, data, dtype, STEPS)
    reference = reference_saba(Batches(data, STEPS), X0, Y0, STEPS, 0.3, 0.2, memory_init == "full")
    _check(state, history, reference, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_srba_matches_numpy(dtype):
    data = _data(dtype)
    solver = bl.solvers.SRBA(inner_lr=0.3, outer_lr=0.2, period=4)
    state, history = _run(solver, data, dtype, STEPS)
    reference = reference_srba(Batches(data, STEPS), X0, Y0, STEPS, 0.3, 0.2, 4)
    _check(state, history, reference, dtype)
    assert np.array_equal(history["full_pass"], [1, 0, 0, 0] * 2 + [1, 0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_masoba_matches_numpy(dtype):
    data = _data(dtype)
    solver = bl.solvers.MASOBA(
        inner_lr=0.3, outer_lr=0.2, averaging=0.6, decay_steps=3, v_radius=0.5
    )
    state, history = _run(solver, data, dtype, STEPS)
    reference = reference_masoba(Batches(data, STEPS), X0, Y0, STEPS, 0.3, 0.2, 0.6, 0.5, 3, 0.5)
    _check(state, history, reference, dtype)
    assert float(jnp.linalg.norm(state.v)) == pytest.approx(0.5, rel=1e-5)  # active
