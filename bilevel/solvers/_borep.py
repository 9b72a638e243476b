r"""BO-REP: bilevel optimization under unbounded smoothness (Hao, Gong and Liu, ICLR
2024).

Normalized momentum on the upper variable, one stochastic gradient step per iteration
on the linear-system variable $z$, and a lower variable refreshed only periodically by a
few warm-started SGD steps, after an Epoch-SGD refinement of the initial point.
"""

from typing import ClassVar, Literal

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import optax
from jaxtyping import Array, Int, PRNGKeyArray, PyTree, Scalar

from .._data import AbstractData
from .._inner import inner_steps
from .._linear import result_dtype
from .._misc import tree_axpy, tree_norm, tree_project_ball, tree_scale, tree_sub
from .._oracles import oracles
from .._problem import BilevelProblem, apply_project_x, apply_project_y
from .._solver import (
    AbstractBilevelSolver,
    Bounds,
    choice,
    count,
    hyperparameter,
    nonnegative,
    positive,
)
from .._stepsize import (
    hessian_norm,
    hyper_curvature,
    inverse_or_zero,
    lower_curvature,
    upper_curvature,
)


# Lower-update branches selected at each step by `lax.switch`.
_INITIAL, _PERIODIC, _FROZEN = 0, 1, 2
# Batch streams: the upper batch uses stream 0 of `upper_batch`; the lower ones below.
_SGD_STREAM, _HVP_STREAM, _CROSS_STREAM, _REFINE_STREAM = 0, 1, 2, 3


class _Steps(eqx.Module):
    """The lower SGD step, the $z$ step and the first refinement step in use."""

    inner_lr: Scalar
    nu: Scalar
    refine_lr: Scalar
    eta: Scalar


class _BOREPState(eqx.Module):
    x: PyTree[Array]
    y: PyTree[Array]
    z: PyTree[Array]
    momentum: PyTree[Array]
    step: Int[Array, ""]
    steps: _Steps | None


class BOREP(AbstractBilevelSolver):
    r"""BO-REP (Hao, Gong and Liu, 2024): bilevel optimization with a recurrent-network
    upper level, whose smoothness is unbounded ($(L_0, L_1)$-smooth: the Hessian norm
    may grow with the gradient norm).

    With $\Phi$ the problem's optimality condition ($\nabla_y g$ by default), iteration
    $k$ does:

    1. **Lower update** (Algorithm 2, "UpdateLower"): at $k = 0$, $y_0 =$ Epoch-SGD
       refinement of $y_{\text{init}}$ (Algorithm 3; see below). For $k \ge 1$ with
       $k \bmod I = 0$, $N$ warm-started SGD steps $y \leftarrow P_Y(y - \gamma\nabla_y
       g(x_k, y; \pi_t))$; otherwise $y_k = y_{k-1}$.
    2. **Linear system**: $z_{k+1} = \Pi_{\|z\| \le R}\big(z_k - \nu(\partial_y\Phi(x_k,
       y_k; \zeta)^\top z_k - \nabla_y f(x_k, y_k; \xi))\big)$, one SGD step on
       $\tfrac12 z^\top\nabla^2_{yy}g\,z - z^\top\nabla_y f$.
    3. **Hypergradient estimate**: $h_k = \nabla_x f(x_k, y_k; \xi) -
       \partial_x\Phi(x_k, y_k; \zeta')^\top z_{k+1}$.
    4. **Normalized momentum**: $m_{k+1} = \beta m_k + (1 - \beta) h_k$,
       $x_{k+1} = P_X\big(x_k - \eta\, m_{k+1} / (\|m_{k+1}\| + \epsilon)\big)$
       ($\eta$ derived from the problem by default, see below).

    $m_0 = 0$, $z_0 = 0$. The samples $\xi$ (upper batch), $\zeta$, $\zeta'$ (lower
    batches of streams 1 and 2) and $\pi_t$ (stream 0) are independent draws; with
    `independent_batches=False`, $\zeta' = \zeta$. With data `None` everything is
    deterministic.

    **Epoch-SGD refinement** (Hazan and Kale 2014 schedule, our reconstruction of
    Algorithm 3): epoch $e = 1..E$ runs $T_e = T_1 2^{e-1}$ SGD steps of size
    $\gamma_e = \gamma_1 / 2^{e-1}$ on $g(x_0, \cdot)$ from the previous epoch's
    average iterate; the last average is $y_0$. `refine_epochs=0` skips it, and step 0
    then runs the $N$ periodic steps instead, which is what the official code does.

    **Deviations and options.**

    - `init` receives no data, so the refinement runs inside the first `step` (a branch
      taken only when the step counter is 0).
    - The official code draws $z_0$ with a Xavier-uniform initializer; we start from
      the paper's $z_0 = 0$. It also never projects $z$ (`z_radius=None`, the default).
    - `order="hvp_first"` reproduces the official data-cleaning script: the
      Hessian-vector product (and `lower_residual`) is taken at the lower iterate
      *before* this step's lower update; $\nabla f$ and the cross term after it. That
      script also applies one extra SGD step at each period start; pass
      `inner_steps=N + 1` to match the count.
    - `normalize=False` replaces the normalized step by $x_{k+1} = P_X(x_k - \eta
      m_{k+1})$. With `beta=0, period=1, inner_steps=1, refine_epochs=0` this is a
      fixed-step single-loop method in the style of SOBA (Dagréou et al. 2022; here
      with the lower, $z$ and $x$ updates taken in sequence): the kind of method whose
      step must stay below $2/L$ at the current point, which unbounded smoothness makes
      arbitrarily small.
    - The lower-update branch is chosen by `lax.switch` on the step counter. If
      `jax.vmap` batches the counter itself (not the case when vmapping `bl.run` over
      seeds or data), the switch becomes a select that runs every branch at each step:
      correct, but slower.
    - With a general optimality condition $\Phi$ (e.g. a projected-gradient fixed
      point), step 2 targets $\partial_y\Phi^{-\top}\nabla_y f$, the adjoint of
      [`bilevel.hypergradient`][]; for the default $\Phi = \nabla_y g$ this is the
      paper's $z^* = [\nabla^2_{yy}g]^{-1}\nabla_y f$.

    **Default steps, from the problem** (an explicit value always wins): at step 0 and
    every `curvature_every` steps, power iterations on Hessian-vector products at
    $(x_k, y_k)$ estimate $L_g = \|\nabla^2_{yy} g\|$ and $\|\partial_y\Phi\|$ on one
    lower batch; then $\gamma = c/L_g$, $\nu = c/\|\partial_y\Phi\|$ and
    $\gamma_1 = \gamma$, with $c = 1$ for deterministic data and $1/2$ for minibatches.

    **Default $\eta$, from the problem** (a deviation: the paper and its code use the
    constant $\eta = 10^{-2}$). $\eta$ is a length in the space of $x$, so no constant
    suits every problem: on `logreg_hpo`, whose 30 log-regularisation weights start at
    0 and must travel to about $-4$, 500 steps of length $10^{-2}$ ended at validation
    loss 0.174 on the small instance (0.159 at full size), against the grid search's
    0.072 (0.075). At step 0 and every `curvature_every` steps, with $F(x) = f(x,
    y^*(x))$ the hyper-objective,

    $$\eta = \frac{\|\nabla F(x_k)\|}{L_F\,(1 + 3\beta)/(1 - \beta) + 2\kappa_k},
    \qquad \kappa_k = \frac{\|\nabla F(x_k)\|\,(1 - \cos\theta_k)}{\eta_{\text{old}}},$$

    the length that maximises a lower bound on the decrease of $F$ per step. With
    $d = m/\|m\|$, $F(x - \eta d) \le F(x) - \eta\langle\nabla F, d\rangle + \tfrac12
    L_F\eta^2$. Two things tilt $d$ away from $\nabla F$: the momentum averages
    hypergradients taken up to $j\eta$ away $j$ steps ago, an error of at most
    $L_F\eta\beta/(1 - \beta)$ that costs twice that in the slope; and the solver's
    estimate $\hat h$, made from its lagging $y$ and $z$, makes the angle $\theta$
    with $\nabla F$, a slope deficit $\|\nabla F\|(1 - \cos\theta)$ that grows with the
    speed of $x$, $\kappa\eta$ with $\kappa$ measured at the last length. The bound
    $\eta\|\nabla F\| - \tfrac12 L_F\eta^2(1 + 3\beta)/(1 - \beta) - \kappa\eta^2$ is
    largest at the $\eta$ above. Without lag and with $\beta = 0.9$, $\eta =
    \|\nabla F\|/(37 L_F)$, 1/37 of the length of the gradient step $\nabla F/L_F$.
    $L_F$ comes from `hyper_curvature` (power iterations through conjugate-gradient
    solves at the Newton point of $\nabla_y g$ from $y_k$; $L_f$ if that is not
    positive and finite), $\nabla F$ at that point with it (no further solve),
    $\hat h$ from $(y_k, z_k)$ on the same batches. $\kappa_0 = 0$: the errors of $y_0$
    and $z_0 = 0$ are not the lag of a moving $x$. On minibatches $\kappa = 0$: on one
    batch the deficit is mostly sampling noise, which does not shrink with $\eta$ (with
    it, $\eta$ fell to $10^{-12}$ on a stochastic quadratic and $x$ stalled). With
    `normalize=False` the step is $1/D$, $D$ the denominator above. A zero or
    non-finite $D$ keeps the previous $\eta$ (0 at step 0: $x$ waits). The estimates use
    $\nabla_y g$ even when the problem's condition is another (e.g. a projected lower
    level, whose constraints they ignore): pass `eta` there.

    So $\eta$ shrinks with $\|\nabla F\|$ and $x$ converges where a constant length
    circles; where $y$ and $z$ fall behind (on `logreg_hpo` some weights
    $e^{x_j}$ become tiny and the lower level ill-conditioned), $\kappa$ shortens it,
    and an estimate that does not descend ($\cos\theta \le 0$) halves it at least.
    Measured (float32, defaults, 500 steps): `logreg_hpo` 0.027 on the small instance
    (0.012 after 2000 steps), 0.060 at full size (0.052 after 2000); every registry
    problem beats its baseline at both sizes, most by more than before (full-size
    `hypercleaning` refitted test accuracy 0.772 -> 0.883, `distillation` 0.719 ->
    0.861), but at full size `imaml` (0.726 -> 0.661) and `hyper_representation`
    (0.922 -> 0.904) move slower than with $10^{-2}$: their derived lengths are 0.002 to
    0.009, $L_F$ being far above the curvature along the path. The scale battery's gaps
    after 3000 steps fell from 3.6e-2 (0.16 for its stiff member) to below 1e-6,
    float32 rounding; on the tests' unbounded-smoothness quartic from $x_0 = 8$,
    $F/F^* = 1.0005$ after 1000 steps, against 25 with $\eta = 10^{-2}$ and 2.9 with
    0.05. Constant lengths on small `logreg_hpo`: 0.05 reached 0.026 after
    500 steps but 0.073 after 2000, as $x$ kept moving where $F$ is flat (weights
    below $e^{-16}$ and above $e^{7}$) while $y$ could not follow; a length grown while
    successive hypergradients agreed reached 1.3 and made $y$ non-finite. Cost: 22
    conjugate-gradient solves with $\nabla^2_{yy} g$ (at most 50 products each)
    per re-estimate; measured on the full-size registry problems, 500 steps took 3
    times as long on `hypercleaning` (0.17 s -> 0.49 s, compilation excluded), 1.5
    times on `imaml`, about the same on `hyper_representation`.

    Scaling $g$ by $s$ scales $\gamma$ and $\nu$ by $1/s$ and leaves $F$, hence
    $\eta$, unchanged; scaling $f$ by $t$ scales $\|\nabla F\|$, $L_F$ and $\kappa$ by
    $t$ and leaves $\eta$ unchanged. The iterates depend on neither scale.

    **Arguments** (other defaults: the paper's hyper-representation experiment;
    official README and argparse):

    - `eta`: upper step $\eta$, a length (default: derived, re-estimated every
      `curvature_every` steps; the paper used 1e-2).
    - `beta`: momentum $\beta \in [0, 1)$ (default 0.9).
    - `nu`: $z$ step $\nu$ (default: derived; the paper's 1e-2 fits curvatures near 1).
    - `inner_lr`: lower SGD step $\gamma$ (default: derived; the paper used 1e-3).
    - `period`: $I$, iterations between lower updates (default 2).
    - `inner_steps`: $N$, SGD steps per lower update (default 3).
    - `refine_epochs`: $E$, Epoch-SGD epochs before the loop (default 3; 0 = none).
    - `z_radius`: optional radius $R$ of the ball $z$ is projected on (theory:
      $l_{f,0}/\mu$); default `None`, no projection.
    - `refine_steps`: $T_1$, steps of the first epoch (default 10).
    - `refine_lr`: $\gamma_1$ (default: `inner_lr`).
    - `eps`: $\epsilon$ in the normalization (default 1e-10, as in the official code).
    - `order`: `"lower_first"` (paper) or `"hvp_first"` (see above).
    - `normalize`: normalized upper step (default) or the plain step $\eta m_{k+1}$.
    - `independent_batches`: independent lower batches for the Hessian-vector and
      cross-derivative products (default `True`).
    - `curvature_every`: steps between two curvature estimates (default 100).

    Metrics: `upper_loss` $f(x_k, y_k; \xi)$; `grad_norm` $\|h_k\|$ (with a set $X$,
    the gradient mapping $\|(x_k - P_X(x_k - \tau h_k))/\tau\|$ at the step
    $\tau = \eta/(\|m_{k+1}\| + \epsilon)$ the momentum is applied with);
    `lower_residual` $\|\Phi(x_k, y; \zeta)\|$; `linear_residual`
    $\|\partial_y\Phi^\top z_k - \nabla_y f\|$; `momentum_norm` $\|m_{k+1}\|$;
    `lower_updated` (1 when $y$ was updated at this step, else 0); `inner_lr`, `nu` and
    `eta`, the steps in use.

    ??? cite "References"

        ```bibtex
        @inproceedings{hao2024borep,
          title={Bilevel Optimization under Unbounded Smoothness: A New Algorithm and
                 Convergence Analysis},
          author={Hao, Jie and Gong, Xiaochuan and Liu, Mingrui},
          booktitle={International Conference on Learning Representations},
          year={2024}
        }
        ```
    """

    supports: ClassVar[frozenset[str]] = frozenset(
        {"single_block", "project_x", "project_y", "optimality", "stochastic"}
    )

    eta: float | None = positive(None, optional=True)
    beta: float = hyperparameter(0.9, Bounds(0.0, 1.0, high_open=True))
    nu: float | None = positive(None, optional=True)
    inner_lr: float | None = positive(None, optional=True)
    period: int = count(2)
    inner_steps: int = count(3)
    refine_epochs: int = count(3, minimum=0)
    z_radius: float | None = positive(None, optional=True)
    refine_steps: int = count(10)
    refine_lr: float | None = positive(None, optional=True)
    eps: float = nonnegative(1e-10)
    order: Literal["lower_first", "hvp_first"] = choice(
        "lower_first", ("lower_first", "hvp_first")
    )
    normalize: bool = eqx.field(static=True, default=True)
    independent_batches: bool = eqx.field(static=True, default=True)
    curvature_every: int = count(100)

    def __check_init__(self):
        for name in ("normalize", "independent_batches"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"BOREP: `{name}` must be a bool, got {getattr(self, name)!r}"
                )

    def _init(self, problem, x0, y0, key):
        steps = None
        if self.nu is None or self.inner_lr is None or self.eta is None:
            zero = jnp.zeros((), result_dtype(y0))
            steps = _Steps(zero, zero, zero, zero)
        return _BOREPState(
            x=x0,
            y=y0,
            z=jtu.tree_map(jnp.zeros_like, y0),
            momentum=jtu.tree_map(jnp.zeros_like, x0),
            step=jnp.array(0),
            steps=steps,
        )

    def _derive_steps(
        self, problem, state, upper_batch, batch, key, deterministic: bool
    ) -> _Steps:
        r"""$\gamma = c/L_g$ and $\nu = c/\|\partial_y\Phi\|$ from power iterations at
        $(x_k, y_k)$ on one lower batch ($c = 1$ for deterministic data, $1/2$ for
        minibatches), and $\eta$ (`_derive_eta`); explicit values win."""
        x, y = state.x, state.y
        safety = 1.0 if deterministic else 0.5
        lower_key, condition_key, eta_key = jr.split(key, 3)
        if self.inner_lr is None:
            lower_fn = lambda v: problem.lower(x, v, batch)  # noqa: E731
            inner_lr = safety / hessian_norm(lower_fn, y, lower_key)
        else:
            inner_lr = jnp.asarray(self.inner_lr, result_dtype(y))
        if self.nu is None:
            nu = safety / lower_curvature(problem, x, y, batch, condition_key)
        else:
            nu = jnp.asarray(self.nu, result_dtype(y))
        refine_lr = inner_lr if self.refine_lr is None else self.refine_lr
        dtype = inner_lr.dtype
        if self.eta is None:
            eta = self._derive_eta(
                problem, state, upper_batch, batch, eta_key, deterministic
            )
        else:
            eta = self.eta
        return _Steps(
            inner_lr, nu, jnp.asarray(refine_lr, dtype), jnp.asarray(eta, dtype)
        )

    def _derive_eta(
        self, problem, state, upper_batch, lower_batch, key, deterministic: bool
    ) -> Scalar:
        r"""The default $\eta$ at $(x_k, y_k, z_k)$ (class docstring, "Default steps"):
        $\|\nabla F\| / D$, or the step $1/D$ with `normalize=False`, with
        $D = L_F (1 + 3\beta)/(1 - \beta) + 2\kappa$. $L_F$ by `hyper_curvature`
        ($L_f$ by `upper_curvature` if that is not positive and finite), and with it
        $\nabla F$ at the Newton point $\hat y$ of $\nabla_y g$ from $y_k$;
        $\kappa = (\|\nabla F\| - a)_+ / \eta_{\text{old}}$ with $a$ the slope of $F$
        along the solver's own estimate $\hat h$ from $(y_k, z_k)$, 0 at step 0.
        A zero or non-finite $D$ keeps the previous value."""
        x, y = state.x, state.y
        hyper_key, upper_key = jr.split(key)

        def gradient(u, w):
            return jax.grad(problem.lower, argnums=1)(u, w, lower_batch)

        def upper(u, w):
            return problem.upper(u, w, upper_batch)

        curvature, grad = hyper_curvature(
            upper, gradient, x, y, hyper_key, with_gradient=True
        )
        curvature = lax.cond(
            jnp.isfinite(curvature) & (curvature > 0),
            lambda: curvature,
            lambda: upper_curvature(problem, x, y, upper_batch, upper_key).astype(
                curvature.dtype
            ),
        )
        size = tree_norm(grad)
        if not deterministic:  # sampling noise, not lag, would dominate the deficit
            lag = jnp.zeros_like(size)
            return self._eta_from(size, curvature, lag, state.steps.eta)
        # The solver's own estimate, from its lagging y and z, on the same batches.
        own = oracles(problem, x, y, state.z, upper_batch, lower_batch)
        estimate = tree_sub(own.upper_grad_x, own.cross)
        # ||grad F|| - a = ||grad F|| (1 - cos) = ||grad F|| |u - v|^2 / 2 for the unit
        # vectors u, v along grad F and the estimate (no cancellation when cos ~ 1).
        unit = tree_scale(inverse_or_zero(size), grad)
        own_unit = tree_scale(inverse_or_zero(tree_norm(estimate)), estimate)
        deficit = size * tree_norm(tree_sub(unit, own_unit)) ** 2 / 2
        old = state.steps.eta
        old_length = old if self.normalize else old * size
        lag = jnp.where(
            (state.step > 0) & (old_length > 0),
            deficit * inverse_or_zero(old_length),
            0,
        )
        return self._eta_from(size, curvature, lag, old)

    def _eta_from(self, size, curvature, lag, old) -> Scalar:
        r"""$\|\nabla F\|/D$ (`normalize=False`: $1/D$), or `old` if $D$ is not positive
        and finite."""
        denominator = curvature * (1 + 3 * self.beta) / (1 - self.beta) + 2 * lag
        numerator = size if self.normalize else jnp.ones_like(size)
        ok = jnp.isfinite(denominator) & (denominator > 0)
        return jnp.where(ok, numerator / jnp.where(ok, denominator, 1), old)

    def _current_steps(self, problem, state, data, upper_batch, hvp_batch, key):
        """The steps of this iteration: derived at step 0 and every `curvature_every`
        steps when not given."""
        if state.steps is None:
            refine_lr = self.inner_lr if self.refine_lr is None else self.refine_lr
            return _Steps(self.inner_lr, self.nu, refine_lr, self.eta)
        return lax.cond(
            state.step % self.curvature_every == 0,
            lambda: self._derive_steps(
                problem,
                state,
                upper_batch,
                hvp_batch,
                jr.fold_in(key, 1),
                data.deterministic,
            ),
            lambda: state.steps,
        )

    def _step(self, problem, state, data, key):
        k = state.step
        lower_key, upper_key, hvp_key, cross_key = jr.split(key, 4)
        period_start = jnp.where(k % self.period == 0, _PERIODIC, _FROZEN)
        branch = jnp.where(k == 0, _INITIAL, period_start)
        x = state.x
        upper_batch = data.upper_batch(upper_key, k)
        hvp_batch = data.lower_batch(hvp_key, k, stream=_HVP_STREAM)
        cross_batch = (
            data.lower_batch(cross_key, k, stream=_CROSS_STREAM)
            if self.independent_batches
            else hvp_batch
        )
        steps = self._current_steps(problem, state, data, upper_batch, hvp_batch, key)
        y = self._update_lower(problem, x, state.y, data, lower_key, k, branch, steps)
        # f and its gradients at the updated y; Phi and the Hessian-vector product at
        # the y the chosen order asks for (for "hvp_first", the one before the update).
        at_y = oracles(problem, x, y, state.z, upper_batch, hvp_batch)
        at_hvp = (
            oracles(problem, x, state.y, state.z, upper_batch, hvp_batch)
            if self.order == "hvp_first"
            else at_y
        )
        z_grad = tree_sub(at_hvp.hvp, at_y.upper_grad_y)
        z = tree_project_ball(tree_axpy(-steps.nu, z_grad, state.z), self.z_radius)
        cross = oracles(problem, x, y, z, upper_batch, cross_batch).cross
        h = tree_sub(at_y.upper_grad_x, cross)
        momentum = jtu.tree_map(
            lambda m, g: self.beta * m + (1 - self.beta) * g, state.momentum, h
        )
        momentum_norm = tree_norm(momentum)
        eta = steps.eta if self.eta is None else self.eta
        scale = eta / (momentum_norm + self.eps) if self.normalize else eta
        new_x = apply_project_x(problem, tree_axpy(-scale, momentum, x))
        if problem.project_x is None:
            mapping = h
        else:  # the gradient mapping of h, at the step the momentum is applied with
            mapping = tree_scale(
                1 / scale,
                tree_sub(x, apply_project_x(problem, tree_axpy(-scale, h, x))),
            )
        metrics = {
            "upper_loss": at_y.upper_loss,
            "grad_norm": tree_norm(mapping),
            "lower_residual": tree_norm(at_hvp.lower_grad),
            "linear_residual": tree_norm(z_grad),
            "momentum_norm": momentum_norm,
            "lower_updated": (branch != _FROZEN).astype(jnp.int32),
            "inner_lr": jnp.asarray(steps.inner_lr, at_y.upper_loss.dtype),
            "nu": jnp.asarray(steps.nu, at_y.upper_loss.dtype),
            "eta": jnp.asarray(eta, at_y.upper_loss.dtype),
        }
        new_steps = None if state.steps is None else steps
        return _BOREPState(new_x, y, z, momentum, k + 1, new_steps), metrics

    def _params(self, state):
        return state.x, state.y

    def _update_lower(self, problem, x, y, data, key, k, branch, steps):
        """$y_k$ from $y_{k-1}$: refinement at step 0, $N$ SGD steps at period starts,
        unchanged otherwise."""

        def periodic(y):
            sgd = optax.sgd(steps.inner_lr)
            first_draw = (k // self.period) * self.inner_steps
            y, _ = inner_steps(
                problem, sgd, x, y, sgd.init(y), data, key, self.inner_steps, first_draw
            )
            return y

        def initial(y):
            if self.refine_epochs == 0:
                return periodic(y)
            return self._refine(problem, x, y, data, key, steps.refine_lr)

        return lax.switch(branch, (initial, periodic, lambda y: y), y)

    def _refine(
        self,
        problem: BilevelProblem,
        x: PyTree[Array],
        y: PyTree[Array],
        data: AbstractData,
        key: PRNGKeyArray,
        lr: Scalar,
    ) -> PyTree[Array]:
        r"""Epoch-SGD (Algorithm 3): `refine_epochs` epochs of projected SGD on
        $g(x, \cdot)$, epoch $e$ with $T_1 2^{e-1}$ steps of size $\gamma_1/2^{e-1}$,
        each epoch restarted from the previous epoch's average iterate. Lower batches
        come from stream 3, draws numbered consecutively from 0."""
        first_draw = 0
        for epoch in range(self.refine_epochs):
            num = self.refine_steps * 2**epoch
            y = _averaged_sgd(
                problem,
                x,
                y,
                data,
                jr.fold_in(key, epoch),
                lr / 2**epoch,
                num,
                first_draw,
            )
            first_draw += num
        return y


def _averaged_sgd(
    problem, x, y, data, key, lr, num: int, first_draw: int
) -> PyTree[Array]:
    """Average of the iterates of `num` projected SGD steps on $g(x, \\cdot)$ from
    `y`."""

    def body(t, carry):
        y, total = carry
        batch = data.lower_batch(
            jr.fold_in(key, t), first_draw + t, stream=_REFINE_STREAM
        )
        grad = jax.grad(problem.lower, argnums=1)(x, y, batch)
        y = apply_project_y(problem, x, tree_axpy(-lr, grad, y))
        return y, jtu.tree_map(jnp.add, total, y)

    _, total = lax.fori_loop(0, num, body, (y, jtu.tree_map(jnp.zeros_like, y)))
    return tree_scale(1 / num, total)
