"""The penalty family's histories are reproduced exactly by the current code.

`tests/data/penalty_histories.npz` holds the metrics of every step and the final state
of `Penalty` (double and single loop), `VPBGD` and `F2SA`, each with explicit
(non-default) values for every hyperparameter, on three small problems: a smooth
non-quadratic problem with deterministic data, the same problem with keyed minibatches,
and a box-constrained version (projections on x and y active). The file was written by
the code before the refactor of `bilevel/solvers/_penalty.py` into one base class with
three rules (`python tests/test_penalty_history.py` rewrites it); every later change
that is meant to leave the algorithms unchanged must reproduce it. It was rewritten
once on purpose, when Penalty's inner loops became accelerated on deterministic data
without a set Y: only `penalty_double_loop/deterministic` changed (the rewrite also
added the metrics `x_lr` and `inner_rounds`).

Everything the histories depend on is defined here (problems from fixed NumPy data, a
minibatch sampler, the step loop and its keys), so that changes elsewhere in the library
(the samplers of `bl.Minibatch`, `bl.run`'s key schedule) do not move them. The only
shared piece used is `bilevel/_inner.py`'s `inner_steps` (the value-function loop),
which must keep drawing the same batches.
"""

import pathlib
import sys

import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import pytest

import bilevel as bl


FIXTURE = pathlib.Path(__file__).parent / "data" / "penalty_histories.npz"
NUM_STEPS = 25
# Explicit values for every hyperparameter (none left at its default, so that changing
# a default cannot change these runs).
SOLVERS = {
    "penalty_double_loop": lambda: bl.solvers.Penalty(
        variant="double_loop",
        sigma=0.05,
        sigma_decay=0.5,
        sigma_min=0.02,
        x_lr=0.05,
        y_lr=0.25,
        z_lr=0.2,
        y_steps=3,
        z_steps=4,
        momentum=0.5,
        coupled_samples=False,
    ),
    "penalty_single_loop": lambda: bl.solvers.Penalty(
        variant="single_loop",
        sigma=0.1,
        sigma_decay=0.2,
        sigma_min=0.05,
        x_lr=0.1,
        y_lr=0.3,
        z_lr=0.3,
        y_steps=2,
        z_steps=2,
        momentum=0.3,
        coupled_samples=True,
    ),
    "vpbgd": lambda: bl.solvers.VPBGD(
        penalty=5.0,
        penalty_init=1.0,
        ramp_steps=10,
        x_lr=0.03,
        y_lr=0.05,
        z_lr=0.2,
        z_steps=3,
        scale_by_penalty=True,
        coupled_samples=False,
    ),
    "f2sa": lambda: bl.solvers.F2SA(
        penalty=2.0,
        penalty_growth=0.3,
        y_lr=0.05,
        y_lr_decay=0.4,
        z_lr=0.2,
        z_lr_decay=0.3,
        x_ratio=2.0,
        offset=2.0,
        y_steps=3,
        z_steps=2,
        coupled_samples=True,
    ),
}


# --------------------------------------------------------------------------------------
# Problems, data and the step loop (self-contained)


def _arrays():
    rng = np.random.RandomState(0)
    return {
        "lower_rows": rng.normal(size=(12, 5)),
        "upper_rows": rng.normal(size=(10, 5)),
        "upper_targets": rng.normal(size=(10,)),
        "coupling": rng.normal(size=(5, 3)) / np.sqrt(3),
        "x0": rng.normal(size=(3,)),
        "y0": rng.normal(size=(5,)),
    }


def _problem(constrained: bool) -> bl.BilevelProblem:
    """Lower: least squares + ||y||^2/2 + a bounded non-quadratic term (still
    strongly convex: the curvature of 0.1 log(1 + t^2) is >= -0.025); upper: least
    squares in y plus a ridge term in x. Both use their batches."""
    coupling = jnp.asarray(_arrays()["coupling"])

    def lower(x, y, rows):
        fit = 0.5 * jnp.mean((rows @ y) ** 2) + 0.5 * y @ y
        return fit + 0.1 * jnp.sum(jnp.log1p(y**2)) - y @ (coupling @ x)

    def upper(x, y, batch):
        rows, targets = batch
        return 0.5 * jnp.mean((rows @ y - targets) ** 2) + 0.05 * x @ x

    if not constrained:
        return bl.BilevelProblem(upper, lower)
    return bl.BilevelProblem(
        upper,
        lower,
        project_x=lambda x: jnp.clip(x, -0.5, 0.5),
        project_y=lambda y: jnp.clip(y, -0.3, 0.3),
    )


class _KeyedBatches(bl.AbstractData):
    """Minibatches of 4 rows drawn with replacement from `key`, `draw` and `stream`
    (a local sampler, so that changes to `bl.Minibatch` do not move the fixture)."""

    upper: tuple
    lower: jax.Array

    def _take(self, tree, key, draw, stream_id):
        num = jtu.tree_leaves(tree)[0].shape[0]
        key = jr.fold_in(jr.fold_in(key, draw), stream_id)
        index = jr.randint(key, (4,), 0, num)
        return jtu.tree_map(lambda u: u[index], tree)

    def upper_batch(self, key, draw, stream=0):
        return self._take(self.upper, key, draw, 2 * stream + 1)

    def lower_batch(self, key, draw, stream=0):
        return self._take(self.lower, key, draw, 2 * stream)


def _data(stochastic: bool):
    arrays = _arrays()
    upper = (jnp.asarray(arrays["upper_rows"]), jnp.asarray(arrays["upper_targets"]))
    lower = jnp.asarray(arrays["lower_rows"])
    if stochastic:
        return _KeyedBatches(upper, lower)
    return bl.FullBatch(upper=upper, lower=lower)


PROBLEMS = {
    "deterministic": (False, False),
    "minibatch": (False, True),
    "constrained": (True, False),
}


def run_case(solver_name: str, problem_name: str) -> dict[str, np.ndarray]:
    """Metrics of `NUM_STEPS` steps (step k uses key fold_in(PRNGKey(7), k)) and the
    final x, y, z."""
    constrained, stochastic = PROBLEMS[problem_name]
    solver, problem, data = (
        SOLVERS[solver_name](),
        _problem(constrained),
        _data(stochastic),
    )
    arrays = _arrays()
    x0, y0 = jnp.asarray(arrays["x0"]), jnp.asarray(arrays["y0"])

    @jax.jit
    def go():
        state = solver.init(problem, x0, y0, jr.PRNGKey(3))

        def body(state, k):
            return solver.step(problem, state, data, jr.fold_in(jr.PRNGKey(7), k))

        return lax.scan(body, state, jnp.arange(NUM_STEPS))

    state, history = go()
    out = {name: np.asarray(value) for name, value in history.items()}
    x, y = solver.params(state)
    out.update(x=np.asarray(x), y=np.asarray(y), z=np.asarray(state.z))
    return out


def _all_cases():
    return [(s, p) for s in SOLVERS for p in PROBLEMS]


# --------------------------------------------------------------------------------------
# The test


@pytest.fixture(scope="module")
def recorded():
    with np.load(FIXTURE) as stored:
        return dict(stored)


@pytest.mark.parametrize("solver_name, problem_name", _all_cases())
def test_history_is_reproduced(recorded, solver_name, problem_name):
    got = run_case(solver_name, problem_name)
    prefix = f"{solver_name}/{problem_name}/"
    names = [key[len(prefix) :] for key in recorded if key.startswith(prefix)]
    # Every recorded metric and the final iterates (a refactor may add metrics, not
    # drop or change them).
    assert {"upper_loss", "grad_norm", "lower_residual", "x", "y", "z"} <= set(names)
    for name in names:
        # float64, rtol 1e-12 (atol 1e-300 only so that exact zeros compare): the
        # operations are the same, but XLA may fuse or reassociate them differently
        # once the code is arranged differently (e.g. `a * b * c` vs `a * (b * c)` for
        # a step size times a schedule), which changes the last bits; over 25 steps of
        # contracting iterations that stays near 1e-15. Any algorithmic change (a
        # different batch, step size or schedule) moves these numbers by far more.
        # `penalty_gap` is g(x, y) - g(x, z), two values of order 1 that agree to
        # 1e-6: its rounding is absolute (an ulp of g, 1e-16), hence atol 1e-14.
        np.testing.assert_allclose(
            got[name],
            recorded[prefix + name],
            rtol=1e-12,
            atol=1e-14 if name == "penalty_gap" else 1e-300,
            err_msg=prefix + name,
        )


def write_fixture() -> None:
    """Record every case with the current code, in float64 (run
    `python tests/test_penalty_history.py` from the repository root)."""
    jax.config.update("jax_enable_x64", True)
    stored = {}
    for solver_name, problem_name in _all_cases():
        for name, value in run_case(solver_name, problem_name).items():
            stored[f"{solver_name}/{problem_name}/{name}"] = value
    FIXTURE.parent.mkdir(exist_ok=True)
    np.savez_compressed(FIXTURE, **stored)
    print(f"wrote {len(stored)} arrays to {FIXTURE}")


if __name__ == "__main__":
    sys.exit(write_fixture())
