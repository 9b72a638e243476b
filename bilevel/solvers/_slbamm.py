r"""sl-BAMM: the single-loop averaged method of multipliers (Liu, Liu, Yao, Zeng, Zhang,
ICML 2023) for bilevel problems whose lower level is merely convex."""

from typing import Any, ClassVar, Literal

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from jaxtyping import Array, Int, PyTree, Scalar

from .._linear import result_dtype
from .._misc import tree_axpy, tree_dot, tree_norm, tree_scale, tree_sub
from .._problem import BilevelProblem, apply_project_x
from .._solver import (
    AbstractBilevelSolver,
    Bounds,
    choice,
    hyperparameter,
    nonnegative,
    positive,
)
from .._stepsize import (
    hyper_curvature,
    random_direction,
    spectrum_bounds,
)


Strategy = Literal["s1", "s2", "s3"]
VStep = Literal["line_search", "fixed"]

# Powers q_eta, q_alpha of mu_k in the fixed v-step eta_k and the x-step alpha_k.
_MU_POWERS = {"s1": (2, 7), "s2": (1, 5), "s3": (0, 3)}


class _Curvatures(eqx.Module):
    r"""Estimates from which the default steps are derived, taken at step 0: the
    largest and smallest eigenvalues $L_F, m_F$ and $L_f, m_f$ of
    $\nabla^2_{yy} F$ and $\nabla^2_{yy} f$, and the curvature `hyper` $L_\Phi$ of the
    averaged problem's hyper-objective; and `tracked`, the curvature of
    $\varphi_\mu$ along `direction`, one power iteration per step."""

    upper: Scalar
    upper_min: Scalar
    lower: Scalar
    lower_min: Scalar
    hyper: Scalar
    tracked: Scalar
    direction: PyTree[Array]


class _SLBAMMState(eqx.Module):
    x: PyTree[Array]
    y: PyTree[Array]
    v: PyTree[Array]
    step: Int[Array, ""]
    curvatures: _Curvatures | None


class _Linearisation(eqx.Module):
    r"""$\nabla_y\varphi_\mu$ at $(x, y)$, the gradients it is built from, and its
    pullback
    $w \mapsto (\nabla^2_{xy}\varphi_\mu\, w,\ \nabla^2_{yy}\varphi_\mu\, w)$."""

    grad_y_phi: PyTree[Array]
    upper: Scalar
    grad_x_upper: PyTree[Array]
    grad_y_upper: PyTree[Array]
    grad_y_lower: PyTree[Array]
    pullback: Any


def averaged_gradient(
    problem: BilevelProblem,
    mu: Scalar,
    upper_batch: Any,
    lower_batch: Any,
    upper_weight: Scalar = 1.0,
):
    r"""$(x, y) \mapsto \nabla_y\varphi_\mu(x, y)$ with
    $\varphi_\mu = \mu\omega F + (1 - \mu) f$ (upper $F$, lower $f$, $\omega$ =
    `upper_weight`), returning as auxiliary output $(F, \nabla_x F, \nabla_y F,
    \nabla_y f)$."""
    weight = mu * upper_weight

    def fn(x, y):
        value, (grad_x_f, grad_y_f) = jax.value_and_grad(problem.upper, argnums=(0, 1))(
            x, y, upper_batch
        )
        grad_y_g = jax.grad(problem.lower, argnums=1)(x, y, lower_batch)
        grad_y_phi = jtu.tree_map(
            lambda a, b: weight.astype(a.dtype) * a + (1 - mu).astype(b.dtype) * b,
            grad_y_f,
            grad_y_g,
        )
        return grad_y_phi, (value, grad_x_f, grad_y_f, grad_y_g)

    return fn


def linearise(
    problem: BilevelProblem,
    mu: Scalar,
    x: PyTree[Array],
    y: PyTree[Array],
    upper_batch: Any,
    lower_batch: Any,
    upper_weight: Scalar = 1.0,
) -> _Linearisation:
    r"""One VJP of $(x, y) \mapsto \nabla_y\varphi_\mu(x, y)$: its pullback of a
    multiplier $w$ gives the mixed product
    $\nabla_x\langle\nabla_y\varphi_\mu, w\rangle$ and the Hessian-vector product
    $\nabla^2_{yy}\varphi_\mu\, w$ (the Hessian is symmetric, so the VJP in $y$ is
    the HVP). No Hessian is formed."""
    fn = averaged_gradient(problem, mu, upper_batch, lower_batch, upper_weight)
    grad_y_phi, pullback, aux = jax.vjp(fn, x, y, has_aux=True)
    return _Linearisation(grad_y_phi, *aux, pullback=pullback)


class SLBAMM(AbstractBilevelSolver):
    r"""sl-BAMM, the single-loop averaged method of multipliers (Liu et al., 2023), for
    $\min_{x \in X} F(x, y)$ s.t. $y \in \arg\min_y f(x, y)$ with a lower level
    $f(x, \cdot)$ that is convex but possibly *merely* convex, so that the argmin may
    be a set and the IFT system is singular. (Paper notation: $F$ is the problem's
    `upper`, $f$ its `lower`.)

    It replaces $f$ by the averaged objective
    $\varphi_\mu(x, y) = \mu\omega F(x, y) + (1 - \mu) f(x, y)$,
    $\mu_k = \mu_0/(k+1)^{1/p}$, whose Hessian in $y$ is positive definite when
    $F(x, \cdot)$ is strongly convex, and takes one step per iteration on each equation
    of the KKT system of $\min F$ s.t. $\nabla_y\varphi_\mu = 0$ with multiplier $v$:

    - $y^{k+1} = y^k - s\,\nabla_y\varphi_{\mu_k}(x^k, y^k)$;
    - $r^k = H_k v^k - \nabla_y F(x^k, y^k)$ with $H_k = \nabla^2_{yy}\varphi_{\mu_k}$,
      $v^{k+1} = v^k - \eta_k r^k$;
    - $x^{k+1} = P_X\big(x^k - \alpha_k[\nabla_x F(x^k, y^k) -
      \nabla^2_{xy}\varphi_{\mu_k}(x^k, y^k)\, v^k]\big)$, where
      $\nabla^2_{xy}\varphi\, v = \nabla_x\langle\nabla_y\varphi, v\rangle$.

    With `sequential=False` all three updates read $(x^k, y^k, v^k)$ (Jacobi form, as
    the authors' code); with `sequential=True` (default) they run Gauss-Seidel style:
    $y^{k+1}$ first, then $v^{k+1}$ and the $x$ step at $(x^k, y^{k+1})$, the $x$ step
    using $v^{k+1}$. $v^0 = 0$. The paper's weight is $\omega = 1$.

    With `v_step="line_search"` (default, as the authors' merely convex script),
    $\eta_k = \|r^k\|^2 / \langle r^k, H_k r^k\rangle$, the exact minimiser of
    $\frac12 v^\top H_k v - \nabla_y F^\top v$ along $-r^k$, clipped to
    $[0, \eta_{\max}]$ (zero for non-positive curvature), so a Hessian that is not
    positive definite cannot blow the multiplier up. With `v_step="fixed"` and with
    `x_lr="strategy"`, $\eta_k$ and $\alpha_k$ follow one of the paper's strategies
    (as implemented in the authors' BOAT toolbox), $\kappa_k = k + 1$:

    | strategy | $\eta_k$ (`v_step="fixed"`) | $\alpha_k$ (`x_lr="strategy"`) |
    |---|---|---|
    | `"s1"` | $\kappa_k^{-\tau/2}\mu_k^2 s$ | $\kappa_k^{-3\tau/2}\mu_k^7 s$ |
    | `"s2"` | $\kappa_k^{-\tau/2}\mu_k s$ | $\kappa_k^{-3\tau/2}\mu_k^5 s$ |
    | `"s3"` | $\kappa_k^{-\tau/2} s$ | $\kappa_k^{-3\tau/2}\mu_k^3 s$ |

    **Default steps, from the problem** (an explicit value always wins). At step 0,
    power iterations on Hessian-vector products give the largest and smallest
    eigenvalues $L_F, m_F$ of $\nabla^2_{yy}F$ and $L_f, m_f$ of $\nabla^2_{yy} f$, and
    `hyper_curvature` (in `bilevel._stepsize`) the curvature $L_\Phi$ of the averaged
    problem's hyper-objective. Then, with $c = 1$ for deterministic data and $1/2$ for
    minibatches:

    - $\omega = L_f/L_F$: $\mu$ is the share of $F$ in the curvature of
      $\varphi_\mu$, whatever the scales of $F$ and $f$;
    - $s_k = c/\max(\mu_k\omega L_F + (1 - \mu_k) L_f, \hat L_k)$, where $\hat L_k$
      follows the curvature of $\varphi_{\mu_k}$ by one warm-started power iteration
      per step (a curvature that grows, e.g. with a weight decay $e^{x}$, shrinks the
      step);
    - $\alpha_k = c/(2\kappa_k L_\Phi)$ with $\kappa_k = \max(\mu_k\omega L_F +
      (1-\mu_k)L_f, \hat L_k)/(\mu_k\omega m_F + (1-\mu_k)m_f)$: a safe step on the
      hyper-objective, slowed by the number of steps $y$ and $v$ need to follow a move
      of $x$ (which grows with the tracked curvature $\hat L_k$); for a merely convex
      lower level ($m_f = 0$) it shrinks like $\mu_k$, the coupling of the paper's
      strategies;
    - $\eta_{\max} = 10^3 s_k$.

    Multiplying $f$ by $s$ or $F$ by $t$ leaves the iterates $x^k, y^k$ unchanged (up to
    rounding). Each step costs one gradient of $F$ and $f$, and one VJP of
    $\nabla_y\varphi_\mu$ pulled back twice (Jacobi with a fixed $v$ step: once;
    Gauss-Seidel: three times, plus a second gradient; one more for the curvature
    tracking when $s$ is derived); no Hessian is formed and there is no inner loop.

    **Arguments:**

    - `s`: lower-level step $s$ (default: derived).
    - `mu0`: $\mu_0 \in [0, 1)$ (default 0.5). $\mu_0 = 0$ turns the averaging off (no
      averaging is needed for a strongly convex lower level, which then converges
      without the $O(\mu_k)$ bias).
    - `p`: $p > 0$ in $\mu_k = \mu_0/(k+1)^{1/p}$ (default 1.5: the averaging bias of a
      strongly convex problem decays like $k^{-2/3}$; the paper's scripts use 10).
    - `upper_weight`: $\omega$ (default: derived; 1 is the paper's averaging).
    - `tau`: $\tau \ge 0$ in the step decays of the table and of an explicit `x_lr`
      (default 1/40).
    - `strategy`: `"s1"`, `"s2"` or `"s3"` (default).
    - `v_step`: `"line_search"` (default) or `"fixed"` ($\eta_k$ from the table).
    - `sequential`: Gauss-Seidel (default) or Jacobi updates.
    - `eta_max`: upper clip of the line-searched $\eta_k$ (default: derived).
    - `x_lr`: `None` (default, derived), a number ($\alpha_k =
      \kappa_k^{-3\tau/2}\,$`x_lr`) or `"strategy"` (the table).

    Metrics, at the point the multiplier and $x$ steps read: `upper_loss` $F$;
    `grad_norm`, the norm of the hypergradient estimate $d = \nabla_x F -
    \nabla^2_{xy}\varphi_\mu v$ ($\|(x - P_X(x - \alpha_k d))/\alpha_k\|$ with a set
    $X$); `lower_residual` $\|\nabla_y f\|$; `averaged_residual`
    $\|\nabla_y\varphi_\mu\|$; `multiplier_residual` $\|H v - \nabla_y F\|$;
    `kkt_residual`, the sum of the last three and `grad_norm`; and `mu`, `lower_step`
    ($s_k$), `eta`, `alpha`.

    !!! info "Deviations"
        - $\mu_k$ really decays: the authors' merely convex script freezes the averaging
          weight at 0.1 (a default argument bound at definition time).
        - The weight $\omega$, the derived steps, $\mu_0 = 0$ and Gauss-Seidel updates
          by default are additions. The paper's $\alpha_k \propto \mu_k^3$ stops $x$ as
          $\mu_k \to 0$, which a strongly convex lower level does not need; with the
          derived $\alpha_k$ and Jacobi updates a merely convex toy diverged (the $x$
          step reads a multiplier one step old), with Gauss-Seidel it converges.
        - The problem's `optimality` is not used: the method needs $\nabla_y f$ itself.
          Lower-level projections and constraints are rejected at `init`.

    ??? cite "References"
        ```bibtex
        @inproceedings{liu2023averaged,
          title={Averaged Method of Multipliers for Bi-Level Optimization without
                 Lower-Level Strong Convexity},
          author={Liu, Risheng and Liu, Yaohua and Yao, Wei and Zeng, Shangzhi and
                  Zhang, Jin},
          booktitle={International Conference on Machine Learning},
          year={2023},
          note={arXiv:2302.03407}
        }
        ```
    """

    supports: ClassVar[frozenset[str]] = frozenset(
        {"single_block", "project_x", "stochastic"}
    )

    s: float | None = positive(None, optional=True)
    mu0: float = hyperparameter(0.5, Bounds(0.0, 1.0, high_open=True))
    p: float = positive(1.5)
    upper_weight: float | None = positive(None, optional=True)
    tau: float = nonnegative(1 / 40)
    strategy: Strategy = choice("s3", tuple(_MU_POWERS))
    v_step: VStep = choice("line_search", ("line_search", "fixed"))
    sequential: bool = eqx.field(static=True, default=True)
    eta_max: float | None = positive(None, optional=True)
    x_lr: float | str | None = positive(None, optional=True, words=("strategy",))

    def __check_init__(self):
        if not isinstance(self.sequential, bool):
            raise ValueError(
                f"SLBAMM: `sequential` must be a bool, got {self.sequential!r}"
            )
        if isinstance(self.mu0, int | float) and self.mu0 == 0:
            if self.x_lr == "strategy":
                raise ValueError(
                    "SLBAMM: `mu0=0` makes the strategy's x step mu_k^q * s zero; use "
                    "`x_lr=None` (derived) or a number"
                )
            if self.v_step == "fixed" and self.strategy != "s3":
                raise ValueError(
                    f"SLBAMM: `mu0=0` makes the fixed v step of strategy "
                    f"{self.strategy!r} zero; use strategy='s3' or v_step='line_search'"
                )

    def _estimate(self, problem, x, y, upper_batch, lower_batch, key, state):
        r"""At step 0: the spectra of $\nabla^2_{yy} F$ and $\nabla^2_{yy} f$ (power
        iterations) and, unless `x_lr` is given, the curvature $L_\Phi$ of the averaged
        problem's hyper-objective (`hyper_curvature`)."""
        upper_key, lower_key, hyper_key = jr.split(key, 3)

        def spectrum(fn, key):
            _, hvp = jax.linearize(jax.grad(fn), y)
            return spectrum_bounds(hvp, y, key)

        upper, upper_min = spectrum(
            lambda v: problem.upper(x, v, upper_batch), upper_key
        )
        lower, lower_min = spectrum(
            lambda v: problem.lower(x, v, lower_batch), lower_key
        )
        curvatures = eqx.tree_at(
            lambda c: (c.upper, c.upper_min, c.lower, c.lower_min),
            state.curvatures,
            (upper, upper_min, lower, lower_min),
        )
        if self.x_lr is not None:
            return curvatures
        weight = self._upper_weight(curvatures)
        mu = jnp.asarray(self.mu0, upper.dtype)

        def gradient(x_, y_):
            fn = averaged_gradient(problem, mu, upper_batch, lower_batch, weight)
            return fn(x_, y_)[0]

        hyper = hyper_curvature(
            lambda x_, y_: problem.upper(x_, y_, upper_batch), gradient, x, y, hyper_key
        )
        return eqx.tree_at(lambda c: c.hyper, curvatures, hyper)

    def _upper_weight(self, curvatures: _Curvatures | None) -> Scalar:
        r"""$\omega$: `upper_weight`, or $L_f/L_F$ so that $\mu\omega F$ and
        $(1 - \mu) f$ weigh in $\nabla^2_{yy}\varphi_\mu$ as $\mu$ and $1 - \mu$ (at
        most $10^6$, for an upper objective nearly flat in $y$)."""
        if self.upper_weight is not None:
            return jnp.asarray(self.upper_weight)
        lower = curvatures.lower
        floor = jnp.maximum(1e-6 * lower, jnp.finfo(lower.dtype).tiny)
        return lower / jnp.maximum(curvatures.upper, floor)

    def _schedule(
        self, step: Int[Array, ""], curvatures: _Curvatures | None, dtype, safety
    ) -> dict[str, Scalar]:
        r"""$\mu_k$, $\omega$, the lower step $s_k$, the fixed $v$ step $\eta_k$ and
        its clip $\eta_{\max}$ at step $k$ = `step`, and the $x$ step $\alpha_k$ unless
        it is adaptive (`x_lr=None`)."""
        kappa = jnp.asarray(step + 1, dtype)
        mu = jnp.asarray(self.mu0, dtype) / kappa ** (1 / jnp.asarray(self.p, dtype))
        tau = jnp.asarray(self.tau, dtype)
        weight = self._upper_weight(curvatures).astype(dtype)
        if self.s is None:
            bound = mu * weight * curvatures.upper + (1 - mu) * curvatures.lower
            s = safety / jnp.maximum(bound, curvatures.tracked)
        else:
            s = jnp.asarray(self.s, dtype)
        eta_power, alpha_power = _MU_POWERS[self.strategy]
        eta = kappa ** (-tau / 2) * mu**eta_power * s
        eta_max = 1e3 * s if self.eta_max is None else jnp.asarray(self.eta_max, dtype)
        steps = {"mu": mu, "weight": weight, "s": s, "eta": eta, "eta_max": eta_max}
        if self.x_lr is None:
            steps["alpha"] = self._adaptive_x_step(curvatures, mu, weight, safety)
        else:
            base = mu**alpha_power * s if self.x_lr == "strategy" else self.x_lr
            steps["alpha"] = jnp.asarray(kappa ** (-1.5 * tau) * base, dtype)
        return steps

    def _adaptive_x_step(self, c: _Curvatures, mu, weight, safety) -> Scalar:
        r"""$\alpha_k = 1/(2\kappa_k L_\Phi)$: a safe step $1/(2L_\Phi)$ on the
        hyper-objective, slowed by the condition number $\kappa_k \le \max(\mu_k\omega
        L_F + (1 - \mu_k) L_f, \hat L_k)/(\mu_k\omega m_F + (1 - \mu_k) m_f)$ of
        $\nabla^2_{yy}\varphi_{\mu_k}$, the number of steps the lower iterate and the
        multiplier need to follow a move of $x$. For a merely convex lower level
        ($m_f = 0$) this makes $\alpha_k$ shrink like $\mu_k$."""
        largest = jnp.maximum(mu * weight * c.upper + (1 - mu) * c.lower, c.tracked)
        smallest = mu * weight * c.upper_min + (1 - mu) * c.lower_min
        condition = largest / jnp.maximum(smallest, 1e-6 * largest)
        tiny = jnp.finfo(c.hyper.dtype).tiny
        return safety / (2 * jnp.maximum(condition * c.hyper, tiny))

    def _init(self, problem, x0, y0, key):
        dtype = result_dtype(y0)
        zero = jnp.zeros((), dtype)
        curvatures = None
        if self.s is None or self.upper_weight is None or self.x_lr is None:
            direction = random_direction(key, y0)
            curvatures = _Curvatures(*[zero] * 6, direction)
        v0 = jtu.tree_map(jnp.zeros_like, y0)
        return _SLBAMMState(x0, y0, v0, jnp.array(0), curvatures)

    def _multiplier_step(self, lin: _Linearisation, v, h_v, steps):
        r"""$v - \eta r$ with $r = H v - \nabla_y F$ (`h_v` is $H v$); also returns
        the $\eta$ used."""
        residual = tree_sub(h_v, lin.grad_y_upper)
        if self.v_step == "fixed":
            eta = steps["eta"]
        else:
            _, h_residual = lin.pullback(residual)
            curvature = tree_dot(residual, h_residual)
            convex = curvature > 0
            ratio = tree_dot(residual, residual) / jnp.where(convex, curvature, 1)
            eta = jnp.where(convex, jnp.minimum(ratio, steps["eta_max"]), 0)
            eta = eta.astype(steps["eta"].dtype)
        return tree_axpy(-eta, residual, v), eta

    def _step(self, problem, state, data, key):
        upper_key, lower_key = jr.split(key)
        upper_batch = data.upper_batch(upper_key, state.step)
        lower_batch = data.lower_batch(lower_key, state.step)
        x, y, v = state.x, state.y, state.v
        dtype = result_dtype(y)
        safety = 1.0 if data.deterministic else 0.5
        curvatures = state.curvatures
        if curvatures is not None:
            curvatures = lax.cond(
                state.step == 0,
                lambda: self._estimate(
                    problem, x, y, upper_batch, lower_batch, jr.fold_in(key, 1), state
                ),
                lambda: curvatures,
            )
        steps = self._schedule(state.step, curvatures, dtype, safety)
        mu, weight, s = steps["mu"], steps["weight"], steps["s"]

        if self.sequential:
            gradient = averaged_gradient(problem, mu, upper_batch, lower_batch, weight)
            new_y = tree_axpy(-s, gradient(x, y)[0], y)
            lin = linearise(problem, mu, x, new_y, upper_batch, lower_batch, weight)
            _, h_v = lin.pullback(v)
            new_v, eta = self._multiplier_step(lin, v, h_v, steps)
            mixed, h_multiplier = lin.pullback(new_v)
        else:
            lin = linearise(problem, mu, x, y, upper_batch, lower_batch, weight)
            new_y = tree_axpy(-s, lin.grad_y_phi, y)
            mixed, h_multiplier = lin.pullback(v)
            new_v, eta = self._multiplier_step(lin, v, h_multiplier, steps)

        if self.s is None:
            curvatures = _track(curvatures, lin)
        direction = tree_sub(lin.grad_x_upper, mixed)
        alpha = steps["alpha"]
        new_x = apply_project_x(problem, tree_axpy(-alpha, direction, x))
        if problem.project_x is None:
            mapping = direction
        else:
            mapping = tree_scale(1 / alpha, tree_sub(x, new_x))
        grad_norm = tree_norm(mapping)
        averaged_residual = tree_norm(lin.grad_y_phi)
        multiplier_residual = tree_norm(tree_sub(h_multiplier, lin.grad_y_upper))
        metrics = {
            "upper_loss": lin.upper,
            "grad_norm": grad_norm,
            "lower_residual": tree_norm(lin.grad_y_lower),
            "averaged_residual": averaged_residual,
            "multiplier_residual": multiplier_residual,
            "kkt_residual": averaged_residual + multiplier_residual + grad_norm,
            "mu": mu,
            "lower_step": s,
            "eta": eta,
            "alpha": alpha,
        }
        new_state = _SLBAMMState(new_x, new_y, new_v, state.step + 1, curvatures)
        return new_state, metrics

    def _params(self, state):
        return state.x, state.y


def _track(curvatures: _Curvatures, lin: _Linearisation) -> _Curvatures:
    r"""One power iteration with $\nabla^2_{yy}\varphi_\mu$, warm-started from the last
    direction, so that the lower step follows a curvature that grows between two
    estimates (e.g. a regularisation weight $e^x$ growing with $x$)."""
    _, product = lin.pullback(curvatures.direction)
    norm = tree_norm(product)
    direction = tree_scale(1 / jnp.where(norm > 0, norm, 1), product)
    direction = jtu.tree_map(
        lambda new, old: jnp.where(norm > 0, new, old), direction, curvatures.direction
    )
    return eqx.tree_at(
        lambda c: (c.tracked, c.direction), curvatures, (norm, direction)
    )
