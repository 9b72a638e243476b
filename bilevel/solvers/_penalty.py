r"""Value-function penalty methods: one shared core exposed as three solvers.

All three replace the bilevel problem by the penalised single-level problem

$$\min_{x \in X,\, y \in Y}\; f(x, y) + \lambda\,\big(g(x, y) - g^*(x)\big),\qquad
g^*(x) = \min_{z \in Y} g(x, z),$$

with $\lambda = 1/\sigma$, and track a second lower variable $z \approx \arg\min_Y
g(x, \cdot)$ for the value function. Since $\nabla g^*(x) = \nabla_x g(x, z^*)$, every
oracle is first order (no Hessian, no lower-level strong convexity):

- $d_x = \nabla_x f(x, y) + \lambda\,(\nabla_x g(x, y) - \nabla_x g(x, z))$,
- $d_y = \nabla_y f(x, y) + \lambda\,\nabla_y g(x, y)$,
- $d_z = \nabla_y g(x, z)$.

The solvers differ only in how they schedule $\lambda$ and the step sizes, how many
warm-started inner steps they take on $y$ and $z$ before the $x$ step (zero means a
joint step from the same oracles), and whether the directions carry a STORM-type
recursive momentum. The shared core is `_penalty_step`; [`bilevel.solvers.Penalty`][],
[`bilevel.solvers.VPBGD`][] and [`bilevel.solvers.F2SA`][] only map their fields to it.

Both $y$ and $z$ start at `y0` and are warm-started across outer steps. `params`
returns $(x, y)$: $y$, the minimiser of $f + \lambda g$, is the (optimistic) lower
solution estimate; $z$ is only a value-function witness, and when $S(x)$ is not a
singleton it may sit at any of its points.
"""

from typing import Any, ClassVar, Literal

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import optax
from jaxtyping import Array, Int, PRNGKeyArray, PyTree, Scalar

from .._data import AbstractData, as_data
from .._inner import inner_steps
from .._linear import result_dtype
from .._misc import tree_axpy, tree_norm, tree_sub
from .._problem import BilevelProblem, apply_project_x, apply_project_y
from .._solver import AbstractBilevelSolver


# --------------------------------------------------------------------------------------
# State and per-step scalars


class _Momentum(eqx.Module):
    """STORM buffers: the previous directions $(D^x, D^y, D^z)$ and the previous point
    $(x, y, z)$ at which they were estimated."""

    direction: tuple[PyTree[Array], PyTree[Array], PyTree[Array]]
    point: tuple[PyTree[Array], PyTree[Array], PyTree[Array]]


class _PenaltyState(eqx.Module):
    x: PyTree[Array]
    y: PyTree[Array]
    z: PyTree[Array]
    momentum: _Momentum | None
    step: Int[Array, ""]


class _Rule(eqx.Module):
    """The scalars of outer iteration $k$: penalty $\\lambda_k$, step sizes on the
    $\\lambda$-form directions above, and the STORM weight $\\eta_k$ (1: none)."""

    penalty: Scalar
    x_lr: Scalar
    y_lr: Scalar
    z_lr: Scalar
    momentum: Scalar


class _Oracles(eqx.Module):
    """Values and gradients of $f(x, y)$, $g(x, y)$ and $g(x, z)$."""

    f: Scalar
    f_x: PyTree[Array]
    f_y: PyTree[Array]
    g_y: Scalar
    g_y_x: PyTree[Array]
    g_y_y: PyTree[Array]
    g_z: Scalar
    g_z_x: PyTree[Array]
    g_z_y: PyTree[Array]


# --------------------------------------------------------------------------------------
# Small helpers



def _scalar(value: Any, dtype) -> Array:
    return jnp.asarray(value, dtype)


def _projected_residual(project, y: PyTree[Array], grad: PyTree[Array]) -> Scalar:
    r"""$\|y - \Pi_Y(y - \nabla)\|$: the projected-gradient residual (step 1);
    $\|\nabla\|$ without a projection (`project=None`)."""
    if project is None:
        return tree_norm(grad)
    return tree_norm(tree_sub(y, project(tree_sub(y, grad))))


def _check_number(owner: str, name: str, value: Any, *, low: float = 0.0,
                  strict: bool = True, high: float | None = None) -> None:
    """Validate a float field when it is a concrete Python number (tracers and arrays,
    e.g. under `jax.vmap` over a hyperparameter, are left alone)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    bad = value <= low if strict else value < low
    if high is not None:
        bad = bad or value > high
    if bad:
        bound = f"> {low}" if strict else f">= {low}"
        if high is not None:
            bound += f" and <= {high}"
        raise ValueError(f"{owner}: `{name}` must be {bound}, got {value!r}")


def _check_steps(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{owner}: `{name}` must be an int >= 0, got {value!r}")


# --------------------------------------------------------------------------------------
# The shared core


def _init_state(
    owner: str, problem: Any, x0: PyTree[Array], y0: PyTree[Array], storm: bool
) -> _PenaltyState:
    """Validate the problem and variables; $z_0 = y_0$."""
    momentum = None
    if storm:
        zeros = (
            jtu.tree_map(jnp.zeros_like, x0),
            jtu.tree_map(jnp.zeros_like, y0),
            jtu.tree_map(jnp.zeros_like, y0),
        )
        momentum = _Momentum(direction=zeros, point=(x0, y0, y0))
    return _PenaltyState(x=x0, y=y0, z=y0, momentum=momentum, step=jnp.array(0))


def _penalised_steps(problem, x, y, data, key, rule: _Rule, num_steps: int, step):
    r"""`num_steps` projected steps $y \leftarrow \Pi_Y(y - \beta(\nabla_y f +
    \lambda\nabla_y g))$, each on a fresh upper batch (stream 0) and lower batch
    (stream 1), independent of the value-function loop's."""

    def penalised(y_, upper_batch, lower_batch):
        lower = problem.lower(x, y_, lower_batch)
        lam = jnp.asarray(rule.penalty, jnp.result_type(lower))
        return problem.upper(x, y_, upper_batch) + lam * lower

    def body(t, y_):
        draw = step * num_steps + t
        sub = jr.fold_in(key, t)
        upper_batch = data.upper_batch(sub, draw, stream=0)
        lower_batch = data.lower_batch(sub, draw, stream=1)
        grad = jax.grad(penalised)(y_, upper_batch, lower_batch)
        return apply_project_y(problem, x, tree_axpy(-rule.y_lr, grad, y_))

    return lax.fori_loop(0, num_steps, body, y)


def _value_steps(problem, x, z, data, key, lr, num_steps: int, step):
    r"""`num_steps` projected gradient steps $z \leftarrow \Pi_Y(z - \gamma\nabla_y
    g(x, z))$ (the foundation's `inner_steps`, lower stream 0)."""
    optimizer = optax.sgd(jnp.asarray(lr, result_dtype(z)))
    first_draw = step * num_steps
    z, _ = inner_steps(
        problem, optimizer, x, z, optimizer.init(z), data, key, num_steps, first_draw
    )
    return z


def _oracle_batches(data: AbstractData, key, step, coupled: bool):
    """Upper batch (stream 1) and the lower batches for $g$ at $y$ (stream 2) and at $z$
    (stream 3, or the same as at $y$ when the samples are coupled)."""
    upper = data.upper_batch(key, step, stream=1)
    lower_y = data.lower_batch(key, step, stream=2)
    lower_z = lower_y if coupled else data.lower_batch(key, step, stream=3)
    return upper, lower_y, lower_z


def _oracles(problem, x, y, z, batches) -> _Oracles:
    upper_batch, lower_y, lower_z = batches
    value_and_grad = jax.value_and_grad
    f, (f_x, f_y) = value_and_grad(problem.upper, argnums=(0, 1))(x, y, upper_batch)
    g_y, (g_y_x, g_y_y) = value_and_grad(problem.lower, argnums=(0, 1))(x, y, lower_y)
    g_z, (g_z_x, g_z_y) = value_and_grad(problem.lower, argnums=(0, 1))(x, z, lower_z)
    return _Oracles(f, f_x, f_y, g_y, g_y_x, g_y_y, g_z, g_z_x, g_z_y)


def _directions(o: _Oracles, penalty: Scalar):
    """$(d_x, d_y, d_z)$ of the module docstring."""
    d_x = tree_axpy(penalty, tree_sub(o.g_y_x, o.g_z_x), o.f_x)
    d_y = tree_axpy(penalty, o.g_y_y, o.f_y)
    return d_x, d_y, o.g_z_y


def _storm(problem, state: _PenaltyState, batches, current, rule: _Rule, point):
    r"""STORM-type recursive estimate $D_k = d(p_k; \xi_k) + (1 - \eta)(D_{k-1} -
    d(p_{k-1}; \xi_k))$, the same sample $\xi_k$ at both points;
    $D_0 = d(p_0; \xi_0)$."""
    old_oracles = _oracles(problem, *state.momentum.point, batches)
    previous = _directions(old_oracles, rule.penalty)
    weight = jnp.where(state.step > 0, 1 - rule.momentum, jnp.zeros_like(rule.momentum))
    correction = [tree_sub(d, p) for d, p in zip(state.momentum.direction, previous)]
    directions = tuple(tree_axpy(weight, c, d) for c, d in zip(correction, current))
    return directions, _Momentum(direction=directions, point=point)


def _penalty_step(
    problem: Any,
    state: _PenaltyState,
    data: Any,
    key: PRNGKeyArray,
    rule: _Rule,
    *,
    y_steps: int,
    z_steps: int,
    coupled: bool,
) -> tuple[_PenaltyState, dict[str, Scalar]]:
    """One outer iteration of the value-function penalty family.

    1. `z_steps` warm-started projected steps on $g(x_k, \\cdot)$ (value function);
    2. `y_steps` warm-started projected steps on $f + \\lambda_k g$ (penalised
       variable);
    3. oracles at $(x_k, y, z)$; directions, STORM-corrected when the state holds
       momentum buffers;
    4. $x \\leftarrow \\Pi_X(x - \\alpha d_x)$, and the joint steps
       $y \\leftarrow \\Pi_Y(y - \\beta d_y)$ if `y_steps == 0`,
       $z \\leftarrow \\Pi_Y(z - \\gamma d_z)$ if `z_steps == 0`.
    """
    data = as_data(data)
    z_key, y_key, oracle_key = jr.split(key, 3)
    x = state.x
    z = _value_steps(problem, x, state.z, data, z_key, rule.z_lr, z_steps, state.step)
    y = _penalised_steps(problem, x, state.y, data, y_key, rule, y_steps, state.step)
    batches = _oracle_batches(data, oracle_key, state.step, coupled)
    oracles = _oracles(problem, x, y, z, batches)
    directions = _directions(oracles, rule.penalty)
    momentum = None
    if state.momentum is not None:
        directions, momentum = _storm(
            problem, state, batches, directions, rule, (x, y, z)
        )
    d_x, d_y, d_z = directions
    new_x = apply_project_x(problem, tree_axpy(-rule.x_lr, d_x, x))
    new_y = y if y_steps else apply_project_y(problem, x, tree_axpy(-rule.y_lr, d_y, y))
    new_z = z if z_steps else apply_project_y(problem, x, tree_axpy(-rule.z_lr, d_z, z))
    if problem.project_x is None:  # the gradient mapping is d_x itself
        grad_norm = tree_norm(d_x)
    else:
        grad_norm = tree_norm(tree_sub(x, new_x)) / rule.x_lr
    metrics = {
        "upper_loss": oracles.f,
        "grad_norm": grad_norm,
        "lower_residual": _projected_residual(problem.project_y, y, oracles.g_y_y),
        "value_residual": _projected_residual(problem.project_y, z, oracles.g_z_y),
        "penalty_gap": oracles.g_y - oracles.g_z,
        "lambda": rule.penalty,
    }
    new_state = _PenaltyState(new_x, new_y, new_z, momentum, state.step + 1)
    return new_state, metrics




# --------------------------------------------------------------------------------------
# Kwon, Kwon, Wright, Nowak (ICLR 2024)


class Penalty(AbstractBilevelSolver):
    r"""Value-function penalty method of Kwon, Kwon, Wright and Nowak (ICLR 2024, "On
    Penalty Methods for Nonconvex Bilevel Optimization and First-Order Stochastic
    Approximation").

    With $h_\sigma = \sigma f + g$, it minimises the penalised hyper-objective
    $\psi_\sigma(x) = \min_{y \in Y}\{f(x, y) + (g(x, y) - g^*(x))/\sigma\}$, whose
    gradient, for any $y_\sigma \in \arg\min_Y h_\sigma(x, \cdot)$ and
    $z^* \in \arg\min_Y g(x, \cdot)$, is
    $\nabla\psi_\sigma(x) = \nabla_x f(x, y_\sigma) + (\nabla_x g(x, y_\sigma) -
    \nabla_x g(x, z^*))/\sigma$ and is within $O(\sigma)$ of $\nabla\psi(x)$ under
    the proximal error bound. The lower level may be merely convex or non-convex, with
    $S(x)$ a set (optimistic convention).

    `variant="double_loop"` (P-DL), outer step $k$:

    1. $z \leftarrow \Pi_Y(z - \gamma\nabla_y g(x_k, z))$, `z_steps` times,
       warm-started;
    2. $y \leftarrow \Pi_Y(y - \beta(\sigma_k\nabla_y f + \nabla_y g)(x_k, y))$,
       `y_steps` times, warm-started;
    3. $x_{k+1} = \Pi_X(x_k - \alpha\, d_k)$,
       $d_k = \nabla_x f(x_k, y) + (\nabla_x g(x_k, y) - \nabla_x g(x_k, z))/\sigma_k$.

    `variant="single_loop"` (P-SL, momentum-assisted): no inner loops; the three
    directions are evaluated at $(x_k, y_k, z_k)$ on one sample $\xi_k$ and corrected
    recursively with the same sample at the previous point,
    $D_k = d(p_k; \xi_k) + (1 - \eta)(D_{k-1} - d(p_{k-1}; \xi_k))$ ($D_0$ = plain
    estimate), then $x, y, z$ step together with $\alpha$, $\beta$ (on the
    $h_\sigma$-scaled direction) and $\gamma$. With full-batch data the correction
    cancels exactly and this is projected gradient descent on $(x, y, z)$.

    Penalty schedule: $\sigma_k = \max(\sigma_{\min}, \sigma\,(k + 1)^{-p})$ with
    $p$ = `sigma_decay` (0: fixed $\sigma$).

    **Arguments:**

    - `variant`: `"double_loop"` (default) or `"single_loop"`.
    - `sigma`: $\sigma > 0$ (default 0.01; the bias in $x$ is $O(\sigma)$).
    - `sigma_decay`: $p \ge 0$ (default 0); `sigma_min`: floor of $\sigma_k$
      (default 0).
    - `x_lr`: $\alpha$ (default 0.1). The paper's worst-case guidance is
      $\alpha = \Theta(\sigma)$; for lower levels with a well-conditioned solution map
      $\psi_\sigma$ stays smooth and a constant $\alpha$ works.
    - `y_lr`: $\beta$ on $\sigma\nabla_y f + \nabla_y g$ (default 0.1; need
      $\beta \le 1/(\sigma L_f + L_g)$).
    - `z_lr`: $\gamma \le 1/L_g$ (default 0.1).
    - `y_steps`, `z_steps`: inner steps of the double loop (default 10; ignored by the
      single loop).
    - `momentum`: STORM weight $\eta \in (0, 1]$ of the single loop (default 0.1;
      $\eta = 1$ is plain SGD).
    - `coupled_samples`: evaluate $\nabla_x g(x, y)$ and $\nabla_x g(x, z)$ on the same
      lower batch (default `True`): under mean-squared smoothness the variance of
      their difference is $O(\|y - z\|^2) = O(\sigma^2)$, so the $1/\sigma$-amplified
      term keeps $O(1)$ variance. `False` draws them independently.

    With stochastic data, each inner step draws fresh batches (the $y$ and $z$ loops
    independently of each other), and the $x$ step draws its own.

    Metrics each step: `upper_loss` $f(x_k, y)$; `grad_norm`, the gradient mapping
    $\|x_k - x_{k+1}\| / \alpha_k$ (the projected penalty-gradient norm; $\|d_x\|$ when
    the problem has no `project_x`); `lower_residual`
    $\|y - \Pi_Y(y - \nabla_y g(x_k, y))\|$ of the penalised variable (it shrinks like
    $\sigma$); `value_residual`, the same for $z$; `penalty_gap`
    $g(x_k, y) - g(x_k, z)$; `lambda` $\lambda_k = 1/\sigma_k$. All come from the
    oracles of the $x$ step at no extra cost (minibatch estimates with stochastic
    data).
    """

    supports: ClassVar[frozenset[str]] = frozenset(
        {"single_block", "project_x", "project_y", "stochastic"}
    )

    variant: Literal["double_loop", "single_loop"] = eqx.field(
        static=True, default="double_loop"
    )
    sigma: float = 0.01
    sigma_decay: float = 0.0
    sigma_min: float = 0.0
    x_lr: float = 0.1
    y_lr: float = 0.1
    z_lr: float = 0.1
    y_steps: int = eqx.field(static=True, default=10)
    z_steps: int = eqx.field(static=True, default=10)
    momentum: float = 0.1
    coupled_samples: bool = eqx.field(static=True, default=True)

    def __check_init__(self):
        if self.variant not in ("double_loop", "single_loop"):
            raise ValueError(
                f"Penalty: `variant` must be 'double_loop' or 'single_loop', got "
                f"{self.variant!r}"
            )
        for name in ("sigma", "x_lr", "y_lr", "z_lr"):
            _check_number("Penalty", name, getattr(self, name))
        _check_number("Penalty", "sigma_decay", self.sigma_decay, strict=False)
        _check_number("Penalty", "sigma_min", self.sigma_min, strict=False)
        _check_number("Penalty", "momentum", self.momentum, high=1.0)
        if self.variant == "double_loop":
            for name in ("y_steps", "z_steps"):
                _check_steps("Penalty", name, getattr(self, name))
                if getattr(self, name) < 1:
                    raise ValueError(
                        f"Penalty: the double loop needs `{name}` >= 1, got "
                        f"{getattr(self, name)!r} (variant='single_loop' steps jointly)"
                    )

    def _rule(self, step: Array, dtype) -> _Rule:
        t = (step + 1).astype(dtype)
        sigma = jnp.maximum(
            _scalar(self.sigma_min, dtype),
            _scalar(self.sigma, dtype) * t ** -_scalar(self.sigma_decay, dtype),
        )
        eta = self.momentum if self.variant == "single_loop" else 1.0
        return _Rule(
            penalty=1 / sigma,
            x_lr=_scalar(self.x_lr, dtype),
            # beta acts on h_sigma = sigma f + g = sigma (f + lambda g)
            y_lr=_scalar(self.y_lr, dtype) * sigma,
            z_lr=_scalar(self.z_lr, dtype),
            momentum=_scalar(eta, dtype),
        )

    def _init(
        self, problem: BilevelProblem, x0: PyTree[Array], y0: PyTree[Array],
        key: PRNGKeyArray | None,
    ) -> _PenaltyState:
        return _init_state("Penalty", problem, x0, y0, self.variant == "single_loop")

    def _step(
        self,
        problem: BilevelProblem,
        state: _PenaltyState,
        data: Any,
        key: PRNGKeyArray,
    ) -> tuple[_PenaltyState, dict[str, Scalar]]:
        single = self.variant == "single_loop"
        rule = self._rule(state.step, result_dtype(state.x))
        return _penalty_step(
            problem, state, data, key, rule,
            y_steps=0 if single else self.y_steps,
            z_steps=0 if single else self.z_steps,
            coupled=self.coupled_samples,
        )

    def _params(self, state: _PenaltyState) -> tuple[PyTree[Array], PyTree[Array]]:
        return state.x, state.y


# --------------------------------------------------------------------------------------
# Shen & Chen (ICML 2023)


class VPBGD(AbstractBilevelSolver):
    r"""Value-function penalised bilevel gradient descent (V-PBGD) of Shen and Chen
    (ICML 2023, "On Penalty-based Bilevel Gradient Descent Method").

    Projected gradient descent on $F_\gamma(x, y) = f(x, y) + \gamma\,(g(x, y) - v(x))$,
    $v(x) = \min_{z \in Y} g(x, z)$, over $X \times Y$, outer step $k$:

    1. $z \leftarrow \Pi_Y(z - \beta\nabla_y g(x_k, z))$, `z_steps` times, warm-started
       ($z \approx \arg\min_Y g(x_k, \cdot)$);
    2. joint step with step $\alpha$:
       $x_{k+1} = \Pi_X(x_k - \alpha[\nabla_x f + \gamma_k(\nabla_x g(x_k, y_k) -
       \nabla_x g(x_k, z))])$,
       $y_{k+1} = \Pi_Y(y_k - \alpha[\nabla_y f + \gamma_k\nabla_y g](x_k, y_k))$.

    Penalty $\gamma_k$: constant, or a linear ramp from `penalty_init` to `penalty` over
    `ramp_steps` steps (the public data hyper-cleaning code). With `scale_by_penalty`
    both steps are multiplied by $\min(1, 1/\gamma_k)$ (also from that code), so that
    the effective step stays $\approx\alpha/\gamma$ once $\gamma > 1$.

    **Arguments:**

    - `penalty`: $\gamma$ (default 10, the paper's toy;
      $\gamma = \Theta(\epsilon^{-1/2})$ in the theory).
    - `penalty_init`, `ramp_steps`: linear ramp (default 0 steps: constant $\gamma$).
    - `x_lr`: $\alpha$ (default 0.01 $= 0.1/\gamma$, the toy); `y_lr`: step of $y$ if
      different (default: `x_lr`). Need $\alpha \lesssim 1/L_\gamma$, $L_\gamma =
      O(\gamma)$.
    - `z_lr`: $\beta$ of the value-function loop (default 0.1); `z_steps`: its length
      (default 1, warm-started, as in the public code).
    - `scale_by_penalty`: see above (default `False`).
    - `coupled_samples`: one lower batch for both $\nabla_x g$ calls (default `True`;
      see [`bilevel.solvers.Penalty`][]).

    Metrics each step: `upper_loss` $f(x_k, y)$; `grad_norm`, the gradient mapping
    $\|x_k - x_{k+1}\| / \alpha_k$ (the projected penalty-gradient norm; $\|d_x\|$ when
    the problem has no `project_x`); `lower_residual`
    $\|y - \Pi_Y(y - \nabla_y g(x_k, y))\|$ of the penalised variable (it shrinks like
    $\sigma$); `value_residual`, the same for $z$; `penalty_gap`
    $g(x_k, y) - g(x_k, z)$; `lambda` $\lambda_k = 1/\sigma_k$. All come from the
    oracles of the $x$ step at no extra cost (minibatch estimates with stochastic
    data).
    """

    supports: ClassVar[frozenset[str]] = frozenset(
        {"single_block", "project_x", "project_y", "stochastic"}
    )

    penalty: float = 10.0
    penalty_init: float = 0.0
    ramp_steps: int = eqx.field(static=True, default=0)
    x_lr: float = 0.01
    y_lr: float | None = None
    z_lr: float = 0.1
    z_steps: int = eqx.field(static=True, default=1)
    scale_by_penalty: bool = eqx.field(static=True, default=False)
    coupled_samples: bool = eqx.field(static=True, default=True)

    def __check_init__(self):
        for name in ("penalty", "x_lr", "z_lr"):
            _check_number("VPBGD", name, getattr(self, name))
        if self.y_lr is not None:
            _check_number("VPBGD", "y_lr", self.y_lr)
        _check_number("VPBGD", "penalty_init", self.penalty_init, strict=False)
        _check_steps("VPBGD", "ramp_steps", self.ramp_steps)
        _check_steps("VPBGD", "z_steps", self.z_steps)
        if self.z_steps < 1:
            raise ValueError(f"VPBGD: `z_steps` must be >= 1, got {self.z_steps!r}")

    def _rule(self, step: Array, dtype) -> _Rule:
        penalty = _scalar(self.penalty, dtype)
        if self.ramp_steps:
            start = _scalar(self.penalty_init, dtype)
            fraction = jnp.minimum(step.astype(dtype) / self.ramp_steps, 1)
            penalty = start + (penalty - start) * fraction
        scale = 1 / jnp.maximum(penalty, 1) if self.scale_by_penalty else 1
        y_lr = self.x_lr if self.y_lr is None else self.y_lr
        return _Rule(
            penalty=penalty,
            x_lr=_scalar(self.x_lr, dtype) * scale,
            y_lr=_scalar(y_lr, dtype) * scale,
            z_lr=_scalar(self.z_lr, dtype),
            momentum=_scalar(1.0, dtype),
        )

    def _init(
        self, problem: BilevelProblem, x0: PyTree[Array], y0: PyTree[Array],
        key: PRNGKeyArray | None,
    ) -> _PenaltyState:
        return _init_state("VPBGD", problem, x0, y0, storm=False)

    def _step(
        self,
        problem: BilevelProblem,
        state: _PenaltyState,
        data: Any,
        key: PRNGKeyArray,
    ) -> tuple[_PenaltyState, dict[str, Scalar]]:
        rule = self._rule(state.step, result_dtype(state.x))
        return _penalty_step(
            problem, state, data, key, rule,
            y_steps=0, z_steps=self.z_steps, coupled=self.coupled_samples,
        )

    def _params(self, state: _PenaltyState) -> tuple[PyTree[Array], PyTree[Array]]:
        return state.x, state.y


# --------------------------------------------------------------------------------------
# Kwon, Kwon, Wright, Nowak (ICML 2023)


class F2SA(AbstractBilevelSolver):
    r"""Fully first-order stochastic approximation (F2SA) of Kwon, Kwon, Wright and
    Nowak (ICML 2023, "A Fully First-Order Method for Stochastic Bilevel Optimization").

    Gradient method on the Lagrangian $\mathcal{L}_\lambda(x, y) = f(x, y) +
    \lambda(g(x, y) - g^*(x))$ with a growing multiplier, outer step $k$ with
    $t = k + k_0$, $\lambda_k = \lambda_0 t^{b}$, $\alpha_k = c_\alpha t^{-a}$,
    $\gamma_k = c_\gamma t^{-c}$:

    1. `y_steps` / `z_steps` warm-started inner steps, each on fresh independent
       samples:
       $z \leftarrow \Pi_Y(z - \gamma_k\nabla_y g(x_k, z))$,
       $y \leftarrow \Pi_Y(y - \alpha_k(\nabla_y f + \lambda_k\nabla_y g)(x_k, y))$;
    2. $x_{k+1} = \Pi_X(x_k - \xi\alpha_k(\nabla_x f(x_k, y)
       + \lambda_k(\nabla_x g(x_k, y) - \nabla_x g(x_k, z))))$, the three gradients on
       independent samples.

    The defaults $(a, b, c) = (5/7, 2/7, 4/7)$ are the paper's exponents when both
    levels are stochastic; its analysis also asks $\alpha_k\lambda_k \le 1/(4L_g)$,
    $\gamma_k \le 1/(4L_g)$ and a small ratio $\xi$. (The paper is unconstrained; the
    projections of the problem, identity by default, are applied anyway.)

    **Arguments:**

    - `penalty`: $\lambda_0$ (default 1); `penalty_growth`: $b$ (default 2/7).
    - `y_lr`: $c_\alpha$ (default 0.1); `y_lr_decay`: $a$ (default 5/7).
    - `z_lr`: $c_\gamma$ (default 0.1); `z_lr_decay`: $c$ (default 4/7).
    - `x_ratio`: $\xi$ (default 1).
    - `offset`: $k_0 \ge 1$ (default 1).
    - `y_steps`, `z_steps`: inner steps $T$ (default 10 each).
    - `coupled_samples`: default `False` (the paper's independent samples); `True`
      shares the lower batch of the two $\nabla_x g$ calls (see
      [`bilevel.solvers.Penalty`][]).

    Metrics each step: `upper_loss` $f(x_k, y)$; `grad_norm`, the gradient mapping
    $\|x_k - x_{k+1}\| / \alpha_k$ (the projected penalty-gradient norm; $\|d_x\|$ when
    the problem has no `project_x`); `lower_residual`
    $\|y - \Pi_Y(y - \nabla_y g(x_k, y))\|$ of the penalised variable (it shrinks like
    $\sigma$); `value_residual`, the same for $z$; `penalty_gap`
    $g(x_k, y) - g(x_k, z)$; `lambda` $\lambda_k = 1/\sigma_k$. All come from the
    oracles of the $x$ step at no extra cost (minibatch estimates with stochastic
    data).
    """

    supports: ClassVar[frozenset[str]] = frozenset(
        {"single_block", "project_x", "project_y", "stochastic"}
    )

    penalty: float = 1.0
    penalty_growth: float = 2 / 7
    y_lr: float = 0.1
    y_lr_decay: float = 5 / 7
    z_lr: float = 0.1
    z_lr_decay: float = 4 / 7
    x_ratio: float = 1.0
    offset: float = 1.0
    y_steps: int = eqx.field(static=True, default=10)
    z_steps: int = eqx.field(static=True, default=10)
    coupled_samples: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        for name in ("penalty", "y_lr", "z_lr", "x_ratio"):
            _check_number("F2SA", name, getattr(self, name))
        for name in ("penalty_growth", "y_lr_decay", "z_lr_decay"):
            _check_number("F2SA", name, getattr(self, name), strict=False)
        _check_number("F2SA", "offset", self.offset, low=1.0, strict=False)
        for name in ("y_steps", "z_steps"):
            _check_steps("F2SA", name, getattr(self, name))
            if getattr(self, name) < 1:
                raise ValueError(
                    f"F2SA: `{name}` must be >= 1, got {getattr(self, name)!r}"
                )

    def _rule(self, step: Array, dtype) -> _Rule:
        t = step.astype(dtype) + _scalar(self.offset, dtype)
        y_lr = _scalar(self.y_lr, dtype) * t ** -_scalar(self.y_lr_decay, dtype)
        growth = _scalar(self.penalty_growth, dtype)
        return _Rule(
            penalty=_scalar(self.penalty, dtype) * t**growth,
            x_lr=_scalar(self.x_ratio, dtype) * y_lr,
            y_lr=y_lr,
            z_lr=_scalar(self.z_lr, dtype) * t ** -_scalar(self.z_lr_decay, dtype),
            momentum=_scalar(1.0, dtype),
        )

    def _init(
        self, problem: BilevelProblem, x0: PyTree[Array], y0: PyTree[Array],
        key: PRNGKeyArray | None,
    ) -> _PenaltyState:
        return _init_state("F2SA", problem, x0, y0, storm=False)

    def _step(
        self,
        problem: BilevelProblem,
        state: _PenaltyState,
        data: Any,
        key: PRNGKeyArray,
    ) -> tuple[_PenaltyState, dict[str, Scalar]]:
        rule = self._rule(state.step, result_dtype(state.x))
        return _penalty_step(
            problem, state, data, key, rule,
            y_steps=self.y_steps, z_steps=self.z_steps, coupled=self.coupled_samples,
        )

    def _params(self, state: _PenaltyState) -> tuple[PyTree[Array], PyTree[Array]]:
        return state.x, state.y
