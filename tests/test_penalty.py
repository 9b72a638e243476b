"""Value-function penalty solvers: Penalty (Kwon et al. 2024), VPBGD (Shen & Chen 2023),
F2SA (Kwon et al. 2023).

Oracles: closed forms from dense float64 Hessians of quadratic problems, the IFT
hypergradient (closed form, or `bl.hypergradient` through the projected-gradient fixed
point for a box-constrained lower level), the sl-BAMM merely convex toy (optimistic
solution known), the V-PBGD toy (hyper-objective known), and exact minibatch variances.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import bilevel as bl

from ._penalty_problems import CARRIED_QUADRATIC, carried_data, quadratic_constants


SIGMAS = jnp.array([1e-1, 1e-2, 1e-3])
# Every numerical test runs in float64 and float32 (inputs built in the dtype; the
# conftest enables x64, and float32 inputs stay float32).
DTYPES = [jnp.float64, jnp.float32]


def _is64(dtype) -> bool:
    return jnp.finfo(dtype).bits == 64


# --------------------------------------------------------------------------------------
# Problems and closed forms


@pytest.fixture(scope="module")
def quad():
    return bl.problems.quadratic(dim_x=3, dim_y=5, seed=0)


def _blocks(fn, batch, nx, ny):
    """Dense Hessian and gradient at 0 of a quadratic fn(x, y, batch) in v = (x, y),
    as float64 NumPy arrays."""
    joint = jax.jit(lambda v: fn(v[:nx], v[nx:], batch))
    zero = jnp.zeros(nx + ny)
    return np.asarray(jax.hessian(joint)(zero)), np.asarray(jax.grad(joint)(zero))


@pytest.fixture(scope="module")
def quad_constants(quad):
    """The quadratic's constants, to run it in either dtype (`CARRIED_QUADRATIC`)."""
    return quadratic_constants(quad)


@pytest.fixture(scope="module")
def quad_blocks(quad):
    """(H_f, grad_f(0), H_g, grad_g(0)) of the quadratic problem, dims (3, 5)."""
    rows = quad.data.lower
    upper = _blocks(quad.problem.upper, None, 3, 5)
    return (*upper, *_blocks(quad.problem.lower, rows, 3, 5))


def penalty_solution(blocks, sigma, nx=3):
    r"""$\arg\min_x \psi_\sigma(x)$ for quadratic f, g: the joint minimiser over
    (x, y) of $f + (g - g^*)/\sigma$, with $g^*(x)$ eliminated by a Schur complement."""
    hf, gf, hg, gg = blocks
    g_yy, g_xy = hg[nx:, nx:], hg[:nx, nx:]
    schur = hg[:nx, :nx] - g_xy @ np.linalg.solve(g_yy, g_xy.T)
    z0 = -np.linalg.solve(g_yy, gg[nx:])  # argmin_z g(0, z)
    lam = 1 / sigma
    hessian = hf + lam * hg
    hessian[:nx, :nx] -= lam * schur
    grad0 = gf + lam * gg
    grad0[:nx] -= lam * (gg[:nx] + g_xy @ z0)
    return -np.linalg.solve(hessian, grad0)[:nx]


def value_gap(blocks, x, y, nx=3):
    """g(x, y) - min_z g(x, z) for the quadratic g given by its blocks."""
    _, _, hg, gg = blocks
    g_yy, g_yx = hg[nx:, nx:], hg[nx:, :nx]
    residual = g_yy @ y + g_yx @ x + gg[nx:]  # grad_y g(x, y)
    return 0.5 * residual @ np.linalg.solve(g_yy, residual)


def _box_problem(dtype=jnp.float64, rounded_to=None):
    """Strongly convex quadratic lower level on the box [-1, 1]^5; the offset e keeps
    y_1, y_2 strictly active (multipliers ~1) near the solution, the rest free.
    Constants in `dtype`, after rounding to `rounded_to` (the float64 reference of a
    float32 run uses the float32 constants)."""
    k1, k2, k3 = jr.split(jr.PRNGKey(0), 3)
    q = jr.normal(k1, (5, 5)) / np.sqrt(5)
    a = jnp.eye(5) + 0.3 * q @ q.T
    b = jr.normal(k2, (5, 3)) / np.sqrt(3)
    c = 0.5 * jr.normal(k3, (5,))
    e = jnp.array([3.0, -3.0, 0.0, 0.0, 0.0])
    rounded_to = dtype if rounded_to is None else rounded_to
    a, b, c, e = (jnp.asarray(v.astype(rounded_to), dtype) for v in (a, b, c, e))

    def lower(x, y, batch):
        return 0.5 * y @ (a @ y) - y @ (b @ x + e)

    def upper(x, y, batch):
        return 0.5 * jnp.sum((y - c) ** 2) + 0.5 * x @ x

    box = lambda y: jnp.clip(y, -1.0, 1.0)  # noqa: E731
    return bl.BilevelProblem(upper, lower, project_y=box)


@pytest.fixture(scope="module")
def box():
    return _box_problem()


def _box_hypergradient(problem, x):
    """bl.hypergradient (IFT through the projected-gradient fixed point) at
    y*(x) computed by 5000 projected gradient steps (contraction <= 0.7 per step)."""

    def body(_, y):
        grad = jax.grad(problem.lower, argnums=1)(x, y, None)
        return problem.project_y(y - 0.3 * grad)

    y = jax.lax.fori_loop(0, 5000, body, jnp.zeros(5, x.dtype))
    grad, info = bl.hypergradient(problem, x, y)
    return grad, info.optimality_residual


# --------------------------------------------------------------------------------------
# 1. Penalty direction with exact y_sigma, z* -> IFT hypergradient, error O(sigma)


def _direction(problem, data, x, sigma):
    """d_sigma(x) read off one Penalty step with x_lr = 1 and inner loops long enough to
    reach y_sigma and z* to machine precision (contraction <= 0.8 per step)."""
    solver = bl.solvers.Penalty(
        sigma=sigma, x_lr=1.0, y_lr=0.2, z_lr=0.2, y_steps=2000, z_steps=2000
    )
    state = solver.init(problem, x, jnp.zeros(5, x.dtype), jr.PRNGKey(0))
    new_state, _ = solver.step(problem, state, data, jr.PRNGKey(0))
    return x - new_state.x


def _slope(errors):
    return float(jnp.log10(errors[0] / errors[-1]) / jnp.log10(SIGMAS[0] / SIGMAS[-1]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_direction_error_is_linear_in_sigma(quad, quad_constants, dtype):
    # Quadratic: the IFT hypergradient in closed form; box: bl.hypergradient through the
    # projected-gradient fixed point (same problem, active set {1, 2} with multipliers
    # ~1, so the penalty solution y_sigma keeps that active set for sigma <= 0.1).
    # References in float64 (for float32, from the float32-rounded constants; the
    # quadratic's closed form uses the float64 ones, 1e-7 away, far below the errors).
    x_quad = jnp.array([0.5, -1.0, 1.5], dtype)
    reference_quad = quad.hypergradient(x_quad.astype(jnp.float64))
    x_box = jnp.array([0.3, -0.2, 0.4], dtype)
    box_reference = _box_problem(jnp.float64, rounded_to=dtype)
    x_box64 = x_box.astype(jnp.float64)
    reference_box, residual = _box_hypergradient(box_reference, x_box64)
    assert residual < 1e-12  # the reference lower solution is exact
    quad_data = carried_data(quad_constants, dtype)
    for problem, data, x, reference in (
        (CARRIED_QUADRATIC, quad_data, x_quad, reference_quad),
        (_box_problem(dtype), None, x_box, reference_box),
    ):
        direction = lambda s: _direction(problem, data, x, s)  # noqa: E731
        directions = jax.jit(jax.vmap(direction))(SIGMAS.astype(dtype))
        assert directions.dtype == dtype
        directions = directions.astype(jnp.float64)
        errors = jnp.linalg.norm(directions - reference[None, :], axis=1)
        # Error = C sigma + O(sigma^2): the log-log slope over two decades is 1 up to
        # O(sigma_max) = 0.1 (measured 0.99 and 0.98); the errors decrease monotonically
        # and stay below 2 sigma ||reference|| (C / ||reference|| measured 0.43, 0.19).
        assert 0.9 <= _slope(errors) <= 1.1, errors
        assert bool(jnp.all(errors[1:] < errors[:-1]))
        assert bool(jnp.all(errors <= 2 * SIGMAS * jnp.linalg.norm(reference))), errors


# --------------------------------------------------------------------------------------
# 2. Each solver reaches the quadratic's x* up to the O(sigma) penalty bias


QUADRATIC_CASES = {
    # decreasing sigma_k = max(0.01, 0.1 / (k + 1))
    "penalty_double_loop": (
        bl.solvers.Penalty(
            sigma=0.1, sigma_decay=1.0, sigma_min=0.01, x_lr=0.5, y_lr=0.2, z_lr=0.2
        ),
        300,
        lambda k: 1 / np.maximum(0.01, 0.1 / (k + 1)),
    ),
    "penalty_single_loop": (
        bl.solvers.Penalty(
            variant="single_loop", sigma=0.01, x_lr=0.05, y_lr=0.2, z_lr=0.2
        ),
        3000,
        lambda k: np.full(k.shape, 100.0),
    ),
    # linear ramp of gamma from 1 to 10 over 500 steps
    "vpbgd": (
        bl.solvers.VPBGD(
            penalty=10.0,
            penalty_init=1.0,
            ramp_steps=500,
            x_lr=0.02,
            z_lr=0.2,
            z_steps=5,
        ),
        3000,
        lambda k: 1 + 9 * np.minimum(k / 500, 1),
    ),
    # deterministic oracles: alpha_k lambda_k constant, lambda_k = 10 (k + 1)^(1/4)
    "f2sa": (
        bl.solvers.F2SA(
            penalty=10.0,
            penalty_growth=0.25,
            y_lr=0.02,
            y_lr_decay=0.25,
            z_lr=0.2,
            z_lr_decay=0.0,
            x_ratio=25.0,
        ),
        3000,
        lambda k: 10 * (k + 1.0) ** 0.25,
    ),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(QUADRATIC_CASES))
def test_quadratic_reaches_solution(quad, quad_constants, quad_blocks, name, dtype):
    solver, num_steps, schedule = QUADRATIC_CASES[name]
    data = carried_data(quad_constants, dtype)
    x0, y0 = quad.x0.astype(dtype), quad.y0.astype(dtype)
    state, history = bl.run(CARRIED_QUADRATIC, solver, x0, y0, data, num_steps)
    x, y = (np.asarray(v, np.float64) for v in solver.params(state))
    assert history["lambda"].dtype == dtype
    # The lambda metric follows the documented schedule (to rounding: a few ulps of
    # the dtype).
    expected = schedule(np.arange(num_steps))
    rtol = 1e-12 if _is64(dtype) else 1e-6
    np.testing.assert_allclose(history["lambda"], expected, rtol=rtol)
    sigma = 1 / float(history["lambda"][-1])
    x_sigma = penalty_solution(quad_blocks, sigma)
    bias = float(np.linalg.norm(x_sigma - quad.solution))
    # The penalty bias is O(sigma): ||x_sigma - x*|| / sigma = 0.54..0.57 here.
    assert bias <= sigma
    # The optimisation error is a small fraction (5 %) of that bias (measured: 1e-13
    # for the penalty loops, 1e-3 and 6e-3 of the bias for VPBGD and F2SA), so x_K lies
    # within 1.05 ||x_sigma - x*|| <= 1.05 sigma of x*.
    assert float(np.linalg.norm(x - x_sigma)) <= 0.05 * bias
    assert float(np.linalg.norm(x - quad.solution)) <= 1.05 * bias
    # Metrics: penalty gap g(x, y) - g*(x) = 1/2 r^T G_yy^-1 r with r = grad_y g(x, y),
    # and the penalised variable's residual ||r|| = sigma ||grad_y f(x, y)|| at
    # y = y_sigma(x), from dense algebra (rtol 1e-2 covers the last step's x_{K-1} vs
    # x_K and the remaining optimisation error; in float32 the gap, ~1e-4 here, is a
    # difference of two O(1) values and loses ~1e-7 / 1e-4 = 1e-3 more: rtol 3e-2).
    gap = value_gap(quad_blocks, x, y)
    gap_rtol = 1e-2 if _is64(dtype) else 3e-2
    np.testing.assert_allclose(history["penalty_gap"][-1], gap, rtol=gap_rtol)
    hf, gf = quad_blocks[:2]
    grad_f = hf[3:, :3] @ x + hf[3:, 3:] @ y + gf[3:]
    np.testing.assert_allclose(
        history["lower_residual"][-1], sigma * np.linalg.norm(grad_f), rtol=1e-2
    )


# --------------------------------------------------------------------------------------
# 3. Box-constrained lower level: agreement with implicit differentiation


@pytest.mark.parametrize("dtype", DTYPES)
def test_box_solution_matches_implicit_differentiation(dtype):
    box = _box_problem(dtype)

    @jax.jit
    @jax.vmap
    def final_x(sigma):
        solver = bl.solvers.Penalty(sigma=sigma, x_lr=0.5, y_lr=0.3, z_lr=0.3)
        x0, y0 = jnp.zeros(3, dtype), jnp.zeros(5, dtype)
        state, history = bl.run(box, solver, x0, y0, None, 60)
        return state.x, history["grad_norm"][-1]

    xs, grad_norms = final_x(SIGMAS.astype(dtype))
    # The penalty iteration has converged to its fixed point (||grad psi_sigma||
    # < 1e-12 after ~50 steps; in float32 to the rounding of d = f_x + (g_x(y) -
    # g_x(z)) / sigma, ~1e-7 / sigma_min = 1e-4)...
    assert float(jnp.max(grad_norms)) < (1e-10 if _is64(dtype) else 1e-3)
    # ...where the true hypergradient (IFT through the projected-gradient fixed point,
    # in float64 on the same rounded constants) is grad F - grad psi_sigma = O(sigma):
    # slope 1 within O(sigma_max) (measured 0.99; norms 1.5e-2, 1.5e-3, 1.6e-4), and
    # below sigma (F is 1-strongly convex, so ||x_sigma - x*|| <= ||grad F(x_sigma)||
    # too).
    reference = _box_problem(jnp.float64, rounded_to=dtype)
    xs = xs.astype(jnp.float64)
    hypergrads, residuals = jax.vmap(lambda x: _box_hypergradient(reference, x))(xs)
    assert float(jnp.max(residuals)) < 1e-12
    norms = jnp.linalg.norm(hypergrads, axis=1)
    assert 0.9 <= _slope(norms) <= 1.1, norms
    assert bool(jnp.all(norms <= SIGMAS)), norms


# --------------------------------------------------------------------------------------
# 4. Merely convex lower level with a non-singleton solution set (sl-BAMM toy)


def _slbamm_toy(n=4, dtype=jnp.float64):
    """F = 1/2||x - w||^2 + 1/2||u - 1||^2, f = 1/2||u||^2 - x.u over y = (u, w):
    S(x) = {(x, w)}, optimistic solution x = u = w = 1."""

    def upper(x, y, batch):
        u, w = y
        return 0.5 * jnp.sum((x - w) ** 2) + 0.5 * jnp.sum((u - 1) ** 2)

    def lower(x, y, batch):
        u, _ = y
        return 0.5 * u @ u - x @ u

    start = jnp.full(n, 0.01, dtype)
    return bl.BilevelProblem(upper, lower), start, (start, start)


MERELY_CONVEX_CASES = {
    "penalty_double_loop": (
        bl.solvers.Penalty(sigma=0.1, x_lr=0.5, y_lr=0.5, z_lr=0.5),
        200,
    ),
    "penalty_single_loop": (
        bl.solvers.Penalty(
            variant="single_loop", sigma=0.1, x_lr=0.2, y_lr=0.5, z_lr=0.5
        ),
        1000,
    ),
    "vpbgd": (bl.solvers.VPBGD(penalty=10.0, x_lr=0.05, z_lr=0.5, z_steps=5), 1500),
    "f2sa": (
        bl.solvers.F2SA(
            penalty=10.0,
            penalty_growth=0.25,
            y_lr=0.05,
            y_lr_decay=0.25,
            z_lr=0.5,
            z_lr_decay=0.0,
            x_ratio=10.0,
        ),
        600,
    ),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(MERELY_CONVEX_CASES))
def test_merely_convex_reaches_optimistic_solution(name, dtype):
    solver, num_steps = MERELY_CONVEX_CASES[name]
    problem, x0, y0 = _slbamm_toy(dtype=dtype)
    state, history = bl.run(problem, solver, x0, y0, None, num_steps)
    x, (u, w) = solver.params(state)
    # psi_sigma(x) has gradient (x - 1) / (1 + sigma) (derived: y_sigma =
    # ((x + sigma) / (1 + sigma), x), z* = (x, w0)), so x* = u = w = 1 for every sigma:
    # no penalty bias, the tolerance is optimisation accuracy only (spec S1 asks 1e-4;
    # linear rates reach 1e-8 within these budgets in float64, the float32 rounding
    # of values near 1, ~1e-7, amplified by the 1/sigma = 10 in d_x, in float32).
    atol = 1e-8 if _is64(dtype) else 1e-5
    for value in (x, u, w):
        assert value.dtype == dtype
        np.testing.assert_allclose(value, 1.0, atol=atol)
    # The value-function copy z sits in S(x) but at a non-optimistic point: its w-part
    # never moves (grad_w g = 0), so S(x) is not a singleton and y did the selecting.
    z_u, z_w = state.z
    np.testing.assert_allclose(z_u, 1.0, atol=atol)
    np.testing.assert_allclose(z_w, np.asarray(0.01, dtype), rtol=1e-12)
    # The gap is a difference of two values ~0.5: float32 rounding 6e-8.
    assert float(history["penalty_gap"][-1]) < (1e-12 if _is64(dtype) else 1e-6)


# --------------------------------------------------------------------------------------
# 5. V-PBGD toy: iterates end at local minima of the hyper-objective


def _vpbgd_toy():
    def upper(x, y, batch):
        return jnp.cos(4 * y + 2) / (1 + jnp.exp(2 - 4 * x)) + 0.5 * jnp.log(
            (4 * x - 2) ** 2 + 1
        )

    def lower(x, y, batch):
        return (x + y) ** 2 + x * jnp.sin(x + y) ** 2

    project_x = lambda x: jnp.clip(x, 0.0, 3.0)  # noqa: E731
    return bl.BilevelProblem(upper, lower, project_x=project_x)


def _local_minima(fn, low, high, num=30001):
    """Interior local minima of a scalar fn on [low, high]: dense grid, then Newton."""
    grid = np.linspace(low, high, num)
    values = np.asarray(jax.vmap(fn)(jnp.asarray(grid)))
    inner = (values[1:-1] < values[:-2]) & (values[1:-1] <= values[2:])
    assert values[0] > values[1] and values[-1] > values[-2]  # no boundary minima
    newton = jax.jit(lambda x: x - jax.grad(fn)(x) / jax.grad(jax.grad(fn))(x))
    minima = []
    for x in grid[1:-1][inner]:
        for _ in range(20):
            x = newton(x)
        minima.append(float(x))
    return np.array(minima)


@pytest.mark.parametrize("dtype", DTYPES)
def test_vpbgd_toy_ends_at_local_minima(dtype):
    problem = _vpbgd_toy()
    gamma = 10.0

    def psi(x):  # y*(x) = -x, the unique minimiser of g(x, .) for x in [0, 3]
        return problem.upper(x, -x, None)

    minima = _local_minima(psi, 0.0, 3.0)

    def phi(x):  # psi_gamma = psi - phi / gamma + O(gamma^-2) (second-order expansion)
        f_y = jax.grad(problem.upper, argnums=1)(x, -x, None)
        g_yy = jax.grad(jax.grad(problem.lower, argnums=1), argnums=1)(x, -x, None)
        return f_y**2 / (2 * g_yy)

    shifts = np.array(
        [float(jax.grad(phi)(m) / (gamma * jax.grad(jax.grad(psi))(m))) for m in minima]
    )

    # The paper's toy configuration: gamma = 10, alpha = 0.1 / gamma, random starts.
    solver = bl.solvers.VPBGD(penalty=gamma, x_lr=0.1 / gamma, z_lr=0.1)
    x0s = jr.uniform(jr.PRNGKey(1), (48,), minval=0.0, maxval=3.0).astype(dtype)
    y0s = jr.uniform(jr.PRNGKey(2), (48,), minval=-5.0, maxval=8.5).astype(dtype)

    @jax.jit
    @jax.vmap
    def final(x0, y0):
        state, history = bl.run(problem, solver, x0, y0, None, 4000)
        return state.x, state.y, history["grad_norm"][-1]

    xs, ys, grad_norms = (np.asarray(v, np.float64) for v in final(x0s, y0s))
    # Stationary for the penalised problem (float32: the rounding of d_x, ~1e-7 times
    # gamma = 10 and the O(1) gradients, below 1e-5).
    assert grad_norms.max() < (1e-6 if _is64(dtype) else 1e-5)
    nearest = np.argmin(np.abs(xs[:, None] - minima[None, :]), axis=1)
    distance = np.abs(xs - minima[nearest])
    # Every end point is a local minimum of psi up to the penalty bias, whose
    # first-order value |shift| = |phi'(x*)| / (gamma psi''(x*)) is 0.014, 0.026 and
    # 0.0056 for the three minima; 1.5 |shift| leaves room for the O(gamma^-2) term
    # (measured 1e-3).
    assert bool(np.all(distance <= 1.5 * np.abs(shifts[nearest]))), (xs, minima, shifts)
    # All three basins are visited, and y ends near y*(x) = -x, within the O(1/gamma)
    # offset |f_y| / (gamma g_yy) <= 4 / (2 gamma) = 0.2.
    assert set(nearest) == set(range(len(minima)))
    assert np.max(np.abs(ys + xs)) <= 4 / (2 * gamma)


# --------------------------------------------------------------------------------------
# 6. Coupled vs independent samples for the two grad_x g calls


def _stochastic_problem(num=40, dim=3):
    """g(x, y; a) = 1/2 mean (a.(y - x))^2 + 1/2||y||^2, f = 1/2||y - c||^2: grad_x g
    depends on the sample, so the coupling matters."""
    rows = jr.normal(jr.PRNGKey(3), (num, dim))
    c = jnp.array([1.0, -0.5, 0.25])

    def lower(x, y, batch):
        return 0.5 * jnp.mean((batch @ (y - x)) ** 2) + 0.5 * y @ y

    def upper(x, y, batch):
        return 0.5 * jnp.sum((y - c) ** 2)

    return bl.BilevelProblem(upper, lower), rows


@pytest.mark.parametrize("coupled", [True, False])
def test_sample_coupling_variance(coupled):
    problem, rows = _stochastic_problem()
    batch_size, sigma, keys_per_seed, seeds = 4, 0.1, 4000, (4, 5, 6, 7)
    num_keys = keys_per_seed * len(seeds)
    data = bl.Minibatch(
        upper=None, lower=rows, batch_size=batch_size, sampling="with_replacement"
    )
    solver = bl.solvers.Penalty(
        variant="single_loop", sigma=sigma, x_lr=1.0, coupled_samples=coupled
    )
    x = jnp.array([0.2, 0.1, -0.3])
    y = jnp.array([0.5, -0.4, 0.3])
    z = jnp.array([0.45, -0.35, 0.32])
    state = eqx.tree_at(lambda s: s.z, solver.init(problem, x, y, None), z)

    @jax.jit
    @jax.vmap
    def direction(key):  # first step: D_0 = d(x, y, z; xi), x_1 = x - D_0
        return x - solver.step(problem, state, data, key)[0].x

    # Samples pooled over several seeds (4 x 4000 draws), not one stream tuned to pass.
    keys = jnp.concatenate([jr.split(jr.PRNGKey(s), keys_per_seed) for s in seeds])
    samples = direction(keys)
    # Exact moments for b i.i.d. rows: with P = a a^T and A = E P,
    # d_x = (P_1 (x - y) - P_2 (x - z)) / sigma, E d_x = A (z - y) / sigma, and
    # E||d_x - E d_x||^2 = (V(y - x) + V(z - x)) / b / sigma^2 for independent P_1, P_2,
    # V(y - z) / b / sigma^2 when P_1 = P_2, with V(v) = mean_i ||a_i a_i^T v - A v||^2.
    outer = rows[:, :, None] * rows[:, None, :]
    second = jnp.mean(outer, axis=0)

    def spread(v):
        return jnp.mean(jnp.sum((outer @ v - (second @ v)[None, :]) ** 2, axis=1))

    if coupled:
        variance = spread(y - z) / batch_size / sigma**2
    else:
        variance = (spread(y - x) + spread(z - x)) / batch_size / sigma**2
    mean = second @ (z - y) / sigma
    empirical_mean = jnp.mean(samples, axis=0)
    empirical_variance = jnp.mean(jnp.sum((samples - mean[None, :]) ** 2, axis=1))
    # Monte-Carlo tolerances with N = 16000: the mean within 5 standard errors
    # sqrt(variance / N); the variance within 15 % (its relative standard error is
    # sqrt((kurtosis - 1) / N) ~ 2.5 % for these heavy-tailed products of Gaussians,
    # so 15 % is 6 standard errors: a false failure has probability < 1e-8).
    assert float(jnp.linalg.norm(empirical_mean - mean)) <= 5 * float(
        jnp.sqrt(variance / num_keys)
    )
    np.testing.assert_allclose(empirical_variance, variance, rtol=0.15)


# --------------------------------------------------------------------------------------
# 7. Clear errors for bad configuration and input


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: bl.solvers.Penalty(variant="triple"), "variant"),
        (lambda: bl.solvers.Penalty(sigma=0.0), "sigma"),
        (lambda: bl.solvers.Penalty(sigma_decay=-1.0), "sigma_decay"),
        (lambda: bl.solvers.Penalty(momentum=1.5), "momentum"),
        (lambda: bl.solvers.Penalty(y_steps=0), "y_steps"),
        (lambda: bl.solvers.Penalty(z_steps=2.5), "z_steps"),
        (lambda: bl.solvers.VPBGD(penalty=-1.0), "penalty"),
        (lambda: bl.solvers.VPBGD(z_steps=0), "z_steps"),
        (lambda: bl.solvers.VPBGD(ramp_steps=-3), "ramp_steps"),
        (lambda: bl.solvers.F2SA(x_ratio=0.0), "x_ratio"),
        (lambda: bl.solvers.F2SA(offset=0.5), "offset"),
        (lambda: bl.solvers.F2SA(y_steps=0), "y_steps"),
    ],
)
def test_invalid_configuration(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_invalid_problem_and_inputs():
    solver = bl.solvers.Penalty()
    upper = lambda x, y, b: jnp.sum(x * y)  # noqa: E731
    lower = lambda x, y, b: jnp.sum(y**2)  # noqa: E731
    x, y = jnp.zeros(2), jnp.zeros(2)
    multi = bl.MultiBlockProblem(upper, lambda x, y, b, i: jnp.sum(y**2), num_blocks=2)
    with pytest.raises(TypeError, match="BilevelProblem"):
        solver.init(multi, x, jnp.zeros((2, 2)), None)
    constrained = bl.BilevelProblem(
        upper, lower, lower_constraints=lambda x, y: y - 1.0, project_y=lambda y: y
    )
    with pytest.raises(ValueError, match="lower_constraints"):
        bl.solvers.F2SA().init(constrained, x, y, None)
    with pytest.raises(TypeError, match="floating"):
        bl.solvers.VPBGD().init(
            bl.BilevelProblem(upper, lower), x, jnp.zeros(2, int), None
        )
