"""Value-function penalty solvers (`bl.solvers.Penalty`, `VPBGD`, `F2SA`).

1. Steps/second of each solver through `bl.run` against a hand-fused jitted `lax.scan`
   doing the same update arithmetic (and the same metrics) with plain `jax.grad` on the
   quadratic's two functions, timed side by side; ratio target <= 1.10x.
2. Time-to-target on `bl.problems.quadratic` against `bl.solvers.ImplicitDiff`: steps
   and wall time of `bl.run` until ||x - x*|| <= 1e-3 ||x*||.
3. Defaults on the registry problems the family applies to (single block, no lower
   constraints): status, the problem's own metric against its baseline, seconds.
4. The scale battery: relative hyper-objective gap (F(x_K) - F*) / (F(x_0) - F*) of
   `quadratic(lower_condition=20, lower_scale=s, upper_scale=t)` after 3000 steps with
   defaults, and of the condition-50 quadratic (lower Hessian eigenvalues on [1, 50]).
5. VPBGD's block steps, from dense Hessians at x_0 and y*(x_0) on the small ridge and
   logistic instances: the joint curvature L_J of f + gamma g, the x-block L_x of the
   Hessian of F_gamma (with the value function's own curvature) and the y-block L_y,
   and the extreme eigenvalues of that Hessian scaled by the block steps (stable
   below 2).

    python benchmarks/penalty.py [--tables throughput target defaults battery blocks]
                                 [--steps N] [--problems NAME ...] [--x64]

Sections 1, 2 and 5 run in float64; 3 and 4 in float32 unless `--x64`. Timings are wall
times on whatever else the machine is doing: compare ratios within one table.
"""

import argparse
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from _registry_defaults import SMALL, timed_default_solve
from _timing import interleaved_median_times, median_time, print_table
from jax.flatten_util import ravel_pytree

import bilevel as bl


DIM_X, DIM_Y = 20, 200
SIGMA = 5e-3
INNER = 10  # inner steps of the double loops
STEPS = 1000  # steps per timed call


def quadratic_setup(dim_x=DIM_X, dim_y=DIM_Y):
    """The problem, its lower data, and the smoothness constants of g(x, .) and F."""
    bench = bl.problems.quadratic(dim_x=dim_x, dim_y=dim_y, seed=0)
    rows = bench.data.lower
    hessian = rows.T @ rows / rows.shape[0] + jnp.eye(dim_y)
    lower_lipschitz = float(jnp.linalg.eigvalsh(hessian)[-1])
    upper_hessian = jax.jacfwd(bench.hypergradient)(bench.x0)  # F is quadratic
    upper_lipschitz = float(jnp.linalg.eigvalsh(upper_hessian)[-1])
    return bench, rows, (lower_lipschitz, upper_lipschitz)


# --- hand-fused baselines: the same arithmetic on plain functions ---------------------


def _plain(bench, rows):
    upper = lambda x, y: bench.problem.upper(x, y, None)  # noqa: E731
    lower = lambda x, y: bench.problem.lower(x, y, rows)  # noqa: E731
    return upper, lower


def _oracles(upper, lower, x, y, z):
    f, (fx, fy) = jax.value_and_grad(upper, argnums=(0, 1))(x, y)
    gy, (gyx, gyy) = jax.value_and_grad(lower, argnums=(0, 1))(x, y)
    gz, (gzx, gzy) = jax.value_and_grad(lower, argnums=(0, 1))(x, z)
    return f, fx, fy, gy, gyx, gyy, gz, gzx, gzy


def _metrics(f, dx, gyy, gzy, gy, gz, lam):
    norm = jnp.linalg.norm
    return f, norm(dx), norm(gyy), norm(gzy), gy - gz, lam


def fused_double_loop(
    upper,
    lower,
    x,
    y,
    num_steps,
    *,
    lam_fn,
    x_lr_fn,
    y_lr_fn,
    z_lr_fn,
    y_steps,
    z_steps,
    joint_y=False,
):
    """Inner loops on z (g) and y (f + lam g), then x (and y when joint) from one set
    of oracles: covers Penalty's double loop, VPBGD (joint y) and F2SA."""

    def body(carry, k):
        x, y, z = carry
        lam, a, b, c = lam_fn(k), x_lr_fn(k), y_lr_fn(k), z_lr_fn(k)
        grad_g = jax.grad(lower, 1)
        z = jax.lax.fori_loop(0, z_steps, lambda _, z: z - c * grad_g(x, z), z)
        grad_h = jax.grad(lambda y_: upper(x, y_) + lam * lower(x, y_))
        y = jax.lax.fori_loop(0, y_steps, lambda _, y: y - b * grad_h(y), y)
        f, fx, fy, gy, gyx, gyy, gz, gzx, gzy = _oracles(upper, lower, x, y, z)
        dx = fx + lam * (gyx - gzx)
        new_y = y - b * (fy + lam * gyy) if joint_y else y
        return (x - a * dx, new_y, z), _metrics(f, dx, gyy, gzy, gy, gz, lam)

    return jax.lax.scan(body, (x, y, y), jnp.arange(num_steps))


def fused_single_loop(upper, lower, x, y, num_steps, *, lam, x_lr, y_lr, z_lr, eta):
    """Jacobi step on (x, y, z) with STORM corrections at the previous point."""

    def directions(x, y, z):
        f, fx, fy, gy, gyx, gyy, gz, gzx, gzy = _oracles(upper, lower, x, y, z)
        return (fx + lam * (gyx - gzx), fy + lam * gyy, gzy), (f, gyy, gzy, gy, gz)

    def body(carry, k):
        point, previous, buffers = carry
        current, (f, gyy, gzy, gy, gz) = directions(*point)
        old, _ = directions(*previous)
        weight = jnp.where(k > 0, 1 - eta, 0.0)
        d = tuple(c + weight * (m - o) for c, m, o in zip(current, buffers, old))
        x, y, z = point
        new = (x - x_lr * d[0], y - y_lr * d[1], z - z_lr * d[2])
        return (new, point, d), _metrics(f, d[0], gyy, gzy, gy, gz, lam)

    zeros = (jnp.zeros_like(x), jnp.zeros_like(y), jnp.zeros_like(y))
    return jax.lax.scan(body, ((x, y, y), (x, y, y), zeros), jnp.arange(num_steps))


# --- configurations -------------------------------------------------------------------


def configurations(lipschitz):
    """(solver, matching fused loop keyword arguments): lower steps 1/L_g, outer step
    1/L_F (0.3/L_F for the single loop, whose Jacobi (x, y, z) iteration is unstable at
    1/L_F); F2SA uses deterministic-oracle exponents (alpha_k lambda_k constant) so
    that it converges on this full-batch problem."""
    lower_lipschitz, upper_lipschitz = lipschitz
    step = 1 / lower_lipschitz
    x_lr = 1 / upper_lipschitz
    lam = 1 / SIGMA
    const = lambda v: lambda k: jnp.asarray(v, jnp.float64)  # noqa: E731
    t = lambda k: (k + 1).astype(jnp.float64)  # noqa: E731
    return {
        "Penalty (double loop)": (
            bl.solvers.Penalty(
                sigma=SIGMA,
                x_lr=x_lr,
                y_lr=step,
                z_lr=step,
                y_steps=INNER,
                z_steps=INNER,
            ),
            dict(
                kind="double",
                lam_fn=const(lam),
                x_lr_fn=const(x_lr),
                y_lr_fn=const(step * SIGMA),
                z_lr_fn=const(step),
                y_steps=INNER,
                z_steps=INNER,
            ),
        ),
        "Penalty (single loop)": (
            bl.solvers.Penalty(
                variant="single_loop",
                sigma=SIGMA,
                x_lr=0.3 * x_lr,
                y_lr=step,
                z_lr=step,
            ),
            dict(
                kind="single",
                lam=lam,
                x_lr=0.3 * x_lr,
                y_lr=step * SIGMA,
                z_lr=step,
                eta=0.1,
            ),
        ),
        "VPBGD": (
            bl.solvers.VPBGD(penalty=lam, x_lr=step / lam, z_lr=step, z_steps=1),
            dict(
                kind="double",
                lam_fn=const(lam),
                x_lr_fn=const(step / lam),
                y_lr_fn=const(step / lam),
                z_lr_fn=const(step),
                y_steps=0,
                z_steps=1,
                joint_y=True,
            ),
        ),
        "F2SA": (
            bl.solvers.F2SA(
                penalty=10.0,
                penalty_growth=0.5,
                y_lr=0.1 * step,
                y_lr_decay=0.5,
                z_lr=step,
                z_lr_decay=0.0,
                x_ratio=x_lr / (0.1 * step),
                y_steps=INNER,
                z_steps=INNER,
            ),
            dict(
                kind="double",
                lam_fn=lambda k: 10.0 * t(k) ** 0.5,
                x_lr_fn=lambda k: x_lr * t(k) ** -0.5,
                y_lr_fn=lambda k: 0.1 * step * t(k) ** -0.5,
                z_lr_fn=const(step),
                y_steps=INNER,
                z_steps=INNER,
            ),
        ),
    }


def fused_runner(upper, lower, spec, num_steps):
    spec = dict(spec)
    kind = spec.pop("kind")
    loop = fused_double_loop if kind == "double" else fused_single_loop

    def run(x, y):
        carry, metrics = loop(upper, lower, x, y, num_steps, **spec)
        final_x = carry[0] if kind == "double" else carry[0][0]
        return final_x, metrics

    return jax.jit(run)


def step_scan(bench, solver, num_steps):
    """`solver.step` scanned directly (no bl.run driver: no finiteness guard, no
    validation): separates the solver's own overhead from the driver's."""
    keys = jax.vmap(jr.fold_in, in_axes=(None, 0))(jr.PRNGKey(1), jnp.arange(num_steps))

    @jax.jit
    def run(x0, y0):
        state = solver.init(bench.problem, x0, y0, jr.PRNGKey(0))
        step = lambda s, k: solver.step(bench.problem, s, bench.data, k)  # noqa: E731
        return jax.lax.scan(step, state, keys)

    return run


def throughput_table(bench, rows, lipschitz):
    upper, lower = _plain(bench, rows)
    table = []
    for name, (solver, spec) in configurations(lipschitz).items():
        fused = fused_runner(upper, lower, spec, STEPS)
        scan = step_scan(bench, solver, STEPS)
        # the fused loop reproduces the solver's trajectory (a check of the baseline)
        state, _ = bl.run(bench.problem, solver, bench.x0, bench.y0, bench.data, 20)
        fx, _ = fused_runner(upper, lower, spec, 20)(bench.x0, bench.y0)
        gap = float(jnp.linalg.norm(state.x - fx))
        times = interleaved_median_times(
            {
                "bl.run": lambda s=solver: bl.run(
                    bench.problem, s, bench.x0, bench.y0, bench.data, STEPS
                ),
                "step scan": lambda f=scan: f(bench.x0, bench.y0),
                "fused": lambda f=fused: f(bench.x0, bench.y0),
            },
            repeats=9,
        )
        table.append(
            {
                "solver": name,
                "bl.run steps/s": STEPS / times["bl.run"],
                "fused steps/s": STEPS / times["fused"],
                "ratio": times["bl.run"] / times["fused"],
                "step-scan ratio": times["step scan"] / times["fused"],
                "|x_run - x_fused| (20 steps)": gap,
            }
        )
    print_table(
        f"steps/second on quadratic(dim_x={DIM_X}, dim_y={DIM_Y}), {STEPS} steps per "
        "call (ratio = bl.run time / fused time, target <= 1.10; step-scan ratio = "
        "lax.scan of solver.step without bl.run's per-step finiteness guard / fused)",
        table,
    )


# --- time to target against ImplicitDiff ----------------------------------------------


def steps_to_target(bench, solver, target, budget, chunk=100):
    """First k with ||x_k - x*|| <= target, scanning solver.step in compiled chunks
    (the same per-step keys as bl.run) until the target or the budget (None: missed)."""
    problem, data = bench.problem, bench.data
    init_key, loop_key = jr.split(jr.PRNGKey(0))

    @jax.jit
    def advance(state, start):
        steps = start + jnp.arange(chunk)
        keys = jax.vmap(jr.fold_in, in_axes=(None, 0))(loop_key, steps)

        def body(state, key):
            state, _ = solver.step(problem, state, data, key)
            return state, jnp.linalg.norm(solver.params(state)[0] - bench.solution)

        return jax.lax.scan(body, state, keys)

    init = jax.jit(lambda x, y: solver.init(problem, x, y, init_key))
    state = init(bench.x0, bench.y0)
    for start in range(0, budget, chunk):
        state, errors = advance(state, start)
        hit = np.flatnonzero(np.asarray(errors) <= target)
        if hit.size:
            return start + int(hit[0]) + 1
    return None


def penalty_bias(bench, rows, sigma):
    """||x_sigma - x*|| / ||x*||, x_sigma = argmin psi_sigma in closed form (f, g are
    quadratic: eliminate g*(x) by a Schur complement, then one dense solve)."""
    upper, lower = _plain(bench, rows)
    nx = DIM_X
    zero = jnp.zeros(DIM_X + DIM_Y)
    hf, gf = (
        jax.hessian(lambda v: upper(v[:nx], v[nx:]))(zero),
        jax.grad(lambda v: upper(v[:nx], v[nx:]))(zero),
    )
    hg, gg = (
        jax.hessian(lambda v: lower(v[:nx], v[nx:]))(zero),
        jax.grad(lambda v: lower(v[:nx], v[nx:]))(zero),
    )
    g_yy, g_xy = hg[nx:, nx:], hg[:nx, nx:]
    schur = hg[:nx, :nx] - g_xy @ jnp.linalg.solve(g_yy, g_xy.T)
    z0 = -jnp.linalg.solve(g_yy, gg[nx:])
    lam = 1 / sigma
    hessian = (hf + lam * hg).at[:nx, :nx].add(-lam * schur)
    grad0 = (gf + lam * gg).at[:nx].add(-lam * (gg[:nx] + g_xy @ z0))
    x_sigma = -jnp.linalg.solve(hessian, grad0)[:nx]
    norm = jnp.linalg.norm(bench.solution)
    return float(jnp.linalg.norm(x_sigma - bench.solution) / norm)


def time_to_target_table(bench, rows, lipschitz, budget=20000, tolerance=1e-3):
    target = tolerance * float(jnp.linalg.norm(bench.solution))
    solvers = {name: s for name, (s, _) in configurations(lipschitz).items()}
    solvers["ImplicitDiff"] = bl.solvers.ImplicitDiff(
        inner_steps=INNER, inner_lr=1 / lipschitz[0], outer_lr=1 / lipschitz[1]
    )
    table = []
    for name, solver in solvers.items():
        steps = steps_to_target(bench, solver, target, budget)
        row = {"solver": name}
        if steps is not None:
            seconds = median_time(
                lambda s=solver, n=steps: bl.run(
                    bench.problem, s, bench.x0, bench.y0, bench.data, n
                ),
                repeats=5,
            )
            row.update({"steps to target": steps, "time to target (ms)": 1e3 * seconds})
        else:
            row.update({"steps to target": f"> {budget}", "time to target (ms)": "-"})
        table.append(row)
    bias = penalty_bias(bench, rows, SIGMA)
    print_table(
        f"time to ||x - x*|| <= {tolerance:g} ||x*|| on quadratic(dim_x={DIM_X}, "
        f"dim_y={DIM_Y}); sigma = {SIGMA:g} (penalty bias ||x_sigma - x*|| / ||x*|| = "
        f"{bias:.2g}; F2SA's lambda_k grows past 1/sigma), lower steps 1/L_g, outer "
        f"1/L_F, {INNER} inner steps for the double loops and ImplicitDiff; wall time "
        "of bl.run for that many steps (compiled)",
        table,
    )


# --- defaults on the registry ---------------------------------------------------------

SOLVERS = ("Penalty", "VPBGD", "F2SA")
# Registry problems with a single lower level and no lower constraints (the family's
# capabilities); `imaml` also with its task pool declared deterministic (every draw
# returns the whole pool), to show the deterministic rules there.
REGISTRY = (
    "quadratic",
    "ridge_hpo",
    "logreg_hpo",
    "hypercleaning",
    "distillation",
    "imaml",
    "hyper_representation",
)


def _deterministic_pool(bench):
    """iMAML's task pool as full-batch data (the same batches, flagged
    deterministic)."""
    data = bl.FullBatch(upper=bench.data.query, lower=bench.data.support)
    return eqx.tree_at(lambda b: b.data, bench, data)


def defaults_row(label, bench, solver_name, steps):
    result, seconds = timed_default_solve(bench, solver_name, steps)
    values = bench.evaluate(result.x, result.y)
    metric = float(values[bench.metric])
    baseline = bench.baseline_value(values)
    better = bench.improves(metric, baseline)
    return {
        "problem": label,
        "solver": solver_name,
        "status": result.status.value,
        "metric": bench.metric,
        "value": metric,
        "baseline": baseline,
        "better": better,
        "steps": int(result.num_steps),
        "seconds": seconds,
    }


def defaults_table(steps, problems):
    rows = []
    for name in problems:
        bench = bl.problems.make(name)
        cases = [(name, bench)]
        if name == "imaml":
            cases.append(("imaml (pool as FullBatch)", _deterministic_pool(bench)))
        for label, case in cases:
            for solver_name in SOLVERS:
                rows.append(defaults_row(label, case, solver_name, steps))
                print(rows[-1], flush=True)
    dtype = jnp.result_type(float).name
    print_table(
        f"defaults on the registry: {steps} steps, {dtype}, each problem's metric "
        "against its baseline (`better`: strictly better)",
        rows,
    )


# --- the scale battery ----------------------------------------------------------------


def battery_table(steps):
    def gap(bench, x):
        value = lambda v: float(bench.evaluate(v, bench.y0)["hyper_objective"])  # noqa
        best = value(bench.solution)
        return (value(x) - best) / (value(bench.x0) - best)

    cases = [
        (f"kappa 20, s={s:g}, t={t:g}", 20, s, t)
        for s in (0.02, 1.0, 50.0)
        for t in (0.02, 1.0, 50.0)
    ] + [("kappa 50, s=1, t=1", 50, 1.0, 1.0)]
    rows = []
    for label, kappa, s, t in cases:
        with jax.numpy_rank_promotion("allow"):
            bench = bl.problems.quadratic(
                10, 10, lower_condition=kappa, lower_scale=s, upper_scale=t
            )
        row = {"problem": label}
        for solver_name in SOLVERS:
            solver = getattr(bl.solvers, solver_name)()
            state, history = bl.run(
                bench.problem, solver, bench.x0, bench.y0, bench.data, steps
            )
            finite = bool(jnp.all(history["finite"]))
            x = solver.params(state)[0]
            row[solver_name] = f"{gap(bench, x):.2e}" + ("" if finite else " (!)")
        rows.append(row)
        print(row, flush=True)
    dtype = jnp.result_type(float).name
    print_table(
        f"scale battery: relative gap (F(x_K) - F*) / (F(x_0) - F*) after {steps} "
        f"steps with defaults, quadratic(10, 10), {dtype}; (!) marks a non-finite run",
        rows,
    )


def _block_curvatures(name):
    r"""Dense $L_J$, $L_x$, $L_y$ and the scaled Hessian's extreme eigenvalues of
    VPBGD's $F_\gamma$ at $x_0$ and $y^*(x_0)$, $\gamma = 100 L_f/L_g$ there."""
    bench = bl.problems.make(name, **SMALL[name])
    data = bench.data
    flat_x, unravel_x = ravel_pytree(bench.x0)
    flat_y, unravel_y = ravel_pytree(bench.y0)

    def lower(x, y):
        return bench.problem.lower(unravel_x(x), unravel_y(y), data.full_lower())

    def upper(x, y):
        return bench.problem.upper(unravel_x(x), unravel_y(y), data.full_upper())

    def top(matrix):
        return float(np.linalg.eigvalsh(np.asarray(matrix))[-1])

    y = flat_y
    for _ in range(30):  # Newton's method on the lower problem
        y = y - jnp.linalg.solve(
            jax.hessian(lower, 1)(flat_x, y), jax.grad(lower, 1)(flat_x, y)
        )
    g_yy, f_yy = jax.hessian(lower, 1)(flat_x, y), jax.hessian(upper, 1)(flat_x, y)
    gamma = 100 * top(f_yy) / top(g_yy)
    g_yx = jax.jacfwd(jax.grad(lower, 1), 0)(flat_x, y)
    block_x = jax.hessian(upper, 0)(flat_x, y) + gamma * g_yx.T @ jnp.linalg.solve(
        g_yy, g_yx
    )
    joint = jax.hessian(lambda u: upper(*u) + gamma * lower(*u))((flat_x, y))
    (j_xx, j_xy), (j_yx, j_yy) = joint
    dense = jnp.block([[j_xx, j_xy], [j_yx, j_yy]])
    # F_gamma's Hessian: the joint one with -gamma * hess v(x) in its x-block
    value_hessian = jax.hessian(lower, 0)(flat_x, y) - g_yx.T @ jnp.linalg.solve(
        g_yy, g_yx
    )
    n = flat_x.size
    hessian = dense.at[:n, :n].add(-gamma * value_hessian)
    l_x, l_y, l_joint = top(block_x), top(j_yy), top(dense)
    scale = jnp.sqrt(jnp.concatenate([jnp.full(n, 1 / l_x), jnp.full(y.size, 1 / l_y)]))
    scaled = np.linalg.eigvalsh(np.asarray(scale[:, None] * hessian * scale[None, :]))
    return {
        "problem": f"{name} (small)",
        "gamma": gamma,
        "L_J": l_joint,
        "L_x": l_x,
        "L_y": l_y,
        "L_J / L_x": l_joint / l_x,
        "scaled eig min": float(scaled[0]),
        "scaled eig max": float(scaled[-1]),
    }


def blocks_table():
    print_table(
        "VPBGD block steps: dense float64 curvatures at x_0, y*(x_0) (stable while "
        "the scaled Hessian's largest eigenvalue is below 2)",
        [_block_curvatures(name) for name in ("ridge_hpo", "logreg_hpo")],
    )


def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--tables",
        nargs="+",
        default=["throughput", "target", "defaults", "battery", "blocks"],
    )
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--problems", nargs="+", default=list(REGISTRY))
    parser.add_argument("--x64", action="store_true")
    args = parser.parse_args(argv)
    if args.x64:
        jax.config.update("jax_enable_x64", True)
    if "defaults" in args.tables:
        defaults_table(args.steps, args.problems)
    if "battery" in args.tables:
        battery_table(args.steps)
    if {"throughput", "target", "blocks"} & set(args.tables):
        jax.config.update("jax_enable_x64", True)
    if "blocks" in args.tables:
        blocks_table()
    if {"throughput", "target"} & set(args.tables):
        bench, rows, lipschitz = quadratic_setup()
        if "throughput" in args.tables:
            throughput_table(bench, rows, lipschitz)
        if "target" in args.tables:
            time_to_target_table(bench, rows, lipschitz)


if __name__ == "__main__":
    # under `make bench` (benchmarks/run_all.py) the arguments are run_all's
    main(sys.argv[1:] if sys.argv[0].endswith("penalty.py") else [])
