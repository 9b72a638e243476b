"""SLBAMM (sl-BAMM) against closed-form toys and a dense float64 reference update."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import bilevel as bl
from bilevel.solvers._slbamm import linearise

from .data import lbo_histories, scale_battery
from .helpers import relative_error, weight_decay_problem


# --- merely convex toy (spec slbamm.md 2.5a): x* = y* = z* = 1, the LL ignores z ------
N = 100


def toy_upper(x, yz, batch):
    y, z = yz
    return 0.5 * jnp.sum((x - z) ** 2) + 0.5 * jnp.sum((y - 1.0) ** 2)


def toy_lower(x, yz, batch):
    y, _ = yz
    return 0.5 * jnp.sum(y**2) - x @ y


TOY = bl.BilevelProblem(toy_upper, toy_lower)
TOY_X0 = jnp.full(N, 0.01)
TOY_Y0 = (jnp.full(N, 0.01), jnp.full(N, 0.01))


# The authors' merely convex script (spec 2.3): s = 0.1, mu0 = 0.9, p = 10, tau = 1/40,
# the strategy's x steps, Jacobi updates, plain averaging.
PAPER = dict(
    s=0.1,
    mu0=0.9,
    p=10.0,
    tau=1 / 40,
    x_lr="strategy",
    upper_weight=1.0,
    sequential=False,
    eta_max=100.0,
)


@pytest.fixture(scope="module")
def toy_runs():
    """6000 steps of each variant, one compiled scan each (shared by the tests)."""
    variants = {
        "s3": bl.solvers.SLBAMM(**PAPER),
        "s2": bl.solvers.SLBAMM(**{**PAPER, "strategy": "s2"}),
        "s1": bl.solvers.SLBAMM(**{**PAPER, "strategy": "s1"}),
        "s3_fixed": bl.solvers.SLBAMM(**{**PAPER, "v_step": "fixed"}),
        "s3_sequential": bl.solvers.SLBAMM(**{**PAPER, "sequential": True}),
        "defaults": bl.solvers.SLBAMM(),
    }
    runs = {}
    for name, solver in variants.items():
        state, history = bl.run(TOY, solver, TOY_X0, TOY_Y0, None, 6000, jr.PRNGKey(0))
        x, (y, z) = solver.params(state)
        ones = jnp.ones(N)
        errors = [relative_error(u, ones) for u in (x, y, z)]
        runs[name] = (max(errors), history)
    return runs


@pytest.mark.parametrize("name", ["s3", "s3_fixed", "s3_sequential", "defaults"])
def test_merely_convex_toy_s3_converges(toy_runs, name):
    # Spec oracle S1: s3 reaches relative error < 1e-4 on (x, y, z) within 6000 steps
    # (the reference re-implementation reports 1.2e-5, 9e-6 with the fixed v step).
    # The defaults (derived steps, Gauss-Seidel updates) measured 4e-9.
    error, history = toy_runs[name]
    assert error < 1e-4
    # At the solution v* = 0 and every KKT term vanishes; the residual must have
    # dropped with the error (it starts near 14 = ||grad_y F|| at x0).
    assert float(history["kkt_residual"][-1]) < 1e-3 * float(history["kkt_residual"][0])


def test_merely_convex_toy_s1_s2_slower(toy_runs):
    # Spec 2.5a: at k = 6000 strategies s1 and s2 are far from the solution
    # (x errors 0.65 and 0.12) because their x steps scale as mu^7 and mu^5 against
    # s3's mu^3; s1 is slower than s2.
    s1, s2, s3 = (toy_runs[name][0] for name in ("s1", "s2", "s3"))
    assert s1 > s2 > 100 * s3


def test_schedule_decays(toy_runs):
    # mu_k = mu0 / (k+1)^(1/p) really decays (not the frozen 0.1 of the authors'
    # script); the fixed s3 steps are eta_k = (k+1)^(-tau/2) s and
    # alpha_k = (k+1)^(-3 tau / 2) mu_k^3 s. Same float64 formula: rtol 1e-12.
    _, history = toy_runs["s3_fixed"]
    kappa = np.arange(1, 6001, dtype=np.float64)
    mu = 0.9 / kappa**0.1
    np.testing.assert_allclose(history["mu"], mu, rtol=1e-12)
    np.testing.assert_allclose(history["eta"], kappa ** (-1 / 80) * 0.1, rtol=1e-12)
    alpha = kappa ** (-3 / 80) * mu**3 * 0.1
    np.testing.assert_allclose(history["alpha"], alpha, rtol=1e-12)


# --- LL strongly convex identity toy (spec 2.5b): x* = y* = 0.5 -----------------------
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_strongly_convex_identity_toy(dtype):
    problem = bl.BilevelProblem(
        lambda x, y, b: 0.5 * y @ y + 0.5 * jnp.sum((x - 1.0) ** 2),
        lambda x, y, b: 0.5 * y @ y - x @ y,
    )
    # No averaging is needed for a strongly convex LL: mu0 = 0 with a mu-free x step.
    solver = bl.solvers.SLBAMM(mu0=0.0, x_lr=0.1)
    x0 = y0 = jnp.full(N, 2.0, dtype)
    state, history = bl.run(problem, solver, x0, y0, None, 1000, jr.PRNGKey(0))
    x, y = solver.params(state)
    half = jnp.full(N, 0.5, dtype)
    # Spec oracle S2: relative error < 1e-4 (measured ~1e-15 in float64 and ~1e-7 in
    # float32 after 1000 steps). float32 inputs under x64 stay float32 (no promotion).
    assert x.dtype == y.dtype == history["eta"].dtype == dtype
    assert relative_error(x, half) < 1e-4
    assert relative_error(y, half) < 1e-4


# --- derivative identities ----------------------------------------------------------
def smooth_upper(x, y, batch):
    return 0.5 * jnp.sum((y - batch["A"] @ x) ** 2) + 0.1 * jnp.sum(
        jnp.logaddexp(0.0, x * y[:3])
    )


def smooth_lower(x, y, batch):
    quadratic = 0.5 * y @ (batch["Q"] @ y) - (batch["B"] @ x) @ y
    coupling = 0.1 * jnp.sum(jnp.logaddexp(0.0, x)) * (y @ y)
    return quadratic + coupling + 0.05 * jnp.sum(y**4)


def _smooth_data():
    ka, kq, kb = jr.split(jr.PRNGKey(3), 3)
    m = jr.normal(kq, (4, 4))
    upper = {"A": jr.normal(ka, (4, 3))}
    lower = {"Q": m @ m.T / 4 + jnp.eye(4), "B": jr.normal(kb, (4, 3))}
    return upper, lower


def test_pullback_matches_dense_hessian():
    # HVP and mixed product of phi_mu = mu F + (1 - mu) f against jax.hessian /
    # jax.jacobian of the dense float64 functions: same maths through a different AD
    # path, so only round-off differs (rtol 1e-10).
    upper, lower = _smooth_data()
    problem = bl.BilevelProblem(smooth_upper, smooth_lower)
    x = jnp.array([0.3, -0.7, 1.1])
    y = jnp.array([0.5, -0.2, 0.9, -1.3])
    w = jnp.array([1.0, -2.0, 0.5, 0.25])
    mu = jnp.asarray(0.37)

    def phi(x_, y_):
        return mu * smooth_upper(x_, y_, upper) + (1 - mu) * smooth_lower(x_, y_, lower)

    @jax.jit  # one compilation instead of op-by-op dispatch of the dense reference
    def both(x, y, w):
        lin = linearise(problem, mu, x, y, upper, lower)
        mixed, hvp = lin.pullback(w)
        hessian = jax.hessian(phi, argnums=1)(x, y)
        # (dim y, dim x) matrix of d(grad_y phi)/dx
        cross = jax.jacobian(jax.grad(phi, argnums=1), argnums=0)(x, y)
        dense = (cross.T @ w, hessian @ w, jax.grad(phi, argnums=1)(x, y))
        return (mixed, hvp, lin.grad_y_phi), dense

    for got, want in zip(*both(x, y, w)):
        np.testing.assert_allclose(got, want, rtol=1e-10)


def test_pullback_toy_closed_form():
    # Spec 2.5a: H = diag(I, mu I) and J v = -(1 - mu) v_y - mu v_z (exact up to
    # round-off: atol 1e-12).
    mu = jnp.asarray(0.3)
    x = jnp.linspace(-1.0, 1.0, N)
    yz = (jnp.cos(x), jnp.sin(x))
    v = (jnp.linspace(0.0, 2.0, N), jnp.linspace(3.0, -1.0, N))
    mixed, (h_y, h_z) = linearise(TOY, mu, x, yz, None, None).pullback(v)
    np.testing.assert_allclose(h_y, v[0], atol=1e-12)
    np.testing.assert_allclose(h_z, 0.3 * v[1], atol=1e-12)
    np.testing.assert_allclose(mixed, -0.7 * v[0] - 0.3 * v[1], atol=1e-12)


# --- one step against a dense reference -----------------------------------------------
MU_POWERS = {"s1": (2, 7), "s2": (1, 5), "s3": (0, 3)}  # spec table 2.3


def _clip_x(x):
    return jnp.clip(x, -0.5, 0.5)


def reference_step(x, y, v, k, upper, lower, solver):
    """sl-BAMM update (spec 2.2/2.3) with dense Hessians and explicit matrices."""
    kappa = k + 1.0
    mu = solver.mu0 / kappa ** (1 / solver.p)
    q_eta, q_alpha = MU_POWERS[solver.strategy]
    fixed_eta = kappa ** (-solver.tau / 2) * mu**q_eta * solver.s
    alpha = kappa ** (-1.5 * solver.tau) * mu**q_alpha * solver.s

    def phi(x_, y_):
        return mu * smooth_upper(x_, y_, upper) + (1 - mu) * smooth_lower(x_, y_, lower)

    grad_y_phi = jax.grad(phi, argnums=1)
    new_y = y - solver.s * grad_y_phi(x, y)
    at = new_y if solver.sequential else y
    hessian = jax.hessian(phi, argnums=1)(x, at)
    cross = jax.jacobian(grad_y_phi, argnums=0)(x, at)
    grad_x_f, grad_y_f = jax.grad(smooth_upper, argnums=(0, 1))(x, at, upper)
    r = hessian @ v - grad_y_f
    if solver.v_step == "fixed":
        eta = fixed_eta
    else:
        eta = jnp.clip(r @ r / (r @ hessian @ r), 0.0, solver.eta_max)
    new_v = v - eta * r
    w = new_v if solver.sequential else v
    direction = grad_x_f - cross.T @ w
    new_x = _clip_x(x - alpha * direction)
    averaged = jnp.linalg.norm(grad_y_phi(x, at))
    multiplier = jnp.linalg.norm(hessian @ w - grad_y_f)
    # Metric contract: the hypergradient estimate as a gradient mapping (X is a box),
    # and ||grad_y g|| at the lower iterate the x step reads.
    mapping = jnp.linalg.norm((x - new_x) / alpha)
    lower_residual = jnp.linalg.norm(jax.grad(smooth_lower, argnums=1)(x, at, lower))
    metrics = {
        "mu": mu,
        "eta": eta,
        "alpha": alpha,
        "upper_loss": smooth_upper(x, at, upper),
        "grad_norm": mapping,
        "lower_residual": lower_residual,
        "kkt_residual": averaged + multiplier + mapping,
    }
    return new_x, new_y, new_v, metrics


@pytest.mark.parametrize(
    "options, dtype",
    [
        ({}, jnp.float64),
        ({}, jnp.float32),
        ({"sequential": True}, jnp.float64),
        ({"v_step": "fixed", "strategy": "s2"}, jnp.float64),
        ({"strategy": "s1", "sequential": True, "v_step": "fixed"}, jnp.float32),
    ],
)
def test_step_matches_dense_reference(options, dtype):
    # Upper and lower levels get different data (FullBatch(upper=, lower=)); the box
    # X = [-0.5, 0.5]^3 is active at x0. Same maths as the solver but with dense
    # jax.hessian/jax.jacobian matrices in float64: round-off only, rtol 1e-10 in
    # float64; float32 inputs stay float32 in the solver, whose few dozen roundings
    # (eps 6e-8) through products with a Hessian of condition ~10 give rtol 1e-4.
    upper, lower = jax.tree.map(lambda u: u.astype(dtype), _smooth_data())
    problem = bl.BilevelProblem(smooth_upper, smooth_lower, project_x=_clip_x)
    base = dict(
        mu0=0.8,
        p=3.0,
        tau=0.2,
        s=0.3,
        x_lr="strategy",
        upper_weight=1.0,
        eta_max=100.0,
        sequential=False,
    )
    solver = bl.solvers.SLBAMM(**{**base, **options})
    x = jnp.array([0.5, -0.2, -0.5], dtype)
    y = jnp.array([0.5, -0.2, 0.9, -1.3], dtype)
    v = jnp.array([0.3, 0.1, -0.4, 0.2], dtype)
    state = solver.init(problem, x, y, jr.PRNGKey(0))
    state = eqx.tree_at(lambda s: (s.v, s.step), state, (v, jnp.array(5)))
    data = bl.FullBatch(upper=upper, lower=lower)
    new_state, metrics = eqx.filter_jit(solver.step)(
        problem, state, data, jr.PRNGKey(1)
    )
    wide = jax.tree.map(lambda u: u.astype(jnp.float64), (x, y, v, upper, lower))
    reference = eqx.filter_jit(reference_step)
    new_x, new_y, new_v, expected = reference(*wide[:3], 5, *wide[3:], solver)
    tol = dict(rtol=1e-10, atol=1e-14) if dtype == jnp.float64 else dict(rtol=1e-4)
    assert new_state.x.dtype == new_state.y.dtype == metrics["grad_norm"].dtype == dtype
    np.testing.assert_allclose(new_state.x, new_x, **tol)
    np.testing.assert_allclose(new_state.y, new_y, **tol)
    np.testing.assert_allclose(new_state.v, new_v, **tol)
    assert int(new_state.step) == 6
    for name, value in expected.items():
        np.testing.assert_allclose(metrics[name], value, rtol=tol["rtol"], err_msg=name)


@pytest.mark.parametrize(
    "lower_curvature, expected_eta",
    [
        (3.0, 0.5),  # H = 0.5 + 0.5 * 3 = 2 I: exact line search 1/2
        (-1.0 + 2e-6, 100.0),  # H = 1e-6 I: 1/H = 1e6 clipped to eta_max = 100
        (-3.0, 0.0),  # H = -I: non-positive curvature, no v step
    ],
)
def test_line_search_clipped(lower_curvature, expected_eta):
    # F = 1/2 ||y - 1||^2, f = c/2 ||y||^2 - x^T y, mu_0 = 1/2 at k = 0:
    # H = (1 + c)/2 I, so the line-searched step is clip(2 / (1 + c), 0, eta_max), and
    # from v = 0: v_1 = eta * grad_y F = eta * (y0 - 1). Closed form: rtol 1e-10.
    problem = bl.BilevelProblem(
        lambda x, y, b: 0.5 * jnp.sum((y - 1.0) ** 2),
        lambda x, y, b: 0.5 * lower_curvature * y @ y - x @ y,
    )
    solver = bl.solvers.SLBAMM(
        mu0=0.5, s=0.1, upper_weight=1.0, eta_max=100.0, sequential=False
    )
    y0 = jnp.array([2.0, -1.0, 0.5])
    state = solver.init(problem, jnp.zeros(3), y0, jr.PRNGKey(0))
    state, metrics = eqx.filter_jit(solver.step)(problem, state, None, jr.PRNGKey(1))
    np.testing.assert_allclose(metrics["eta"], expected_eta, rtol=1e-10)
    np.testing.assert_allclose(state.v, expected_eta * (y0 - 1.0), rtol=1e-10)


# --- bad input ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, match",
    [
        ({"strategy": "s4"}, "strategy"),
        ({"v_step": "cg"}, "v_step"),
        ({"sequential": 1}, "sequential"),
        ({"s": 0.0}, "`s`"),
        ({"mu0": 1.0}, "mu0"),
        ({"mu0": -0.1}, "mu0"),
        ({"p": 0.0}, "`p`"),
        ({"tau": -1.0}, "tau"),
        ({"eta_max": 0.0}, "eta_max"),
        ({"x_lr": -1.0}, "x_lr"),
        ({"x_lr": "fast"}, "x_lr"),
        ({"upper_weight": 0.0}, "upper_weight"),
        ({"mu0": 0.0, "x_lr": "strategy"}, "x_lr"),
        (
            {"mu0": 0.0, "x_lr": 0.1, "v_step": "fixed", "strategy": "s1"},
            "fixed v step",
        ),
    ],
)
def test_bad_configuration(options, match):
    with pytest.raises(ValueError, match=match):
        bl.solvers.SLBAMM(**options)


def test_bad_problem():
    solver = bl.solvers.SLBAMM()
    x0, y0 = jnp.zeros(2), jnp.zeros(2)
    constrained = bl.BilevelProblem(toy_upper, toy_lower, project_y=lambda y: y)
    with pytest.raises(ValueError, match="project_y"):
        solver.init(constrained, x0, y0, jr.PRNGKey(0))
    multi = bl.MultiBlockProblem(toy_upper, toy_lower, num_blocks=2)
    with pytest.raises(TypeError, match="BilevelProblem"):
        solver.init(multi, x0, jnp.zeros((2, 2)), jr.PRNGKey(0))
    with pytest.raises(TypeError, match="floating-point"):
        solver.init(TOY, x0, jnp.zeros(2, jnp.int32), jr.PRNGKey(0))


# --- the refactoring changed nothing (issue 20) ---------------------------------------
@pytest.mark.parametrize(
    "case", [c for c in lbo_histories.CASES if c.startswith("slbamm")]
)
def test_reproduces_recorded_trajectory(case):
    # Trajectories recorded before the refactoring, every hyperparameter explicit.
    lbo_histories.assert_reproduces(case)


# --- the scale battery (issue 14) -----------------------------------------------------
def test_scale_battery_defaults():
    # quadratic(lower_condition=20, lower_scale=s, upper_scale=t), six pairs (s, t) from
    # {0.02, 1, 50}^2 with the four extremes, 2000 steps of the defaults: finite, steady
    # progress, the same at every scale; last gap < 1e-3 (measured 3.5e-4 at every
    # scale).
    scale_battery.check_scaled_problem()
    gaps, finite = scale_battery.relative_gaps(bl.solvers.SLBAMM())
    scale_battery.assert_steady_progress(gaps, finite, final=1e-3)


def test_x_step_follows_the_tracked_lower_curvature():
    # f = e^{x} |y|^2 / 2 - sum(y), F = |y - 0.2|^2 / 2 (y in R^3): every Hessian in y
    # is a multiple of the identity, so at step 0 L = m for F and f (condition 1) and
    # the tracked curvature of phi_mu is exactly mu_k + (1 - mu_k) e^{x}. F pulls
    # y* = e^{-x} down to 0.2, so x grows and so does the lower curvature. The derived
    # lower step is 1 / max(bound_k, tracked) and the x step 1 / (2 kappa_k L_Phi)
    # with kappa_k = max(bound_k, tracked) / m_k, m_k = mu_k + (1 - mu_k) = 1: their
    # ratio alpha_k / s_k = 1 / (2 L_Phi) stays what it was at step 0 while s_k falls
    # (with kappa_k from the step-0 spectra only, alpha_k stayed put: rtol 1e-10, the
    # rounding of a few float64 products).
    problem = weight_decay_problem(0.2)
    x0, y0 = jnp.zeros(1, jnp.float64), jnp.ones(3, jnp.float64)
    _, history = bl.run(problem, bl.solvers.SLBAMM(), x0, y0, None, 60)
    lower_step, alpha = np.asarray(history["lower_step"]), np.asarray(history["alpha"])
    assert lower_step[-1] < 0.8 * lower_step[0]  # the lower curvature has grown
    np.testing.assert_allclose(alpha / lower_step, alpha[0] / lower_step[0], rtol=1e-10)
