"""The jaxopt migration page runs: every Python block of docs/coming-from-jaxopt.md is
executed in order, the jaxopt blocks too (jaxopt is a test dependency), and each ported
example agrees with the jaxopt code it replaces."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest


PAGE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "coming-from-jaxopt.md"
BLOCK = re.compile(r"^```python([^\n]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks():
    return [(title.strip(), code) for title, code in BLOCK.findall(PAGE.read_text())]


@pytest.fixture(scope="module")
def namespace():
    pytest.importorskip("jaxopt")  # a test dependency (pyproject `test` extra)
    ns: dict = {}
    # The page runs with JAX's default promotion rules (this suite's strict dtype and
    # rank promotion are not the default, and jaxopt/optax mix dtypes internally).
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        for title, code in blocks():
            exec(compile(code, f"{PAGE.name} [{title or 'python'}]", "exec"), ns)
    return ns


def test_page_has_jaxopt_and_bilevel_versions_of_the_examples():
    titles = [title for title, _ in blocks()]
    assert titles.count('title="jaxopt"') == titles.count('title="bilevel"') == 5


@pytest.mark.parametrize(
    "theirs, ours, tol",
    [
        # Both solve the same systems to 1e-12: agreement to rounding (cond ~ 1e1-1e2).
        ("ridge_jaxopt", "ridge_bilevel", 1e-9),
        ("ridge_bilevel", "ridge_forward", 1e-12),
        ("ridge_bilevel", "ridge_argmin", 1e-8),
        ("lasso_jaxopt", "lasso_bilevel", 1e-7),
        ("lasso_bilevel", "lasso_adapted", 1e-9),
        ("simplex_jaxopt", "simplex_bilevel", 1e-7),
        ("qp_jaxopt", "qp_bilevel", 1e-9),
        # LBFGS to 1e-12 on both sides; the singular Hessian is solved in its range.
        ("logreg_jaxopt", "logreg_bilevel", 1e-6),
    ],
)
def test_ported_examples_agree_with_jaxopt(namespace, theirs, ours, tol):
    a, b = np.asarray(namespace[theirs]), np.asarray(namespace[ours])
    assert np.max(np.abs(a - b)) <= tol * max(1.0, np.max(np.abs(a)))
    assert np.max(np.abs(a)) > 1e-6  # not trivially zero


def test_the_other_examples_are_right(namespace):
    ns = namespace
    # multipliers recovered from the primal solution = the saddle-point solve's
    assert np.max(np.abs(ns["recovered"] - ns["qp"](ns["c0"])[1])) < 1e-10
    # the damped normal-CG derivative equals the exact one up to the ridge (1e-8)
    exact = jax.grad(
        lambda l2reg: jnp.sum(ns["ridge_solver"](l2reg, ns["X_tr"], ns["y_tr"]))
    )(1.0)
    assert abs(float(ns["normal_grad"]) - float(exact)) < 1e-6 * abs(float(exact))
    # the fixed point of a gradient step has the ridge solution's derivative
    assert abs(float(ns["fixed_grad"]) - float(exact)) < 1e-8 * abs(float(exact))
    # the learned radius: central differences of the validation loss
    ball, X_tr, y_tr, X_val, y_val = (
        ns[k] for k in ("ball", "X_tr", "y_tr", "X_val", "y_val")
    )
    loss = jax.jit(lambda r: 0.5 * jnp.mean((X_val @ ball(r, X_tr, y_tr) - y_val) ** 2))
    fd = (loss(0.1 + 1e-6) - loss(0.1 - 1e-6)) / 2e-6
    assert abs(float(ns["radius_grad"]) - float(fd)) < 1e-6
    assert ns["result"].status.value in ("max_steps", "converged")
