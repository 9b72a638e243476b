"""implicit_diff and hypergradient on the inputs that used to fail silently or crash:
Module conditions, per-task vmap, static and keyword arguments, failed linear solves
(one policy in both modes), NaN data, unconverged lower levels, equinox networks as
variables, indefinite and singular Hessians, ridge, relative tolerances, has_aux."""

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
import pytest

import bilevel as bl

from .helpers import relative_error


A = jr.normal(jr.PRNGKey(0), (12, 4))
B = jnp.linspace(-1.0, 1.0, 12)
X = jnp.array([0.1, -0.3, 0.5, 0.0])


def ridge_lower(x, y, a, b):
    return 0.5 * jnp.sum((a @ y - b) ** 2) + 0.5 * jnp.sum(jnp.exp(x) * y**2)


def ridge_closed(x, a=A, b=B, shift=0.0):
    return jnp.linalg.solve(
        a.T @ a + jnp.diag(jnp.exp(x)) + shift * jnp.eye(4), a.T @ b
    )


EXACT = 1e-10  # closed form vs IFT at an exact solution: rounding only (cond ~ 1e2)


class ShiftedCondition(eqx.Module):
    """Phi = grad_y g + shift * y, with `shift` an array field (our own style)."""

    shift: jax.Array

    def __call__(self, x, y, a, b):
        return jax.grad(ridge_lower, argnums=1)(x, y, a, b) + self.shift * y


def test_module_condition_holding_a_traced_array_gets_its_true_gradient():
    def loss(shift):
        condition = bl.OptimalityCondition(ShiftedCondition(shift), symmetric=True)

        @bl.implicit_diff(condition)
        def solve(x, a, b):
            return jax.lax.stop_gradient(ridge_closed(x, a, b, shift))

        return jnp.sum(solve(X, A, B) ** 2)

    shift = jnp.array(0.3)
    reference = jax.grad(lambda s: jnp.sum(ridge_closed(X, shift=s) ** 2))(shift)
    assert abs(float(reference)) > 1e-3  # a silent zero would fail
    assert abs(float(jax.grad(loss)(shift) - reference)) < EXACT


# Per-task meta-learning: y_t*(x) = argmin 0.5|A_t y - b_t|^2 + 0.5|y - x|^2, solved by
# 2000 gradient steps (contraction factor <= 1 - 0.02: error ~ e^-40 |y0 - y*|).
TASKS = (jnp.stack([A, 0.5 * A, 2.0 * A]), jnp.stack([B, 2 * B, -B]))
TASK_STEP = 1.0 / float(jnp.max(jnp.linalg.eigvalsh(4 * A.T @ A)) + 1)


def task_lower(x, y, task):
    a, b = task
    return 0.5 * jnp.sum((a @ y - b) ** 2) + 0.5 * jnp.sum((y - x) ** 2)


def task_closed(x, task):
    a, b = task
    return jnp.linalg.solve(a.T @ a + jnp.eye(4), a.T @ b + x)


@pytest.mark.parametrize(
    "solver",
    [
        lx.CG(rtol=1e-12, atol=1e-12),
        lx.LU(),
        lx.GMRES(rtol=1e-12, atol=1e-12),
        bl.Richardson(num_steps=3000, omega=TASK_STEP, rtol=1e-13, atol=1e-13),
    ],
    ids=["CG", "LU", "GMRES", "Richardson"],
)
def test_grad_of_vmap_over_tasks(solver):
    @bl.implicit_diff(bl.stationarity_condition(task_lower), linear_solver=solver)
    def solve(x, task):
        def step(_, y):
            return y - TASK_STEP * jax.grad(task_lower, 1)(x, y, task)

        return jax.lax.fori_loop(0, 2000, step, x)

    def meta_loss(solution):
        return lambda x: jnp.sum(jax.vmap(solution, in_axes=(None, 0))(x, TASKS) ** 2)

    got = jax.jit(jax.grad(meta_loss(solve)))(X)
    # Dense per-task reference: differentiate the closed-form solutions task by task.
    reference = sum(
        jax.grad(lambda x, t=t: jnp.sum(task_closed(x, t) ** 2))(X) for t in zip(*TASKS)
    )
    assert relative_error(got, reference) < 1e-8  # tolerances 1e-12, cond <= ~1e2


def test_keyword_and_python_int_arguments():
    def lower(x, y, a, b, num_steps):
        return ridge_lower(x, y, a, b)

    @bl.implicit_diff(bl.stationarity_condition(lower))
    def solve(x, a, b, num_steps):
        assert isinstance(num_steps, int)  # static, not traced
        return jax.lax.stop_gradient(ridge_closed(x, a, b))

    reference = jax.grad(lambda x: jnp.sum(ridge_closed(x) ** 2))(X)
    positional = jax.grad(lambda x: jnp.sum(solve(x, A, B, 50) ** 2))(X)
    keywords = jax.grad(lambda x: jnp.sum(solve(x, a=A, b=B, num_steps=50) ** 2))(X)
    assert relative_error(positional, reference) < EXACT
    assert relative_error(keywords, reference) < EXACT
    # keyword data arguments are differentiable too
    grad_b = jax.grad(lambda b: jnp.sum(solve(X, A, b=b, num_steps=5)))(B)
    assert (
        relative_error(grad_b, jax.grad(lambda b: jnp.sum(ridge_closed(X, b=b)))(B))
        < EXACT
    )


def test_has_aux():
    @bl.implicit_diff(bl.stationarity_condition(ridge_lower), has_aux=True)
    def solve(x, a, b):
        y = jax.lax.stop_gradient(ridge_closed(x, a, b))
        return y, {"steps": 7, "loss": ridge_lower(x, y, a, b)}

    y, aux = solve(X, A, B)
    assert aux["steps"] == 7 and aux["loss"].shape == ()
    grad = jax.grad(lambda x: jnp.sum(solve(x, A, B)[0] ** 2))(X)
    assert (
        relative_error(grad, jax.grad(lambda x: jnp.sum(ridge_closed(x) ** 2))(X))
        < EXACT
    )

    @bl.implicit_diff(bl.stationarity_condition(ridge_lower))
    def forgot_has_aux(x, a, b):
        return solve(x, a, b)

    with pytest.raises(Exception, match="has_aux=True"):
        forgot_has_aux(X, A, B)


# --------------------------------------------------------------------------------------
# One failure behaviour in forward and reverse mode.


def _truncated(on_failure):
    solver = lx.CG(rtol=1e-14, atol=1e-14, max_steps=1)

    condition = bl.stationarity_condition(lambda x, y: ridge_lower(x, y, A, B))

    @bl.implicit_diff(condition, solver, on_failure=on_failure)
    def solve(x):
        return jax.lax.stop_gradient(ridge_closed(x))

    def forward():
        return jax.jvp(solve, (X,), (jnp.ones(4),))[1]

    def reverse():
        return jax.grad(lambda x: jnp.sum(solve(x)))(X)

    return forward, reverse


def test_failed_linear_solve_warns_in_both_modes_by_default():
    exact = jax.jvp(ridge_closed, (X,), (jnp.ones(4),))[1]
    for mode in _truncated("warn"):
        with pytest.warns(RuntimeWarning, match="linear solve"):
            value = jax.block_until_ready(mode())
        assert bool(jnp.all(jnp.isfinite(value)))  # the truncated derivative, no crash
    truncated_forward = _truncated("ignore")[0]()
    assert relative_error(truncated_forward, exact) > 1e-3  # one CG step is not exact


@pytest.mark.filterwarnings("error")
def test_failed_linear_solve_nan_and_ignore_policies_in_both_modes():
    for mode in _truncated("nan"):
        assert bool(jnp.all(jnp.isnan(mode())))
    for mode in _truncated("ignore"):  # no warning (warnings are errors here)
        assert bool(jnp.all(jnp.isfinite(mode())))


def test_failed_linear_solve_raise_policy_in_both_modes():
    for mode in _truncated("raise"):
        with pytest.raises(Exception, match="linear solve of the implicit function"):
            jax.block_until_ready(mode())


def test_on_failure_is_validated():
    with pytest.raises(ValueError, match="on_failure"):
        bl.implicit_diff(bl.stationarity_condition(ridge_lower), on_failure="crash")


# --------------------------------------------------------------------------------------
# bl.hypergradient: status and diagnostics.


def _quadratic():
    return bl.problems.quadratic(dim_x=3, dim_y=6, seed=1)


X3 = jnp.array([0.5, -1.0, 2.0])


def test_hypergradient_status_ok_and_upper_loss():
    bench = _quadratic()
    y = bench.lower_solution(X3)
    _, info = bl.hypergradient(bench.problem, X3, y, bench.data.lower)
    assert int(info.status) == 0
    assert bl.HypergradientStatus(int(info.status)) == bl.HypergradientStatus.ok
    assert (
        abs(
            float(info.upper_loss) - float(bench.problem.upper(X3, y, bench.data.lower))
        )
        < 1e-12
    )


def test_hypergradient_flags_an_unconverged_lower_level():
    bench = _quadratic()
    y_bad = bench.lower_solution(X3) + 0.1
    _, info = bl.hypergradient(bench.problem, X3, y_bad, bench.data.lower)
    flags = bl.HypergradientStatus(int(info.status))
    assert bl.HypergradientStatus.lower_not_converged in flags
    _, info = bl.hypergradient(
        bench.problem, X3, y_bad, bench.data.lower, lower_tol=10.0
    )
    assert int(info.status) == 0


def test_hypergradient_reports_nan_in_the_lower_data():
    bench = _quadratic()
    data = bench.data.lower.at[0, 0].set(jnp.nan)
    grad, info = bl.hypergradient(bench.problem, X3, bench.lower_solution(X3), data)
    assert bl.HypergradientStatus.nonfinite in bl.HypergradientStatus(int(info.status))
    assert not bool(info.linear_converged)


def test_hypergradient_reports_a_diverging_neumann_series():
    bench = _quadratic()
    rows = bench.data.lower
    lipschitz = float(
        jnp.max(jnp.linalg.eigvalsh(rows.T @ rows / rows.shape[0] + jnp.eye(6)))
    )
    solver = bl.Richardson(num_steps=80, omega=3.0 / lipschitz)  # omega > 2/L: diverges
    _, info = bl.hypergradient(
        bench.problem, X3, bench.lower_solution(X3), rows, solver
    )
    assert int(info.status) != 0
    assert not bool(info.linear_converged)


def test_ridge_damps_the_adjoint_system():
    bench = _quadratic()
    rows, y = bench.data.lower, bench.lower_solution(X3)
    rho = 0.5
    grad, info = bl.hypergradient(bench.problem, X3, y, rows, ridge=rho)
    # Dense reference: grad_x f - d_x Phi^T (H + rho I)^{-1} grad_y f.
    condition = bench.problem.condition
    hessian = jax.jacfwd(condition, argnums=1)(X3, y, rows)
    cross = jax.jacfwd(condition, argnums=0)(X3, y, rows)
    gx, gy = jax.grad(bench.problem.upper, argnums=(0, 1))(X3, y, None)
    reference = gx - cross.T @ jnp.linalg.solve(hessian.T + rho * jnp.eye(6), gy)
    assert relative_error(grad, reference) < 1e-9
    assert float(info.linear_residual) < 1e-8


def test_ridge_in_implicit_diff_forward_and_reverse():
    rho = 0.3

    @bl.implicit_diff(
        bl.stationarity_condition(lambda x, y: ridge_lower(x, y, A, B)), ridge=rho
    )
    def solve(x):
        return jax.lax.stop_gradient(ridge_closed(x))

    # Damped IFT: -(H + rho I)^{-1} d_x Phi at the exact solution.
    y = ridge_closed(X)
    hessian = A.T @ A + jnp.diag(jnp.exp(X))
    reference = -jnp.linalg.solve(hessian + rho * jnp.eye(4), jnp.diag(jnp.exp(X) * y))
    assert np.max(np.abs(jax.jacfwd(solve)(X) - reference)) < EXACT
    assert np.max(np.abs(jax.jacrev(solve)(X) - reference)) < EXACT


def test_small_derivatives_are_solved_to_relative_accuracy():
    # |dy/dlam| ~ 1e-7: an absolute tolerance of 1e-10 would leave a 1e-3 relative
    # error; both default solvers (MINRES for the symmetric condition, GMRES for the
    # projected fixed point) use relative tolerances 1e-10.
    a, b = A * 1e-4, B * 1e-4

    def lower(lam, y):
        return 0.5 * jnp.sum((a @ y - b) ** 2) + 0.5 * lam * jnp.sum(y**2)

    def closed(lam):
        return jnp.linalg.solve(a.T @ a + lam * jnp.eye(4), a.T @ b)

    lam = jnp.array(1.0)
    reference = jax.jacfwd(closed)(lam)
    assert 1e-9 < float(jnp.max(jnp.abs(reference))) < 1e-6

    def box(y):  # inactive: same solution and derivative
        return jnp.clip(y, -1.0, 1.0)

    for condition in (
        bl.stationarity_condition(lower),
        bl.projected_gradient_condition(lower, box),
    ):
        solve = bl.implicit_diff(condition)(
            lambda lam: jax.lax.stop_gradient(closed(lam))
        )
        assert relative_error(jax.jacfwd(solve)(lam), reference) < 1e-7
        assert relative_error(jax.jacrev(solve)(lam), reference) < 1e-7


# --------------------------------------------------------------------------------------
# Equinox networks as variables; non-convex and singular lower levels.


def _dense_ift_hypergradient(problem, x, y, batch):
    """grad_x f - d_x Phi^T H^{-1} grad_y f on the flattened floating leaves
    (float64)."""
    x_params, x_rest = eqx.partition(x, eqx.is_inexact_array)
    y_params, y_rest = eqx.partition(y, eqx.is_inexact_array)
    x_flat, unravel_x = jax.flatten_util.ravel_pytree(x_params)
    y_flat, unravel_y = jax.flatten_util.ravel_pytree(y_params)

    def f(xv, yv):
        return problem.upper(
            eqx.combine(unravel_x(xv), x_rest),
            eqx.combine(unravel_y(yv), y_rest),
            batch,
        )

    def g(xv, yv):
        return problem.lower(
            eqx.combine(unravel_x(xv), x_rest),
            eqx.combine(unravel_y(yv), y_rest),
            batch,
        )

    hessian = jax.hessian(g, argnums=1)(x_flat, y_flat)
    cross = jax.jacfwd(jax.grad(g, argnums=1), argnums=0)(x_flat, y_flat)
    gx, gy = jax.grad(f, argnums=(0, 1))(x_flat, y_flat)
    return gx - cross.T @ jnp.linalg.solve(hessian, gy), hessian


INPUTS = jr.normal(jr.PRNGKey(3), (16, 3))
TARGETS = jnp.sin(INPUTS.sum(axis=1, keepdims=True))


def _mlp_problem():
    def lower(log_decay, net, batch):
        inputs, targets = batch
        fit = jnp.mean((jax.vmap(net)(inputs) - targets) ** 2)
        leaves = jax.tree.leaves(eqx.filter(net, eqx.is_inexact_array))
        return fit + 0.5 * jnp.exp(log_decay) * sum(jnp.sum(u**2) for u in leaves)

    def upper(log_decay, net, batch):
        inputs, targets = batch
        return jnp.mean((jax.vmap(net)(inputs + 0.1) - targets) ** 2)

    return bl.BilevelProblem(upper, lower)


def test_hypergradient_with_an_mlp_lower_variable_and_an_indefinite_hessian():
    # An eqx.nn.MLP (activation-function fields) after a few gradient steps: the Hessian
    # is indefinite, CG breaks, the default solver (MINRES) matches the dense IFT.
    problem = _mlp_problem()
    net = eqx.nn.MLP(3, 1, 8, 1, activation=jnp.tanh, key=jr.PRNGKey(4))
    x = jnp.array(-3.0)
    for _ in range(5):
        grads = eqx.filter_grad(lambda n: problem.lower(x, n, (INPUTS, TARGETS)))(net)
        net = eqx.apply_updates(net, jax.tree.map(lambda g: -0.1 * g, grads))
    reference, hessian = _dense_ift_hypergradient(problem, x, net, (INPUTS, TARGETS))
    assert float(jnp.min(jnp.linalg.eigvalsh(hessian))) < 0  # genuinely indefinite
    grad, info = bl.hypergradient(problem, x, net, (INPUTS, TARGETS), lower_tol=10.0)
    assert int(info.status) == 0
    assert relative_error(grad, reference) < 1e-6  # cond(H) ~ 1e3, rtol 1e-10
    # the adjoint has the structure of the network's floating leaves (filter_grad)
    assert jax.tree.structure(info.adjoint) == jax.tree.structure(
        eqx.filter(net, eqx.is_inexact_array)
    )


class Features(eqx.Module):
    """An upper variable with static fields: a conv feature map and a tag."""

    conv: eqx.nn.Conv1d
    scale: jax.Array
    name: str = eqx.field(static=True)

    def __call__(self, inputs):
        out = self.conv(inputs[None, :])  # (channels, length)
        return jnp.tanh(self.scale * out).reshape(-1)


def _features_problem():
    # y*(x) = ridge regression on the features of a conv net x (closed form).
    def lower(x, y, batch):
        inputs, targets = batch
        phi = jax.vmap(x)(inputs)
        return 0.5 * jnp.mean((phi @ y - targets[:, 0]) ** 2) + 0.05 * jnp.sum(y**2)

    def upper(x, y, batch):
        inputs, targets = batch
        phi = jax.vmap(x)(inputs * 0.5)
        return 0.5 * jnp.mean((phi @ y - targets[:, 0]) ** 2)

    return bl.BilevelProblem(upper, lower)


def test_hypergradient_with_a_conv_net_upper_variable_with_static_fields():
    problem = _features_problem()
    x = Features(eqx.nn.Conv1d(1, 2, 2, key=jr.PRNGKey(6)), jnp.array(1.0), "feat")
    phi = jax.vmap(x)(INPUTS)
    n = INPUTS.shape[0]
    y = jnp.linalg.solve(
        phi.T @ phi / n + 0.1 * jnp.eye(phi.shape[1]), phi.T @ TARGETS[:, 0] / n
    )
    grad, info = bl.hypergradient(problem, x, y, (INPUTS, TARGETS))
    reference, _ = _dense_ift_hypergradient(problem, x, y, (INPUTS, TARGETS))
    flat = jax.flatten_util.ravel_pytree(eqx.filter(grad, eqx.is_inexact_array))[0]
    assert relative_error(flat, reference) < 1e-8
    assert grad.name == "feat" and grad.conv.weight.shape == x.conv.weight.shape
    assert int(info.status) == 0


def test_implicit_diff_returns_an_mlp_and_differentiates_its_floating_leaves():
    problem = _mlp_problem()
    template = eqx.nn.MLP(3, 1, 4, 1, activation=jax.nn.softplus, key=jr.PRNGKey(8))

    @bl.implicit_diff(bl.stationarity_condition(problem.lower))
    def solve(log_decay, batch):
        return template  # any point: the IFT is compared with the dense formula there

    def hyper(log_decay):
        return problem.upper(
            log_decay, solve(log_decay, (INPUTS, TARGETS)), (INPUTS, TARGETS)
        )

    x = jnp.array(-1.0)
    reference, _ = _dense_ift_hypergradient(problem, x, template, (INPUTS, TARGETS))
    assert (
        abs(float(jax.grad(hyper)(x)) - float(reference[0]))
        < 1e-8 * abs(float(reference[0])) + 1e-12
    )
    assert (
        abs(float(jax.jacfwd(hyper)(x)) - float(reference[0]))
        < 1e-8 * abs(float(reference[0])) + 1e-12
    )
    assert solve(x, (INPUTS, TARGETS)).activation is jax.nn.softplus


def test_singular_minibatch_hessian_gives_a_finite_flagged_hypergradient():
    # 64 samples, 100 unknowns, no regularisation: the Hessian has rank 64 and the
    # adjoint system no solution; CG diverged here (norm 1e10, then NaN).
    rows = jr.normal(jr.PRNGKey(9), (64, 100))
    targets = jr.normal(jr.PRNGKey(10), (64,))

    def lower(x, y, batch):
        rows, targets = batch
        return 0.5 * jnp.mean((rows @ y - targets - x) ** 2)

    def upper(x, y, batch):
        return 0.5 * jnp.sum((y - 1.0) ** 2)

    problem = bl.BilevelProblem(upper, lower)
    y = jnp.linalg.lstsq(rows, targets + 0.2)[0]
    grad, info = bl.hypergradient(problem, jnp.array(0.2), y, (rows, targets))
    assert bool(jnp.isfinite(grad))
    assert bl.HypergradientStatus.linear_singular in bl.HypergradientStatus(
        int(info.status)
    )
    # bounded: the fallback series is at most 20 * eta * |grad_y f| with eta = 1/L
    lipschitz = float(jnp.max(jnp.linalg.eigvalsh(rows.T @ rows / 64)))
    gy = jnp.linalg.norm(y - 1.0)
    assert float(jnp.linalg.norm(info.adjoint)) <= 20 / lipschitz * float(gy) * (
        1 + 1e-6
    )
