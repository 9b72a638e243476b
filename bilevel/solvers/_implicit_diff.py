"""Approximate implicit differentiation (AID): warm-started inner steps, an IFT
hypergradient through a warm-started matrix-free linear solve, an optax outer step."""

from typing import Any, ClassVar

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import lineax as lx
import optax
from jaxtyping import Array, Int, PyTree

from .._data import as_data
from .._implicit import hypergradient
from .._inner import default_optimizer, inner_steps, inner_steps_until
from .._misc import tree_norm
from .._problem import apply_project_x
from .._solver import AbstractBilevelSolver


class _ImplicitDiffState(eqx.Module):
    x: PyTree[Array]
    y: PyTree[Array]
    outer_state: Any
    inner_state: Any
    adjoint: PyTree[Array]
    step: Int[Array, ""]


class ImplicitDiff(AbstractBilevelSolver):
    r"""Approximate implicit differentiation (AID; Pedregosa 2016, "Hyperparameter
    optimization with approximate gradient"; Blondel et al. 2022).

    Each outer step $k$:

    1. $y \leftarrow$ `inner_steps` warm-started optimizer steps on $g(x_k, \cdot)$
       (projected onto $Y$ if the problem has `project_y`), or, with `inner_tol`, steps
       until $\|\Phi(x_k, y)\| \le$ `inner_tol` (at most `inner_steps`; deterministic
       data only);
    2. $\nabla F(x_k) = \nabla_x f - \partial_x\Phi^\top w$ with
       $\partial_y\Phi^\top w = \nabla_y f$, solved matrix-free and warm-started from the
       previous $w$ (see [`bilevel.hypergradient`][]);
    3. $x_{k+1} = P_X(x_k + \text{outer update})$.

    With minibatch data, each inner step draws a lower batch; the hypergradient uses one
    upper batch and an independent lower batch.

    **Arguments:**

    - `inner_steps`: inner iterations per outer step (default 20).
    - `inner_lr`: step of the default inner gradient descent (default 0.1).
    - `inner_optimizer`: any optax transformation (overrides `inner_lr`); its state is
      carried across outer steps.
    - `inner_tol`: optional residual tolerance for the inner loop.
    - `outer_lr`: step of the default outer gradient descent (default 0.1).
    - `outer_optimizer`: any optax transformation (overrides `outer_lr`).
    - `linear_solver`: lineax solver for the adjoint (default: CG for a symmetric PSD
      condition, GMRES otherwise).

    Metrics: `upper_loss` $f(x_k, y)$, `grad_norm` $\|\nabla F\|$, `lower_residual`
    $\|\Phi(x_k, y)\|$, `linear_residual`, `linear_steps`.
    """

    supports: ClassVar[frozenset[str]] = frozenset(
        {"single_block", "project_x", "project_y", "optimality", "stochastic"}
    )

    inner_steps: int = eqx.field(static=True, default=20)
    inner_lr: float = 0.1
    inner_optimizer: optax.GradientTransformation | None = None
    inner_tol: float | None = None
    outer_lr: float = 0.1
    outer_optimizer: optax.GradientTransformation | None = None
    linear_solver: lx.AbstractLinearSolver | None = None

    def __check_init__(self):
        if not isinstance(self.inner_steps, int) or self.inner_steps < 1:
            raise ValueError(f"ImplicitDiff: `inner_steps` must be an int >= 1, got {self.inner_steps!r}")
        if self.inner_tol is not None and not self.inner_tol > 0:
            raise ValueError("ImplicitDiff: `inner_tol` must be positive or None")

    def supported_features(self) -> frozenset[str]:
        if self.inner_tol is None:
            return self.supports
        return self.supports - {"stochastic"}

    def unsupported_reason(self, feature: str) -> str:
        if feature == "stochastic" and self.inner_tol is not None:
            return "`inner_tol` stops on the exact lower residual; drop it for minibatches"
        return ""

    def _inner(self):
        return default_optimizer(self.inner_optimizer, self.inner_lr)

    def _outer(self):
        return default_optimizer(self.outer_optimizer, self.outer_lr)

    def _init(self, problem, x0, y0, key):
        return _ImplicitDiffState(
            x=x0,
            y=y0,
            outer_state=self._outer().init(x0),
            inner_state=self._inner().init(y0),
            adjoint=jtu.tree_map(jnp.zeros_like, y0),
            step=jnp.array(0),
        )

    def _step(self, problem, state, data, key):
        data = as_data(data)
        inner_key, upper_key, lower_key = jr.split(key, 3)
        x = state.x
        if self.inner_tol is None:
            y, inner_state = inner_steps(
                problem, self._inner(), x, state.y, state.inner_state, data,
                inner_key, self.inner_steps, state.step * self.inner_steps,
            )
        else:
            y, inner_state = inner_steps_until(
                problem, self._inner(), x, state.y, state.inner_state,
                data.lower_batch(inner_key, state.step), self.inner_steps, self.inner_tol,
            )
        upper_batch = data.upper_batch(upper_key, state.step)
        lower_batch = data.lower_batch(lower_key, state.step, stream=1)
        grad, info = hypergradient(
            problem, x, y, upper_batch, self.linear_solver,
            lower_batch=lower_batch, warm_start=state.adjoint,
        )
        updates, outer_state = self._outer().update(grad, state.outer_state, x)
        new_x = apply_project_x(problem, optax.apply_updates(x, updates))
        metrics = {
            "upper_loss": problem.upper(x, y, upper_batch),
            "grad_norm": tree_norm(grad),
            "lower_residual": info.optimality_residual,
            "linear_residual": info.linear_residual,
            "linear_steps": info.linear_steps,
        }
        new_state = _ImplicitDiffState(
            new_x, y, outer_state, inner_state, info.adjoint, state.step + 1
        )
        return new_state, metrics

    def _params(self, state):
        return state.x, state.y
