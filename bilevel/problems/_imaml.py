r"""Meta-learning with implicit gradients (iMAML): few-shot digit classification and
sinusoid regression.

Two ways to meta-train are offered, and both use implicit differentiation:

- `bench.problem` is the bilevel problem over a fixed pool of $T$ training tasks, with
  the task parameters stacked in $y$ (leading axis $T$). Its lower level is a sum of
  independent per-task problems, so its Hessian is block diagonal and the generic
  solvers ([`bilevel.solvers.ImplicitDiff`][], ...) apply unchanged; one CG solve on the
  stacked system is the same as one solve per task.
- [`imaml_meta_train`][] is the episodic iMAML loop of Rajeswaran et al. (2019): every
  outer step draws a fresh meta-batch of tasks, adapts to each by gradient descent, and
  averages per-task implicit gradients computed by [`bilevel.implicit_diff`][] and
  `jax.vmap` over the tasks. The generic solvers cannot express this (they handle one
  lower problem whose data is fixed across the inner and outer steps of a step), hence
  a dedicated loop.
"""

import functools as ft
from typing import Literal

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from .._conditions import stationarity_condition
from .._data import AbstractData
from .._implicit import implicit_diff
from .._misc import tree_dot, tree_norm, tree_sub
from .._problem import BilevelProblem
from ._benchmark import Benchmark
from ._common import as_float, check_int, load_dataset, softmax_cross_entropy


_META_TRAIN_CLASSES = (0, 1, 2, 3, 4, 5)
_META_TEST_CLASSES = (6, 7, 8, 9)


def mlp(params: tuple, inputs: Float[Array, "n d"]) -> Float[Array, "n c"]:
    """A tanh MLP given as a tuple of `(weight, bias)` layers (linear last layer)."""
    hidden = inputs
    for weight, bias in params[:-1]:
        hidden = jnp.tanh(hidden @ weight + bias[None, :])
    weight, bias = params[-1]
    return hidden @ weight + bias[None, :]


def _init_mlp(key: PRNGKeyArray, sizes: tuple[int, ...], dtype) -> tuple:
    keys = jr.split(key, len(sizes) - 1)
    return tuple(
        (jr.normal(k, (m, n), dtype) / np.sqrt(m), jnp.zeros(n, dtype))
        for k, m, n in zip(keys, sizes[:-1], sizes[1:])
    )


class FewShotTasks(eqx.Module):
    r"""A distribution of few-shot tasks, the per-task iMAML objectives and the
    adaptation rule.

    For meta-parameters $\theta$ and task parameters $\phi$ (same pytree, an MLP):
    support objective $\hat L_s(\phi) + \frac{\lambda}{2}\|\phi - \theta\|^2$ (iMAML's
    proximal regularisation), query objective $\hat L_q(\phi)$; $\hat L$ is the mean
    cross-entropy (classification) or squared error (regression).

    A task is a pair `(support, query)` of `(inputs, targets)` arrays. `adapt` runs
    `adapt_steps` gradient steps of size `adapt_lr` on the support objective from
    $\theta$ and is differentiable in $\theta$ by the implicit function theorem.
    """

    kind: str = eqx.field(static=True)
    num_ways: int = eqx.field(static=True)
    num_shots: int = eqx.field(static=True)
    num_queries: int = eqx.field(static=True)
    adapt_steps: int = eqx.field(static=True)
    prox_reg: Array
    adapt_lr: Array
    train_images: Array | None  # (classes, images per class, pixels), digits only
    test_images: Array | None

    def task_loss(self, phi: tuple, batch: tuple) -> Array:
        """Mean cross-entropy or squared error of the model `phi` on a batch."""
        inputs, targets = batch
        outputs = mlp(phi, inputs)
        if self.kind == "digits":
            return jnp.mean(softmax_cross_entropy(outputs, targets))
        return jnp.mean((outputs[:, 0] - targets) ** 2)

    def support_objective(self, theta: tuple, phi: tuple, support: tuple) -> Array:
        r"""$\hat L_s(\phi) + \frac{\lambda}{2}\|\phi - \theta\|^2$."""
        step = tree_sub(phi, theta)
        # not tree_norm(...)**2: sqrt has no gradient at 0
        distance = tree_dot(step, step)
        return self.task_loss(phi, support) + 0.5 * self.prox_reg * distance

    def metric(self, phi: tuple, query: tuple) -> Array:
        """Query accuracy (classification) or mean squared error (regression)."""
        inputs, targets = query
        outputs = mlp(phi, inputs)
        if self.kind == "digits":
            correct = jnp.argmax(outputs, axis=-1) == targets
            return jnp.mean(correct.astype(outputs.dtype))
        return jnp.mean((outputs[:, 0] - targets) ** 2)

    def adapt(self, theta: tuple, support: tuple) -> tuple:
        r"""$\phi(\theta)$: `adapt_steps` gradient steps on the support objective from
        $\theta$; its derivative in $\theta$ is the implicit one,
        $(I + \nabla^2 \hat L_s/\lambda)^{-1}$ (CG)."""
        return _adapt(self, theta, support)

    def meta_gradient(self, theta: tuple, support: tuple, query: tuple) -> tuple:
        r"""Mean over a meta-batch (leading task axis on `support` and `query`) of the
        per-task implicit gradients $\nabla_\theta \hat L_q(\phi_i(\theta))$, vmapped
        over the tasks; also returns the mean query loss."""

        def one_task(support_i, query_i):
            def query_loss(t):
                return self.task_loss(self.adapt(t, support_i), query_i)

            return jax.value_and_grad(query_loss)(theta)

        losses, grads = jax.vmap(one_task)(support, query)
        return jnp.mean(losses), jtu.tree_map(lambda g: jnp.mean(g, axis=0), grads)

    def evaluate(self, theta: tuple, support: tuple, query: tuple) -> Array:
        """Mean query metric after adapting from `theta`, over a batch of tasks."""

        def one_task(support_i, query_i):
            return self.metric(self.adapt(theta, support_i), query_i)

        return jnp.mean(jax.vmap(one_task)(support, query))

    def sample(self, key: PRNGKeyArray, num_tasks: int, split: str = "train") -> tuple:
        """`num_tasks` fresh tasks `(support, query)` with a leading task axis: digit
        tasks use the meta-train classes (`split="train"`) or the disjoint meta-test
        classes (`split="test"`); sinusoid tasks are i.i.d. in both splits."""
        keys = jr.split(key, num_tasks)
        if self.kind == "digits":
            images = self.train_images if split == "train" else self.test_images
            return jax.vmap(ft.partial(self._digit_task, images))(keys)
        return jax.vmap(self._sinusoid_task)(keys)

    def _digit_task(self, images, key):
        k_classes, k_images = jr.split(key)
        num_classes, per_class = images.shape[:2]
        classes = _distinct(k_classes, num_classes, self.num_ways)
        size = self.num_shots + self.num_queries
        picks = jax.vmap(lambda k: _distinct(k, per_class, size))(
            jr.split(k_images, self.num_ways)
        )
        chosen = images[classes[:, None], picks]  # (ways, shots + queries, pixels)
        labels = jnp.broadcast_to(jnp.arange(self.num_ways)[:, None], picks.shape)

        def flat(a):
            return a.reshape((-1,) + a.shape[2:])

        support = (flat(chosen[:, : self.num_shots]), flat(labels[:, : self.num_shots]))
        query = (flat(chosen[:, self.num_shots :]), flat(labels[:, self.num_shots :]))
        return support, query

    def _sinusoid_task(self, key):
        dtype = jnp.result_type(float)
        k_amp, k_phase, k_inputs = jr.split(key, 3)
        amplitude = jr.uniform(k_amp, (), dtype, 0.1, 5.0)
        phase = jr.uniform(k_phase, (), dtype, 0.0, np.pi)
        size = self.num_shots + self.num_queries
        points = jr.uniform(k_inputs, (size, 1), dtype, -5.0, 5.0)
        targets = amplitude * jnp.sin(points[:, 0] - phase)
        inputs = points / 5.0  # the network sees u / 5 in [-1, 1]
        support = (inputs[: self.num_shots], targets[: self.num_shots])
        query = (inputs[self.num_shots :], targets[self.num_shots :])
        return support, query


def _distinct(key: PRNGKeyArray, num: int, size: int) -> Array:
    # `size` distinct indices of range(num), uniformly at random and in random order:
    # the positions of the `size` largest of `num` i.i.d. uniforms.
    return lax.top_k(jr.uniform(key, (num,)), size)[1]


@eqx.filter_jit
def _sample_pool_and_eval(tasks, key, num_tasks: int, num_eval_tasks: int):
    # one compilation for both draws
    k_pool, k_eval = jr.split(key)
    pool = tasks.sample(k_pool, num_tasks, "train")
    return pool, tasks.sample(k_eval, num_eval_tasks, "test")


def _adapt_steps(tasks: FewShotTasks, theta, support):
    def body(_, phi):
        grad = jax.grad(tasks.support_objective, argnums=1)(theta, phi, support)
        return jtu.tree_map(lambda p, g: p - tasks.adapt_lr * g, phi, grad)

    return lax.fori_loop(0, tasks.adapt_steps, body, theta)


def _adapt(tasks: FewShotTasks, theta, support):
    @implicit_diff(stationarity_condition(_ProximalObjective()))
    def solve(theta_, tasks_, support_):
        return _adapt_steps(tasks_, lax.stop_gradient(theta_), support_)

    return solve(theta, tasks, support)


class _ProximalObjective(eqx.Module):
    # (theta, phi, tasks, support) -> support objective; the order the IFT expects.
    def __call__(self, theta, phi, tasks, support):
        return tasks.support_objective(theta, phi, support)


class _PoolLower(eqx.Module):
    tasks: FewShotTasks

    def __call__(self, theta, phis, support):
        per_task = jax.vmap(self.tasks.support_objective, in_axes=(None, 0, 0))
        return jnp.sum(per_task(theta, phis, support))


class _PoolUpper(eqx.Module):
    tasks: FewShotTasks

    def __call__(self, theta, phis, query):
        return jnp.mean(jax.vmap(self.tasks.task_loss)(phis, query))


class TaskPool(AbstractData):
    """The data of an [`imaml`][] benchmark: a fixed pool of meta-training tasks
    (every draw returns the whole pool: query sets for the upper level, support sets
    for the lower level) and the task family `tasks`, a [`FewShotTasks`][], from which
    [`imaml_meta_train`][] draws fresh tasks."""

    support: tuple
    query: tuple
    tasks: FewShotTasks

    @property
    def deterministic(self) -> bool:
        return True  # every draw is the whole pool

    def upper_batch(self, key, draw, stream=0):
        return self.query

    def lower_batch(self, key, draw, stream=0):
        return self.support


def imaml(
    task: Literal["digits", "sinusoid"] = "digits",
    num_ways: int = 3,
    num_shots: int = 1,
    num_queries: int = 10,
    seed: int = 0,
    *,
    num_tasks: int = 64,
    num_eval_tasks: int = 100,
    hidden: int = 32,
    prox_reg: float | None = None,
    adapt_steps: int | None = None,
    adapt_lr: float | None = None,
) -> Benchmark:
    r"""iMAML (Rajeswaran et al. 2019): meta-learn the initialisation $\theta$ from
    which a proximally regularised adaptation solves new few-shot tasks,

    $\min_\theta \frac1T\sum_{i=1}^T \hat L_{q,i}(\phi_i^*(\theta))$,
    $\phi_i^*(\theta) = \arg\min_\phi \hat L_{s,i}(\phi) +
    \frac{\lambda}{2}\|\phi - \theta\|^2$.

    - `task="digits"`: `num_ways`-way `num_shots`-shot classification of scikit-learn's
      digits (pixels scaled to [0, 1]); meta-training tasks use classes 0-5 and
      meta-test tasks the disjoint classes 6-9, labels are assigned in random order.
      Model: a one-hidden-layer tanh MLP with `hidden` units.
    - `task="sinusoid"` (Finn et al. 2017): regress $A\sin(u - \varphi)$, $A \sim
      U[0.1, 5]$, $\varphi \sim U[0, \pi]$, $u \sim U[-5, 5]$, from `num_shots` points;
      `num_queries` query points. Model: a 1-40-40-1 tanh MLP of $u/5$ (`hidden` is
      ignored).

    `bench.problem` is the bilevel problem over a fixed pool of `num_tasks`
    meta-training tasks: $x = \theta$ (a tuple of `(weight, bias)` layers), $y$ the task
    parameters stacked along a leading axis of size `num_tasks`, lower level
    $\sum_i [\hat L_{s,i}(\phi_i) + \frac{\lambda}{2}\|\phi_i - \theta\|^2]$ (a sum, so
    each block keeps its own curvature), upper level the mean query loss. The
    stationarity condition is tagged positive semidefinite (CG), as in iMAML: this holds
    when $\lambda$ exceeds the negative curvature of $\hat L_s$. `bench.data` is a
    [`TaskPool`][]; [`imaml_meta_train`][] runs the episodic algorithm with fresh tasks.

    **Arguments:**

    - `task`: `"digits"` or `"sinusoid"`.
    - `num_ways` (digits: at most 4, the number of meta-test classes), `num_shots`,
      `num_queries`: task sizes (per class for digits).
    - `seed`: seeds the task pool, the evaluation tasks and $\theta_0$.
    - `num_tasks`: size of the fixed pool; `num_eval_tasks`: meta-test tasks.
    - `hidden`: MLP width (digits).
    - `prox_reg`: $\lambda > 0$ (default 4 for digits, 8 for sinusoid).
    - `adapt_steps`, `adapt_lr`: the adaptation (gradient descent from $\theta$), used
      for evaluation and by [`imaml_meta_train`][]; defaults 20 steps of 0.05 (digits)
      or 100 steps of 0.02 (sinusoid, whose squared errors have curvature up to ~60).

    !!! warning
        CG needs the support Hessian $\nabla^2\hat L_s + \lambda I$ to be positive
        definite at the adapted parameters. For sinusoids we measured its smallest
        eigenvalue over 32 tasks at $\theta_0$: $-1.0$ with $\lambda = 2$, $0.7$ with
        $\lambda = 4$, $2.7$ with $\lambda = 8$; with $\lambda = 4$ an episodic run
        still met an indefinite task (NaN meta-gradient) in float32, hence the default
        8. Meta-training sharpens the model: on digits, adaptation steps of 0.1 (with
        $\lambda = 2$) stopped converging after ~56 episodic meta-steps (largest support
        Hessian eigenvalue ~20 > 2/0.1) and the Hessian became indefinite, hence 0.05
        and $\lambda = 4$. Reverse-mode implicit gradients raise when the CG solve
        fails (lineax's transposed solve always checks its result).

    `evaluate(x, y)` adapts from $x$ to `num_eval_tasks` fixed meta-test tasks and
    returns `meta_test_accuracy` (digits) or `meta_test_mse` (sinusoid) on their query
    sets, with `baseline_meta_test_accuracy` / `baseline_meta_test_mse`: the same
    adaptation from the random initialisation $\theta_0$ = `x0` (no meta-learning);
    and `pool_query_loss` $f(x, y)$.

    ??? cite "References"
        ```bibtex
        @inproceedings{rajeswaran2019meta,
          title={Meta-Learning with Implicit Gradients},
          author={Rajeswaran, Aravind and Finn, Chelsea and Kakade, Sham M and
                  Levine, Sergey}, booktitle={NeurIPS}, year={2019}}
        @inproceedings{finn2017model,
          title={Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks},
          author={Finn, Chelsea and Abbeel, Pieter and Levine, Sergey},
          booktitle={ICML}, year={2017}}
        ```
    """
    if task not in ("digits", "sinusoid"):
        raise ValueError(f"imaml: `task` must be 'digits' or 'sinusoid', got {task!r}")
    for name, value in (
        ("num_ways", num_ways),
        ("num_shots", num_shots),
        ("num_queries", num_queries),
        ("num_tasks", num_tasks),
        ("num_eval_tasks", num_eval_tasks),
        ("hidden", hidden),
    ):
        check_int("imaml", name, value)
    if task == "digits" and not 2 <= num_ways <= len(_META_TEST_CLASSES):
        raise ValueError(
            f"imaml: digits tasks need 2 <= num_ways <= {len(_META_TEST_CLASSES)} (the "
            f"meta-test classes are {_META_TEST_CLASSES}), got {num_ways}"
        )
    if prox_reg is None:
        prox_reg = 4.0 if task == "digits" else 8.0
    if adapt_steps is None:
        adapt_steps = 20 if task == "digits" else 100
    if adapt_lr is None:
        adapt_lr = 0.05 if task == "digits" else 0.02
    check_int("imaml", "adapt_steps", adapt_steps)
    if not prox_reg > 0 or not adapt_lr > 0:
        raise ValueError("imaml: `prox_reg` and `adapt_lr` must be > 0")
    dtype = jnp.result_type(float)
    if task == "digits":
        features, labels = load_dataset("digits")
        train_images, test_images = (
            _images_by_class(features / 16.0, labels, classes, seed)
            for classes in (_META_TRAIN_CLASSES, _META_TEST_CLASSES)
        )
        if num_shots + num_queries > train_images.shape[1]:
            raise ValueError(
                f"imaml: num_shots + num_queries = {num_shots + num_queries} exceeds "
                f"the {train_images.shape[1]} images available per class"
            )
        sizes = (features.shape[1], hidden, num_ways)
        metric_name = "meta_test_accuracy"
    else:
        train_images = test_images = None
        sizes = (1, 40, 40, 1)
        metric_name = "meta_test_mse"
    tasks = FewShotTasks(
        kind=task,
        num_ways=num_ways if task == "digits" else 1,
        num_shots=num_shots,
        num_queries=num_queries,
        adapt_steps=adapt_steps,
        prox_reg=as_float(prox_reg),
        adapt_lr=as_float(adapt_lr),
        train_images=train_images,
        test_images=test_images,
    )
    k_init, k_tasks = jr.split(jr.PRNGKey(seed))
    x0 = _init_mlp(k_init, sizes, dtype)
    (support, query), (eval_support, eval_query) = _sample_pool_and_eval(
        tasks, k_tasks, num_tasks, num_eval_tasks
    )
    y0 = jtu.tree_map(lambda u: jnp.broadcast_to(u, (num_tasks,) + u.shape), x0)

    @ft.cache
    def baseline():  # computed on the first call of `evaluate` only
        value = _evaluate(tasks, x0, eval_support, eval_query)
        return {f"baseline_{metric_name}": value}

    upper = _PoolUpper(tasks)

    def evaluate(x, y):
        return {
            metric_name: _evaluate(tasks, x, eval_support, eval_query),
            **baseline(),
            "pool_query_loss": upper(x, y, query),
        }

    return Benchmark(
        name="imaml",
        problem=BilevelProblem(upper, _PoolLower(tasks)),
        x0=x0,
        y0=y0,
        data=TaskPool(support, query, tasks),
        evaluate=evaluate,
        metric=metric_name,
        maximize=metric_name == "meta_test_accuracy",
        baseline=f"baseline_{metric_name}",
    )


@eqx.filter_jit
def _evaluate(tasks, theta, support, query):
    return tasks.evaluate(theta, support, query)


def _images_by_class(features, labels, classes, seed) -> Array:
    rng = np.random.default_rng(seed + 3)
    per_class = min(int(np.sum(labels == c)) for c in classes)
    rows = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes]
    return as_float(np.stack([features[r] for r in rows]))


@eqx.filter_jit
def imaml_meta_train(
    bench: Benchmark,
    key: PRNGKeyArray,
    num_steps: int = 100,
    meta_batch_size: int = 8,
    outer_lr: float = 0.1,
    outer_optimizer: optax.GradientTransformation | None = None,
) -> tuple[PyTree[Array], dict[str, Array]]:
    r"""Episodic iMAML (Rajeswaran et al. 2019, Algorithm 1) on an [`imaml`][]
    benchmark, as one compiled `lax.scan`.

    Each step draws `meta_batch_size` fresh meta-training tasks, adapts to each from
    $\theta$ (`bench.data.tasks.adapt`), and updates $\theta$ with the mean of the
    per-task implicit gradients $(I + \nabla^2\hat L_{s,i}/\lambda)^{-1}\nabla\hat
    L_{q,i}(\phi_i)$, computed by [`bilevel.implicit_diff`][] and vmapped over the
    tasks.

    **Arguments:**

    - `bench`: a benchmark built by [`imaml`][] (its data is a [`TaskPool`][]).
    - `key`: seeds the task draws.
    - `num_steps`, `meta_batch_size`: outer steps and tasks per step.
    - `outer_lr` / `outer_optimizer`: the meta-update (default: gradient descent with
      step `outer_lr`; iMAML uses Adam).

    **Returns:** `(theta, history)`, the history holding the mean query loss and the
    meta-gradient norm of every step.
    """
    if not isinstance(bench.data, TaskPool):
        raise ValueError(
            "imaml_meta_train needs a benchmark built by bl.problems.imaml"
        )
    tasks = bench.data.tasks
    optimizer = outer_optimizer if outer_optimizer is not None else optax.sgd(outer_lr)

    def step(carry, step_key):
        theta, opt_state = carry
        support, query = tasks.sample(step_key, meta_batch_size, "train")
        loss, grad = tasks.meta_gradient(theta, support, query)
        updates, opt_state = optimizer.update(grad, opt_state, theta)
        theta = optax.apply_updates(theta, updates)
        return (theta, opt_state), {"query_loss": loss, "grad_norm": tree_norm(grad)}

    carry = (bench.x0, optimizer.init(bench.x0))
    (theta, _), history = lax.scan(step, carry, jr.split(key, num_steps))
    return theta, history
