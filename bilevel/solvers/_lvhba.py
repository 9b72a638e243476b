r"""LV-HBA: a Hessian-free single-loop method for bilevel problems whose lower level has
constraints $h(x, y) \le 0$ coupling both levels (Yao, Yu, Zeng, Zhang, ICLR 2024)."""

import math
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from jaxtyping import Array, Float, Int, PyTree, Scalar

from .._misc import tree_axpy, tree_dot, tree_norm, tree_scale, tree_sub
from .._problem import BilevelProblem, apply_project_x, apply_project_y
from .._solver import (
    AbstractBilevelSolver,
    Bounds,
    count,
    hyperparameter,
    nonnegative,
    positive,
)
from .._stepsize import hessian_norm, hyper_curvature, jacobian_norm, spectrum_bounds


class _Settings(eqx.Module):
    r"""The parameters of one step: the reformulation's $\gamma_1, \gamma_2, c_0$, the
    step sizes $\alpha, \beta, \eta$, and `x_rate`: the $x$ step is
    $\max(\alpha, c_k\,$`x_rate`$)$ (`x_rate` = 0: the $x$ step is $\alpha$)."""

    alpha: Scalar
    x_rate: Scalar
    beta: Scalar
    eta: Scalar
    gamma1: Scalar
    gamma2: Scalar
    c0: Scalar


class _LVHBAState(eqx.Module):
    x: PyTree[Array]
    y: PyTree[Array]
    z: Float[Array, " l"]
    theta: PyTree[Array]
    lam: Float[Array, " l"]
    step: Int[Array, ""]
    settings: _Settings | None


def _dtype_of(tree: PyTree[Array]):
    return jnp.result_type(*jtu.tree_leaves(tree))


def _constraints(problem: BilevelProblem, y_like: PyTree[Array]):
    """$h$, or a function returning no constraints ($l = 0$) if the problem has none."""
    if problem.lower_constraints is not None:
        return problem.lower_constraints
    empty = jnp.zeros((0,), _dtype_of(y_like))
    return lambda x, y: empty


def _project_joint(
    problem: BilevelProblem, x: PyTree, y: PyTree
) -> tuple[PyTree, PyTree]:
    r"""$\mathrm{Proj}_C(x, y)$: the problem's `project_feasible`, or
    $(P_X x, P_Y y)$ when the lower level has no coupled constraints."""
    if problem.project_feasible is not None:
        return problem.project_feasible(x, y)
    return apply_project_x(problem, x), apply_project_y(problem, x, y)


def _check_projection(problem: BilevelProblem, x0: PyTree, y0: PyTree) -> None:
    """`project_feasible(x, y)` must return an `(x, y)` pair shaped like its input."""
    if problem.project_feasible is None:
        return
    expected = jax.eval_shape(lambda x, y: (x, y), x0, y0)
    out = jax.eval_shape(problem.project_feasible, x0, y0)
    same = jtu.tree_structure(out) == jtu.tree_structure(expected) and all(
        (a.shape, a.dtype) == (b.shape, b.dtype)
        for a, b in zip(jtu.tree_leaves(out), jtu.tree_leaves(expected))
    )
    if not same:
        raise ValueError(
            "LVHBA: `project_feasible(x, y)` must return a pair (x, y) with the "
            f"structure, shapes and dtypes of (x0, y0) = {expected}; got {out}"
        )


class LVHBA(AbstractBilevelSolver):
    r"""LV-HBA, the proximal Lagrangian value-function method for lower levels with
    coupled constraints (Yao, Yu, Zeng, Zhang, "Constrained Bi-Level Optimization:
    Proximal Lagrangian Value function Approach and Hessian-free Algorithm", ICLR 2024).

    Problem: $\min_{x \in X, y \in Y} F(x, y)$ s.t.
    $y \in \arg\min_{\theta \in Y} \{f(x, \theta) : g(x, \theta) \le 0\}$, with
    $F$ = `problem.upper`, $f$ = `problem.lower`, $g$ = `problem.lower_constraints`
    ($h$ in [`bilevel.BilevelProblem`][]) and
    $C = \{(x, y) \in X \times Y : g(x, y) \le 0\}$ (`problem.project_feasible`).

    With the proximal Lagrangian
    $L_\gamma(\theta, \lambda; x, y, z) = f(x, \theta) + \lambda^\top g(x, \theta)
    + \frac{1}{2\gamma_1}\|\theta - y\|^2 - \frac{1}{2\gamma_2}\|\lambda - z\|^2$
    and its value function
    $v_\gamma(x, y, z) = \min_{\theta \in Y} \max_{\lambda \ge 0} L_\gamma$, the
    method takes projected gradient steps on the penalised merit $F/c_k + f - v_\gamma$
    over $C \times Z$, tracking the saddle point
    $(\theta^*, \lambda^*)$ of $L_\gamma$ by one projected descent-ascent step per
    iteration. Iteration $k$ (Algorithm 1):

    1. $\theta^{k+1} = P_Y(\theta^k - \eta\, d_\theta)$,
       $\lambda^{k+1} = P_Z(\lambda^k - \eta\, d_\lambda)$ with
       $d_\theta = \nabla_\theta f(x^k, \theta^k) + \nabla_\theta g(x^k, \theta^k)^\top
       \lambda^k + (\theta^k - y^k)/\gamma_1$ and
       $d_\lambda = -g(x^k, \theta^k) + (\lambda^k - z^k)/\gamma_2$;
    2. $(x^{k+1}, y^{k+1}) = \mathrm{Proj}_C(x^k - \alpha_x d_x, y^k - \alpha d_y)$,
       $z^{k+1} = P_Z(z^k - \beta d_z)$, where
       $d_x = \nabla_x F/c_k + \nabla_x f(x^k, y^k) - \nabla_x f(x^k, \theta^{k+1})
       - \nabla_x g(x^k, \theta^{k+1})^\top \lambda^{k+1}$,
       $d_y = \nabla_y F/c_k + \nabla_y f(x^k, y^k) - (y^k - \theta^{k+1})/\gamma_1$ and
       $d_z = (z^k - \lambda^{k+1})/\gamma_2$: the Danskin gradients of $v_\gamma$ with
       $(\theta^{k+1}, \lambda^{k+1})$ held constant (see `_value_function_grad`).

    Hessian-free: only gradients of $F$, $f$ and vector-Jacobian products of $g$ (the
    default step sizes add Hessian-vector products, see below). The penalty is
    $c_k = c_0(k+1)^p$ and $Z = [0, r]^l$. With no constraints ($l = 0$), $v_\gamma$ is
    the Moreau envelope of $f(x, \cdot)$ and this is a single-loop Moreau-envelope
    method. The initial $(x^0, y^0)$ is projected onto $C$; $\theta^0 = P_Y(y^0)$ and
    $\lambda^0 = z^0 = P_Z(\text{multiplier\_init})$. The paper uses one step
    $\alpha_x = \alpha$ for $(x, y)$.

    Each step draws one upper batch (for $F$) and one lower batch (for every evaluation
    of $f$ in that step, so $f(x, y) - f(x, \theta)$ uses the same sample).

    **Default settings, from the problem** (explicit values win). At step 0 and every
    `curvature_every` steps, power iterations on Hessian-vector products at
    $(x^k, y^k)$ estimate $L_f = \|\nabla^2_{yy} f\|$, the joint curvatures of $F$ and
    $f$ in $(x, y)$, and $C = \|\nabla_y g\|$; then (reasons on the solver's docs page,
    $c = 1$ for deterministic data, $1/2$ for minibatches):
    $\gamma_1 = 10/L_f$, $\gamma_2 = L_\theta/C^2$ with $L_\theta = L_f + 1/\gamma_1$,
    $c_0 = L_F/L_f$ (joint curvatures), all three fixed at step 0;
    $\eta = c/(L_\theta + 1/\gamma_2 + C)$; $\alpha = \min(c/(2L), \eta/2)$ with $L$ a
    bound on the merit's curvature; $\beta = c\gamma_2/2$. Without coupled
    constraints, $\alpha_x = \max(\alpha, c_k\,c/(2\kappa L_\Phi))$, from the curvature
    $L_\Phi$ of the hyper-objective and the condition number $\kappa$ of
    $\nabla^2_{yy} f$ (near the lower solution $d_x \approx \nabla\Phi/c_k$);
    otherwise $\alpha_x = \alpha$. Multiplying $f$ by $s$ or $F$ by $t$ leaves the
    iterates unchanged (up to rounding). The penalty's $O(1/c_k)$ bias makes the method
    slow on strongly convex problems (tests' scale battery: 8% of the initial
    hyper-objective gap left after 2000 steps).

    !!! warning "The $\gamma$ and $c_k$ conventions"
        `gamma1`, `gamma2` are the paper's $\gamma$: the proximal terms are
        $\|\cdot\|^2/(2\gamma)$. The official SVM, data-cleaning and federated scripts
        store the *reciprocal* (they write `gama1 * (theta - y)`, e.g. `gama1 = 0.1`
        for $\gamma_1 = 10$); convert with `gamma1 = 1 / gama1`. Those scripts also put
        a weight $w_k = (k+1)^{-p}$ on $\nabla F$: that is $1/c_k$ with `c0 = 1`.

    **Arguments** (default: derived, unless stated):

    - `alpha`: step $\alpha$ of $y$ (and of $x$ unless `x_lr` is given).
    - `x_lr`: step $\alpha_x$ of $x$ (default: `alpha` if it is given, else derived).
    - `beta`: step $\beta$ of the anchor $z$.
    - `eta`: step $\eta$ of the saddle trackers $(\theta, \lambda)$.
    - `gamma1`, `gamma2`: proximal parameters $\gamma_1, \gamma_2 > 0$;
      $L_\gamma$ must be strongly convex in $\theta$, i.e. $\gamma_1 < 1/\rho_f$ for a
      $\rho_f$-weakly convex $f$ (any $\gamma_1$ for convex $f$).
    - `c0`, `p`: penalty schedule $c_k = c_0 (k+1)^p$ ($p$ default 0.3, the authors';
      the theory asks $p \in (0, 1/2)$, its best rate is at $p = 1/4$). With the
      authors' steps, a small $c_0$ (heavy weight on $F$ early) made their toy script
      diverge.
    - `r`: multiplier box $Z = [0, r]^l$ (default `math.inf`: $\mathbb{R}^l_+$). With
      the authors' steps a wide box made their toy diverge; with the derived steps the
      same toy converges without one.
    - `equality`: read every `lower_constraints` as an equality $g(x, y) = 0$; the
      multipliers then live in $[-r, r]^l$ and `project_feasible` must project onto
      $\{g = 0\}$. (Equivalently, and within the `h <= 0` contract, pass the pair
      $(g, -g)$.)
    - `multiplier_init`: initial value of every entry of $\lambda$ and $z$ (default 0),
      clipped into $Z$.
    - `curvature_every`: steps between two curvature estimates (default 100).

    Metrics: `upper_loss` $F(x^k, y^k)$; `grad_norm`, the $x$ part of the projected
    gradient mapping, $\|(x^k - x^{k+1})/\alpha_x\|$ (the penalised hypergradient);
    `lower_residual`, the optimality residual of $y^k$: $\|\Phi(x^k, y^k)\|$ for the
    problem's condition, or with coupled constraints the projected-gradient residual
    $\|y - P(y - \gamma_1\nabla_y f)\|/\gamma_1$, $P$ the $y$ part of
    `project_feasible` at $x^k$ (the projection onto $\{y \in Y : g(x^k, y) \le 0\}$
    when `project_feasible` leaves $x$ in place); `merit_mapping`, the norm of the whole
    mapping $((x^k - x^{k+1})/\alpha_x, (y^k - y^{k+1})/\alpha, (z^k - z^{k+1})/\beta)$;
    `value_gap` $f(x^k, y^k) - L_\gamma(\theta^{k+1}, \lambda^{k+1}; x^k, y^k, z^k)
    \approx f - v_\gamma \ge 0$; `constraint_violation` $\|\max(g(x^k, y^k), 0)\|$
    ($\|g\|$ with `equality`); `saddle_residual` $\|(\theta^k - \theta^{k+1},
    \lambda^k - \lambda^{k+1})\|/\eta$; `penalty` $c_k$; and the steps `x_step`,
    `alpha`, `eta`.

    A problem with `lower_constraints` must give `project_feasible` (checked at
    `init`); $\theta$ is projected with `project_y`.

    !!! tip "Choosing the steps by hand"
        - Keep $\eta > \alpha$. Along directions where $f(x, \cdot)$ is flat, the
          $y$-step pushes $y$ away from $\theta$ at rate $\alpha/\gamma_1$ while
          $\theta$ follows at rate $\eta/\gamma_1$; with $\eta \le \alpha$,
          $y - \theta$ grows geometrically.
        - The descent-ascent step needs roughly $\eta \lesssim (1/\gamma_1 + 1/\gamma_2)
          / \|\nabla_\theta g\|^2$: many coupled constraints (a large Jacobian) call for
          a small $\gamma_2$ or a small $\eta$.
        - Where $f$ is flat (linear in part of $y$), a small $\gamma_1$ makes
          $f - v_\gamma$ flat too: the penalty then cannot move $y$ there.

    ??? cite "References"
        ```bibtex
        @inproceedings{yao2024lvhba,
          title={Constrained Bi-Level Optimization: Proximal {L}agrangian Value
                 Function Approach and {H}essian-free Algorithm},
          author={Yao, Wei and Yu, Chengming and Zeng, Shangzhi and Zhang, Jin},
          booktitle={International Conference on Learning Representations},
          year={2024}
        }
        ```
    """

    supports: ClassVar[frozenset[str]] = frozenset(
        {"single_block", "project_x", "project_y", "lower_constraints", "stochastic"}
    )

    alpha: float | None = positive(None, optional=True)
    x_lr: float | None = positive(None, optional=True)
    beta: float | None = positive(None, optional=True)
    eta: float | None = positive(None, optional=True)
    gamma1: float | None = positive(None, optional=True)
    gamma2: float | None = positive(None, optional=True)
    c0: float | None = positive(None, optional=True)
    p: float = nonnegative(0.3)
    r: float = eqx.field(default=math.inf)
    multiplier_init: float = hyperparameter(0.0, Bounds())
    equality: bool = eqx.field(static=True, default=False)
    curvature_every: int = count(100)

    def __check_init__(self):
        # `r` may be infinite (Z = R^l_+), which the declared bounds do not express.
        if not isinstance(self.r, jax.core.Tracer) and not float(self.r) > 0:
            raise ValueError(f"LVHBA: `r` must be > 0 (inf allowed), got {self.r!r}")
        if not isinstance(self.equality, bool):
            raise ValueError(f"LVHBA: `equality` must be a bool, got {self.equality!r}")

    # -- pieces of the update ----------------------------------------------------------

    def _penalty(self, settings: _Settings, step: Int[Array, ""], dtype) -> Scalar:
        """$c_k = c_0 (k+1)^p$."""
        return settings.c0 * jnp.asarray(step + 1, dtype) ** self.p

    def _fixed_settings(self) -> _Settings:
        """The settings when every one is given."""
        names = ("beta", "eta", "gamma1", "gamma2", "c0")
        return _Settings(self.alpha, 0.0, *(getattr(self, name) for name in names))

    def _x_step(self, settings: _Settings, c_k: Scalar) -> Scalar:
        r"""The step of $x$: `x_lr`, or $\max(\alpha, c_k\,$`x_rate`$)$."""
        if self.x_lr is not None:
            return jnp.asarray(self.x_lr, c_k.dtype)
        return jnp.maximum(settings.alpha, c_k * settings.x_rate)

    def _derives(self) -> bool:
        return any(
            getattr(self, name) is None
            for name in ("alpha", "beta", "eta", "gamma1", "gamma2", "c0")
        )

    def _derive(self, problem, x, y, upper_batch, lower_batch, key, old, first, safety):
        r"""Settings from curvature estimates at $(x, y)$ (explicit values win; the
        reformulation's $\gamma_1, \gamma_2, c_0$ are fixed at step 0, the steps
        follow the estimates):

        - $\gamma_1 = 10/L_f$ with $L_f = \|\nabla^2_{yy} f\|$: then $f - v_\gamma$ is
          at least half of $f - \min f$ along every direction of curvature above
          $L_f/10$ (for a quadratic, $\gamma\lambda/(1 + \gamma\lambda)$ of it along an
          eigenvalue $\lambda$);
        - $\gamma_2 = L_\theta/C^2$ with $L_\theta = L_f + 1/\gamma_1$ and
          $C = \|\nabla_y g\|$ (no constraints: 1): the multiplier block of
          $L_\gamma$ is as curved as the coupling makes it;
        - $\eta = c/(L_\theta + 1/\gamma_2 + C)$, below the inverse Lipschitz
          constant of the descent-ascent field;
        - $c_0 = L_F/L_f$ (joint Hessians in $(x, y)$, at least $10^{-6}$): $F/c_0$
          and $f$ start with the same curvature, whatever the scales of $F$ and $f$;
        - $\alpha = \min(c/(2 L), \eta/2)$ with $L = \|\nabla^2(F/c_0 + f)\| +
          \|\nabla^2 f\| + 2/\gamma_1$, a bound on the curvature of the merit
          $F/c_0 + f - v_\gamma$ in $(x, y)$; below $\eta$, because along directions
          where $f$ is flat $y$ moves away from $\theta$ at rate $\alpha/\gamma_1$ while
          $\theta$ follows at rate $\eta/\gamma_1$;
        - $\beta = c\,\gamma_2/2$: $z$ moves half way to $\lambda$ per step.

        $c = 1$ for deterministic data, $1/2$ for minibatches.
        """
        keys = jr.split(key, 4)
        dtype = _dtype_of(y)

        def joint_norm(fn, key):
            return hessian_norm(lambda xy: fn(*xy), (x, y), key)

        lower_y = hessian_norm(lambda v: problem.lower(x, v, lower_batch), y, keys[0])
        lower_xy = joint_norm(lambda u, v: problem.lower(u, v, lower_batch), keys[1])
        upper_xy = joint_norm(lambda u, v: problem.upper(u, v, upper_batch), keys[2])
        if problem.lower_constraints is None:
            coupling = jnp.zeros((), dtype)
        else:
            h = problem.lower_constraints
            coupling = jacobian_norm(lambda v: h(x, v), y, keys[3])
        tiny = jnp.finfo(dtype).tiny

        def pick(name, derived, keep):
            value = getattr(self, name)
            if value is not None:
                return jnp.asarray(value, dtype)
            return jnp.where(first, derived, keep)

        gamma1 = pick("gamma1", 10 / jnp.maximum(lower_y, tiny), old.gamma1)
        curvature = lower_y + 1 / gamma1
        gamma2_derived = jnp.where(
            coupling > 0, curvature / jnp.maximum(coupling, tiny) ** 2, 1.0
        )
        gamma2 = pick("gamma2", gamma2_derived, old.gamma2)
        c0_derived = jnp.maximum(upper_xy, 1e-6 * lower_xy) / jnp.maximum(
            lower_xy, tiny
        )
        c0 = pick("c0", c0_derived, old.c0)
        eta = safety / (curvature + 1 / gamma2 + coupling)
        merit = joint_norm(
            lambda u, v: (
                problem.upper(u, v, upper_batch) / c0 + problem.lower(u, v, lower_batch)
            ),
            keys[2],
        )
        alpha = jnp.minimum(safety / (2 * (merit + lower_xy + 2 / gamma1)), eta / 2)
        beta = safety * gamma2 / 2
        x_rate = jnp.zeros((), dtype)
        if self.alpha is None and problem.lower_constraints is None:
            x_rate = self._reduced_rate(problem, x, y, upper_batch, lower_batch, key)
            x_rate = jnp.where(first, safety * x_rate, old.x_rate)
        return _Settings(
            pick("alpha", alpha, alpha),
            x_rate,
            pick("beta", beta, beta),
            pick("eta", eta, eta),
            gamma1,
            gamma2,
            c0,
        )

    def _reduced_rate(self, problem, x, y, upper_batch, lower_batch, key) -> Scalar:
        r"""$1/(2\kappa L_\Phi)$: a step on the hyper-objective $\Phi$ of curvature
        $L_\Phi$ (`hyper_curvature`), slowed by the condition
        number $\kappa$ of $\nabla^2_{yy} f$ so that $y$ and $\theta$ can follow. Near
        the lower solution the $x$ part of the merit's gradient is
        $\nabla\Phi/c_k$, hence the $x$ step $c_k/(2\kappa L_\Phi)$ (zero for a
        merely convex lower level, where $\kappa$ is taken as $10^6$)."""
        spectrum_key, hyper_key = jr.split(jr.fold_in(key, 2))

        def gradient(x_, y_):
            return jax.grad(problem.lower, argnums=1)(x_, y_, lower_batch)

        _, hvp = jax.linearize(lambda v: gradient(x, v), y)
        largest, smallest = spectrum_bounds(hvp, y, spectrum_key)
        condition = largest / jnp.maximum(smallest, 1e-6 * largest)
        hyper = hyper_curvature(
            lambda x_, y_: problem.upper(x_, y_, upper_batch), gradient, x, y, hyper_key
        )
        return 1 / (2 * jnp.maximum(condition * hyper, jnp.finfo(hyper.dtype).tiny))

    def _project_multiplier(self, lam: Float[Array, " l"]) -> Float[Array, " l"]:
        """$P_Z$: clip onto $[0, r]^l$ ($[-r, r]^l$ with `equality`)."""
        low = -self.r if self.equality else 0.0
        return jnp.clip(lam, low, self.r)

    def _value_function_grad(
        self,
        settings: _Settings,
        problem: BilevelProblem,
        x: PyTree[Array],
        y: PyTree[Array],
        z: Float[Array, " l"],
        theta: PyTree[Array],
        lam: Float[Array, " l"],
        batch: Any = None,
    ) -> tuple[Scalar, tuple[PyTree[Array], PyTree[Array], Float[Array, " l"]]]:
        r"""$L_\gamma(\theta, \lambda; x, y, z)$ and its gradient in $(x, y, z)$ with
        $(\theta, \lambda)$ held constant.

        At the saddle point $(\theta^*, \lambda^*)$ these are $v_\gamma$ and, by
        Danskin's theorem, $\nabla v_\gamma = (\nabla_x f(x, \theta^*) + \nabla_x g(x,
        \theta^*)^\top\lambda^*,\ (y - \theta^*)/\gamma_1,\ (\lambda^* - z)/\gamma_2)$;
        no derivative flows through $(\theta, \lambda)$.
        """
        theta, lam = jax.lax.stop_gradient((theta, lam))
        h = _constraints(problem, y)

        def lagrangian(x_):
            return problem.lower(x_, theta, batch) + jnp.dot(lam, h(x_, theta))

        value, grad_x = jax.value_and_grad(lagrangian)(x)
        diff_y = tree_sub(y, theta)
        diff_z = lam - z
        value = (
            value
            + tree_dot(diff_y, diff_y) / (2 * settings.gamma1)
            - jnp.dot(diff_z, diff_z) / (2 * settings.gamma2)
        )
        grad_y = tree_scale(1 / settings.gamma1, diff_y)
        return value, (grad_x, grad_y, diff_z / settings.gamma2)

    def _saddle_step(
        self,
        settings: _Settings,
        problem: BilevelProblem,
        x: PyTree[Array],
        y: PyTree[Array],
        z: Float[Array, " l"],
        theta: PyTree[Array],
        lam: Float[Array, " l"],
        batch: Any = None,
    ) -> tuple[PyTree[Array], Float[Array, " l"]]:
        r"""One projected gradient descent-ascent step on $L_\gamma(\cdot, \cdot; x, y,
        z)$: $\theta \leftarrow P_Y(\theta - \eta d_\theta)$,
        $\lambda \leftarrow P_Z(\lambda + \eta\, \partial_\lambda L_\gamma)$."""
        h = _constraints(problem, y)

        def lagrangian(theta_):
            values = h(x, theta_)
            return problem.lower(x, theta_, batch) + jnp.dot(lam, values), values

        grad_theta, h_theta = jax.grad(lagrangian, has_aux=True)(theta)
        d_theta = tree_axpy(1 / settings.gamma1, tree_sub(theta, y), grad_theta)
        d_lam = (lam - z) / settings.gamma2 - h_theta
        eta = settings.eta
        new_theta = apply_project_y(problem, x, tree_axpy(-eta, d_theta, theta))
        return new_theta, self._project_multiplier(lam - eta * d_lam)

    # -- the solver interface ----------------------------------------------------------

    def _init(self, problem, x0, y0, key):
        dtype = _dtype_of(y0)
        if problem.lower_constraints is not None:
            if problem.project_feasible is None:
                raise ValueError(
                    "LVHBA: the problem has `lower_constraints` but no "
                    "`project_feasible`; "
                    "give the projection onto {x in X, y in Y, h(x, y) <= 0} (LV-HBA "
                    "projects (x, y) onto it at every step)"
                )
            out = jax.eval_shape(problem.lower_constraints, x0, y0)
            if not isinstance(out, jax.ShapeDtypeStruct) or len(out.shape) != 1:
                raise ValueError(
                    "LVHBA: `lower_constraints(x, y)` must return a 1-D array of the l "
                    f"constraint values, got {out}"
                )
            if not jnp.issubdtype(out.dtype, jnp.floating):
                raise TypeError(
                    "LVHBA: `lower_constraints(x, y)` must return floating values, got "
                    f"{out.dtype}"
                )
            num, dtype = out.shape[0], out.dtype
        else:
            num = 0
        _check_projection(problem, x0, y0)
        x, y = _project_joint(problem, x0, y0)
        start = self._project_multiplier(jnp.full((num,), self.multiplier_init, dtype))
        settings = None
        if self._derives():
            settings = _Settings(*[jnp.ones((), _dtype_of(y0))] * 7)
        return _LVHBAState(
            x=x,
            y=y,
            z=start,
            theta=apply_project_y(problem, x, y),
            lam=start,
            step=jnp.array(0),
            settings=settings,
        )

    def _step(self, problem, state, data, key):
        upper_key, lower_key = jr.split(key)
        upper_batch = data.upper_batch(upper_key, state.step)
        lower_batch = data.lower_batch(lower_key, state.step)
        x, y, z = state.x, state.y, state.z
        settings = state.settings
        if settings is None:
            settings = self._fixed_settings()
        else:
            safety = 1.0 if data.deterministic else 0.5
            first = state.step == 0
            settings = lax.cond(
                state.step % self.curvature_every == 0,
                lambda: self._derive(
                    problem,
                    x,
                    y,
                    upper_batch,
                    lower_batch,
                    jr.fold_in(key, 1),
                    settings,
                    first,
                    safety,
                ),
                lambda: settings,
            )
        c_k = self._penalty(settings, state.step, _dtype_of(y))

        theta, lam = self._saddle_step(
            settings, problem, x, y, z, state.theta, state.lam, lower_batch
        )

        def merit(x_, y_):
            upper = problem.upper(x_, y_, upper_batch)
            lower = problem.lower(x_, y_, lower_batch)
            return upper / c_k + lower, (upper, lower)

        (_, (upper, lower)), (grad_x, grad_y) = jax.value_and_grad(
            merit, argnums=(0, 1), has_aux=True
        )(x, y)
        value, (v_x, v_y, v_z) = self._value_function_grad(
            settings, problem, x, y, z, theta, lam, lower_batch
        )
        alpha, beta = settings.alpha, settings.beta
        alpha_x = self._x_step(settings, c_k)
        new_x, new_y = _project_joint(
            problem,
            tree_axpy(-alpha_x, tree_sub(grad_x, v_x), x),
            tree_axpy(-alpha, tree_sub(grad_y, v_y), y),
        )
        new_z = self._project_multiplier(z + beta * v_z)

        h_now = _constraints(problem, y)(x, y)
        violation = h_now if self.equality else jnp.maximum(h_now, 0)
        x_mapping = tree_scale(1 / alpha_x, tree_sub(x, new_x))
        mapping = (
            x_mapping,
            tree_scale(1 / alpha, tree_sub(y, new_y)),
            (z - new_z) / beta,
        )
        saddle = (tree_sub(state.theta, theta), state.lam - lam)
        gap = lower - value
        metrics = {
            "upper_loss": upper,
            "grad_norm": tree_norm(x_mapping),
            "lower_residual": _lower_residual(problem, x, y, lower_batch, settings),
            "merit_mapping": tree_norm(mapping),
            "value_gap": gap,
            "constraint_violation": tree_norm(violation),
            "saddle_residual": tree_norm(saddle) / settings.eta,
            "penalty": c_k,
            "x_step": jnp.asarray(alpha_x, c_k.dtype),
            "alpha": jnp.asarray(alpha, c_k.dtype),
            "eta": jnp.asarray(settings.eta, c_k.dtype),
        }
        kept = None if state.settings is None else settings
        new_state = _LVHBAState(new_x, new_y, new_z, theta, lam, state.step + 1, kept)
        return new_state, metrics

    def _params(self, state):
        return state.x, state.y


def _lower_residual(problem, x, y, batch, settings: _Settings) -> Scalar:
    r"""$\|\Phi(x, y)\|$ for the problem's optimality condition; with coupled
    constraints, the projected-gradient residual
    $\|y - P(y - \gamma_1\nabla_y f(x, y))\|/\gamma_1$, where $P$ is the $y$ part of
    `project_feasible` at $(x, \cdot)$ (the projection onto $\{y \in Y : g(x, y) \le
    0\}$ when `project_feasible` keeps $x$ in place, as for constraints that do not
    restrict $x$); zero at a solution of the lower level."""
    if problem.lower_constraints is None:
        return tree_norm(problem.condition(x, y, batch))
    grad = jax.grad(problem.lower, argnums=1)(x, y, batch)
    step = settings.gamma1
    _, projected = problem.project_feasible(x, tree_axpy(-step, grad, y))
    return tree_norm(tree_sub(y, projected)) / step
