"""Iterative differentiation (ITD): reverse mode through K unrolled inner steps."""

from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import optax
from jaxtyping import Array, Int, PyTree

from .._data import as_data
from .._inner import default_optimizer
from .._misc import tree_norm
from .._problem import apply_project_x, apply_project_y
from .._solver import AbstractBilevelSolver


class _UnrolledState(eqx.Module):
    x: PyTree[Array]
    y: PyTree[Array]
    outer_state: Any
    step: Int[Array, ""]


class Unrolled(AbstractBilevelSolver):
    r"""Iterative differentiation (ITD; Maclaurin et al. 2015, Franceschi et al. 2017):
    the hypergradient is $\frac{d}{dx} f(x, y_K(x))$ where
    $y_{k+1} = P_Y(y_k + \text{inner update}(\nabla_y g(x, y_k)))$, differentiated in
    reverse mode through all $K$ steps.

    $y_0$ is the previous outer step's $y_K$ (warm start), treated as a constant. With
    `truncate=T` only the last $T$ steps are differentiated (truncated back-propagation,
    Shaban et al. 2019); `checkpoint=True` rematerialises each inner step in the
    backward pass (`jax.checkpoint`), trading compute for $O(1)$-per-step memory.

    **Arguments:**

    - `inner_steps`: $K$ (default 20).
    - `inner_lr` / `inner_optimizer`: the inner update (default gradient descent 0.1); the
      optimizer state starts afresh at every outer step, so it is part of the unrolled map.
    - `outer_lr` / `outer_optimizer`: the outer update (default gradient descent 0.1).
    - `truncate`: differentiate through the last `truncate` steps only (default: all).
    - `checkpoint`: rematerialise inner steps in the backward pass.

    Metrics: `upper_loss`, `grad_norm`, `lower_residual` $\|\Phi(x, y_K)\|$.
    """

    supports: ClassVar[frozenset[str]] = frozenset(
        {"single_block", "project_x", "project_y", "stochastic"}
    )

    inner_steps: int = eqx.field(static=True, default=20)
    inner_lr: float = 0.1
    inner_optimizer: optax.GradientTransformation | None = None
    outer_lr: float = 0.1
    outer_optimizer: optax.GradientTransformation | None = None
    truncate: int | None = eqx.field(static=True, default=None)
    checkpoint: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        if not isinstance(self.inner_steps, int) or self.inner_steps < 1:
            raise ValueError(f"Unrolled: `inner_steps` must be an int >= 1, got {self.inner_steps!r}")
        if self.truncate is not None and not 1 <= self.truncate <= self.inner_steps:
            raise ValueError(
                f"Unrolled: `truncate` must lie in [1, inner_steps={self.inner_steps}], "
                f"got {self.truncate!r}"
            )

    def _init(self, problem, x0, y0, key):
        outer = default_optimizer(self.outer_optimizer, self.outer_lr)
        return _UnrolledState(x0, y0, outer.init(x0), jnp.array(0))

    def unrolled_solution(self, problem, x, y0, data, key, first_draw) -> PyTree[Array]:
        """$y_K(x)$ from $y_0$: differentiable in `x` through the last `truncate` steps."""
        optimizer = default_optimizer(self.inner_optimizer, self.inner_lr)
        keys = jr.split(key, self.inner_steps)
        draws = first_draw + jnp.arange(self.inner_steps)

        def one_step(carry, key_and_draw):
            y, opt_state = carry
            batch = data.lower_batch(*key_and_draw)
            grad = jax.grad(problem.lower, argnums=1)(x, y, batch)
            updates, opt_state = optimizer.update(grad, opt_state, y)
            return (apply_project_y(problem, x, optax.apply_updates(y, updates)), opt_state), None

        if self.checkpoint:
            one_step = jax.checkpoint(one_step)
        carry = (y0, optimizer.init(y0))
        skip = self.inner_steps - (self.truncate or self.inner_steps)
        if skip:
            carry, _ = lax.scan(one_step, carry, (keys[:skip], draws[:skip]))
            carry = lax.stop_gradient(carry)
        carry, _ = lax.scan(one_step, carry, (keys[skip:], draws[skip:]))
        return carry[0]

    def _step(self, problem, state, data, key):
        data = as_data(data)
        inner_key, upper_key = jr.split(key)
        upper_batch = data.upper_batch(upper_key, state.step)
        first_draw = state.step * self.inner_steps

        def hyperobjective(x):
            y = self.unrolled_solution(problem, x, state.y, data, inner_key, first_draw)
            return problem.upper(x, y, upper_batch), y

        (loss, y), grad = jax.value_and_grad(hyperobjective, has_aux=True)(state.x)
        outer = default_optimizer(self.outer_optimizer, self.outer_lr)
        updates, outer_state = outer.update(grad, state.outer_state, state.x)
        new_x = apply_project_x(problem, optax.apply_updates(state.x, updates))
        lower_batch = data.lower_batch(inner_key, state.step, stream=1)
        metrics = {
            "upper_loss": loss,
            "grad_norm": tree_norm(grad),
            "lower_residual": tree_norm(problem.condition(state.x, y, lower_batch)),
        }
        return _UnrolledState(new_x, y, outer_state, state.step + 1), metrics

    def _params(self, state):
        return state.x, state.y
