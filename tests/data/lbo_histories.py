"""Recorded trajectories of SLBAMM, BOREP and LVHBA with explicit (non-default)
hyperparameters on small problems: the regression fixture of the refactoring of these
solvers (issue 20: "histories stay bit-identical before and after").

`lbo_histories.npz` was written by this module (`python -m tests.data.lbo_histories`,
float64) from the solvers as they were before the refactoring. The tests compare the
iterates after every step and the metrics whose meaning did not change.
"""

import pathlib

import jax
import jax.flatten_util
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import bilevel as bl


if __name__ == "__main__":  # before any array below is built
    jax.config.update("jax_enable_x64", True)

FIXTURE = pathlib.Path(__file__).with_name("lbo_histories.npz")
NUM_STEPS = 25


# --- problems -------------------------------------------------------------------------
def _smooth_upper(x, y, batch):
    return 0.5 * jnp.sum((y - batch["A"] @ x) ** 2) + 0.1 * jnp.sum(
        jnp.logaddexp(0.0, x * y[:3])
    )


def _smooth_lower(x, y, batch):
    quadratic = 0.5 * y @ (batch["Q"] @ y) - (batch["B"] @ x) @ y
    coupling = 0.1 * jnp.sum(jnp.logaddexp(0.0, x)) * (y @ y)
    return quadratic + coupling + 0.05 * jnp.sum(y**4)


def _smooth():
    """Non-quadratic, dims 3 / 4, separate upper and lower data, box X."""
    ka, kq, kb = jr.split(jr.PRNGKey(3), 3)
    m = jr.normal(kq, (4, 4))
    data = bl.FullBatch(
        upper={"A": jr.normal(ka, (4, 3))},
        lower={"Q": m @ m.T / 4 + jnp.eye(4), "B": jr.normal(kb, (4, 3))},
    )
    problem = bl.BilevelProblem(
        _smooth_upper, _smooth_lower, project_x=lambda x: jnp.clip(x, -0.5, 0.5)
    )
    x0 = jnp.array([0.5, -0.2, -0.5])
    y0 = jnp.array([0.5, -0.2, 0.9, -1.3])
    return problem, x0, y0, data


class _KeyedRows(bl.AbstractData):
    """Five distinct lower rows per draw, chosen from the key and the stream only (kept
    here, not `bl.Minibatch`, so that the fixture does not depend on the samplers)."""

    rows: jax.Array

    def upper_batch(self, key, draw, stream=0):
        return None

    def lower_batch(self, key, draw, stream=0):
        index = jr.choice(jr.fold_in(key, stream), self.rows.shape[0], (5,), False)
        return self.rows[index]


def _stochastic_quadratic():
    """The quadratic test problem with lower minibatches drawn from the key."""
    bench = bl.problems.quadratic(dim_x=3, dim_y=5, seed=1, num_samples=20)
    data = _KeyedRows(bench.data.lower)
    return bench.problem, bench.x0 + 0.3, bench.y0 - 0.2, data


_KEYS = jr.split(jr.PRNGKey(0), 3)
_Q, _ = jnp.linalg.qr(jr.normal(_KEYS[0], (4, 4)))
_A = _Q @ jnp.diag(jnp.linspace(1.0, 4.0, 4)) @ _Q.T
_B = jr.normal(_KEYS[1], (4, 3))
_C = jr.normal(_KEYS[2], (4,))


def _quartic_lower(x, y, batch):
    return 0.5 * y @ _A @ y + 0.125 * jnp.sum(y**4) - y @ (_B @ x)


def _quartic_upper(x, y, batch):
    return 0.5 * jnp.sum((y - _C) ** 2) + 0.25 * jnp.sum(x**4)


def _quartic(project_y=False):
    """BO-REP's unbounded-smoothness example; with `project_y` a box on y, whose
    projected-gradient condition is not symmetric (the VJP path)."""
    problem = bl.BilevelProblem(
        _quartic_upper,
        _quartic_lower,
        project_y=(lambda y: jnp.clip(y, -0.4, 0.4)) if project_y else None,
    )
    return problem, jnp.array([1.0, -0.5, 2.0]), jnp.array([0.3, 0.0, -0.2, 0.5]), None


def _coupled_toy(form):
    """The coupled-constraint toy of LV-HBA (n = 3), equality or inequality form."""
    n = 3
    sign = 1.0 if form == "equality" else -1.0

    def upper(x, y, batch):
        return 0.5 * jnp.sum((x - y[n:]) ** 2) + 0.5 * jnp.sum((y[:n] - 1) ** 2)

    def lower(x, y, batch):
        return 0.5 * y[:n] @ y[:n] - x @ y[:n] + jnp.sum(y[n:])

    def constraints(x, y):
        return (sign * (jnp.sum(x) + jnp.sum(y))).reshape(1)

    def project_feasible(x, y):
        total = jnp.sum(x) + jnp.sum(y)
        if form == "inequality":
            total = jnp.minimum(total, 0)
        shift = total / (3 * n)
        return x - shift, y - shift

    problem = bl.BilevelProblem(
        upper, lower, lower_constraints=constraints, project_feasible=project_feasible
    )
    x0 = jnp.array([0.5, -1.0, 0.2])
    y0 = jnp.array([-1.0, 0.3, -0.5, 0.1, -0.9, 0.4])
    return problem, x0, y0, None


def _moreau_box():
    """No coupled constraints (Moreau-envelope case of LV-HBA), boxes X and Y."""
    q = jnp.array([[2.0, 0.3, 0.0], [0.3, 1.5, -0.2], [0.0, -0.2, 1.0]])
    p_mat = jnp.array([[1.0, 0.5], [-0.4, 0.2], [0.3, -1.0]])
    target = jnp.array([0.5, -0.8, 0.2])
    problem = bl.BilevelProblem(
        lambda x, y, _: 0.5 * jnp.sum((y - target) ** 2) + 0.05 * x @ x,
        lambda x, y, _: 0.5 * y @ (q @ y) - y @ (p_mat @ x),
        project_x=lambda x: jnp.clip(x, -0.5, 0.5),
        project_y=lambda y: jnp.clip(y, -0.6, 0.6),
    )
    return problem, jnp.array([1.0, -2.0]), jnp.array([0.1, 0.9, -0.3]), None


# --- configurations: every hyperparameter explicit ------------------------------------
def _slbamm(**options):
    base = dict(
        s=0.3,
        mu0=0.8,
        p=3.0,
        tau=0.2,
        strategy="s3",
        v_step="line_search",
        sequential=False,
        eta_max=50.0,
        x_lr="strategy",  # before the refactoring: x_lr=None
        upper_weight=1.0,  # added since: the paper's averaging
    )
    return bl.solvers.SLBAMM(**{**base, **options})


def _borep(**options):
    base = dict(
        eta=0.1,
        beta=0.8,
        nu=0.2,
        inner_lr=0.1,
        period=3,
        inner_steps=2,
        refine_epochs=2,
        z_radius=None,
        refine_steps=3,
        refine_lr=0.2,
        eps=1e-10,
        order="lower_first",
        normalize=True,
        independent_batches=True,
    )
    return bl.solvers.BOREP(**{**base, **options})


def _lvhba(**options):
    base = dict(
        alpha=0.05,
        beta=0.03,
        eta=0.07,
        gamma1=2.0,
        gamma2=3.0,
        c0=0.5,
        p=0.4,
        r=2.0,
        multiplier_init=0.5,
        equality=False,
    )
    return bl.solvers.LVHBA(**{**base, **options})


CASES = {
    "slbamm_jacobi": (_smooth, lambda: _slbamm()),
    "slbamm_sequential_s2": (
        _smooth,
        lambda: _slbamm(strategy="s2", sequential=True, eta_max=0.5),
    ),
    "slbamm_fixed_s1_x_lr": (
        _stochastic_quadratic,
        lambda: _slbamm(strategy="s1", v_step="fixed", x_lr=0.05, s=0.2, mu0=0.5),
    ),
    "borep_paper": (_quartic, lambda: _borep()),
    "borep_options": (
        _quartic,
        lambda: _borep(
            period=2,
            inner_steps=3,
            refine_epochs=0,
            z_radius=0.05,
            order="hvp_first",
            independent_batches=False,
            normalize=False,
        ),
    ),
    "borep_projected": (lambda: _quartic(project_y=True), lambda: _borep(z_radius=2.0)),
    "borep_stochastic": (_stochastic_quadratic, lambda: _borep(period=2)),
    "lvhba_inequality": (lambda: _coupled_toy("inequality"), lambda: _lvhba()),
    "lvhba_equality": (
        lambda: _coupled_toy("equality"),
        lambda: _lvhba(equality=True, r=3.0),
    ),
    "lvhba_moreau_box": (_moreau_box, lambda: _lvhba(r=float("inf"))),
    "lvhba_stochastic": (_stochastic_quadratic, lambda: _lvhba(alpha=0.1, eta=0.2)),
}


def record(name: str) -> dict[str, np.ndarray]:
    """Run case `name` for `NUM_STEPS` steps: flat `x`, `y` after every step and every
    metric, stacked over the steps."""
    make_problem, make_solver = CASES[name]
    problem, x0, y0, data = make_problem()
    solver = make_solver()

    @jax.jit
    def trajectory(x0, y0):
        state = solver.init(problem, x0, y0, jr.PRNGKey(1))

        def body(state, key):
            state, metrics = solver.step(problem, state, data, key)
            x, y = solver.params(state)
            flat = {
                "x": jax.flatten_util.ravel_pytree(x)[0],
                "y": jax.flatten_util.ravel_pytree(y)[0],
            }
            return state, {**flat, **metrics}

        return jax.lax.scan(body, state, jr.split(jr.PRNGKey(2), NUM_STEPS))[1]

    return {k: np.asarray(v) for k, v in trajectory(x0, y0).items()}


def load(name: str) -> dict[str, np.ndarray]:
    """The recorded trajectory of case `name`."""
    with np.load(FIXTURE) as stored:
        prefix = name + "/"
        return {
            k[len(prefix) :]: stored[k] for k in stored.files if k.startswith(prefix)
        }


def assert_reproduces(name: str, metrics: tuple[str, ...] = ("upper_loss",)) -> None:
    """The solver today follows the recorded trajectory of case `name`: iterates and
    `metrics` after every step. Same float64 arithmetic up to the order of a few
    operations (e.g. a Hessian-vector product by reverse instead of forward mode), over
    25 steps of well-conditioned problems: rtol 1e-12 (atol 1e-13 for entries that
    pass through zero)."""
    got, want = record(name), load(name)
    for key in ("x", "y", *metrics):
        np.testing.assert_allclose(
            got[key], want[key], rtol=1e-12, atol=1e-13, err_msg=f"{name}: {key}"
        )


if __name__ == "__main__":
    arrays = {}
    for case in CASES:
        for key, value in record(case).items():
            arrays[f"{case}/{key}"] = value
    np.savez_compressed(FIXTURE, **arrays)
    print(f"wrote {len(CASES)} cases to {FIXTURE}")
