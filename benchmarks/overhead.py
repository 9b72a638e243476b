"""What the loop costs on top of the solver's step, and what compiling costs.

Table 1 (issue target: `bl.run` and `bl.solve` <= 1.05x): a cheap step on a large
state, a diagonal quadratic with d = 1e4, 1e5, 1e6 (x and y of size d, float32), every
solver (BSVRB on the same quadratic split into 10 blocks). The baseline is a bare
`lax.scan` of `solver.step` after `solver.init`, with the same per-step keys and every
metric kept (what `bl.run` returns), compiled once. `bl.solve` runs 10 log points per
call. Medians of interleaved repeats, of wall time and of process CPU time (less
sensitive to other load); `|x_run - x_scan|` checks that `bl.run` follows the
baseline's trajectory, `kept` counts the steps `bl.run` kept (all of them unless the
run failed, which would make its ratios meaningless).
Table 2: the same ratios on the problems library (each problem with the first solver of
ImplicitDiff, BSVRB, LVHBA that supports it).
Table 3: compile time per solver: the first `bl.solve` / `bl.run` call (compiling)
against the next (steady state), and how many times `bl.solve`'s chunk compiled.
"""

import inspect
import logging
import time

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
from _timing import interleaved_cpu_times, interleaved_median_times, print_table

import bilevel as bl


KEY = jr.PRNGKey(0)
SIZES = (10**4, 10**5, 10**6)
SECONDS = 0.3  # steps per timed call: about this long for the bare scan
# Cheap steps: one inner step. ImplicitDiff with a 10-term Neumann series for the
# adjoint: its default CG returns NaN from the first step at d = 1e5 in float32.
CHEAP = {
    "ImplicitDiff": {"inner_steps": 1, "linear_solver": bl.Neumann(10)},
    "Unrolled": {"inner_steps": 1},
}
BLOCKS = 10


def all_solvers() -> dict[str, type]:
    """Every concrete solver class exported by `bl.solvers`."""
    return {
        name: cls
        for name, cls in vars(bl.solvers).items()
        if isinstance(cls, type)
        and issubclass(cls, bl.AbstractBilevelSolver)
        and not inspect.isabstract(cls)
    }


def diagonal(d: int, multi_block: bool):
    r"""$f = \frac12\|y - 1\|^2 + \frac{1}{20}\|x\|^2$,
    $g = \frac12\sum_i a_i (y_i - x_i)^2$, $a_i \in [1, 2]$; with `multi_block`,
    `BLOCKS` blocks of size d / BLOCKS sharing x."""
    if multi_block:
        k = d // BLOCKS
        weights = jnp.linspace(1.0, 2.0, d).reshape(BLOCKS, k)

        def upper(x, y, batch, i):
            return 0.5 * jnp.sum((y - 1.0) ** 2) + 0.05 * jnp.sum(x**2)

        def lower(x, y, batch, i):
            return 0.5 * jnp.sum(weights[i] * (y - x) ** 2)

        problem = bl.MultiBlockProblem(upper, lower, num_blocks=BLOCKS)
        return problem, jnp.zeros(k), jnp.zeros((BLOCKS, k))
    weights = jnp.linspace(1.0, 2.0, d)

    def upper(x, y, batch):
        return 0.5 * jnp.sum((y - 1.0) ** 2) + 0.05 * jnp.sum(x**2)

    def lower(x, y, batch):
        return 0.5 * jnp.sum(weights * (y - x) ** 2)

    return bl.BilevelProblem(upper, lower), jnp.zeros(d), jnp.zeros(d)


def bare_scan(num_steps: int):
    """`solver.init` then a bare `lax.scan` of `solver.step` (keys as in `bl.run`,
    every metric stacked): the baseline the loop is measured against."""

    @eqx.filter_jit
    def scan(problem, solver, x0, y0, data, key):
        init_key, loop_key = jr.split(key)
        state = solver.init(problem, x0, y0, init_key)

        def body(state, step):
            return solver.step(problem, state, data, jr.fold_in(loop_key, step))

        return lax.scan(body, state, jnp.arange(num_steps, dtype=jnp.int32))

    return scan


def calibrate(problem, solver, x0, y0, data, probe: int = 20) -> int:
    """Steps for which the bare scan takes about `SECONDS` (fixed per-call costs, a
    few dispatches, then weigh less than 1%)."""
    scan = bare_scan(probe)
    jax.block_until_ready(scan(problem, solver, x0, y0, data, KEY))
    seconds = min(
        _seconds(lambda: scan(problem, solver, x0, y0, data, KEY)) for _ in range(3)
    )
    return int(min(max(probe * SECONDS / seconds, 10), 50000))


def ratios(
    problem, solver, x0, y0, data, num_steps: int | None = None, repeats: int = 7
) -> dict:
    """Time `bl.run`, `bl.solve` and the bare scan side by side."""
    if num_steps is None:
        num_steps = calibrate(problem, solver, x0, y0, data)
    scan = bare_scan(num_steps)
    log_every = max(1, num_steps // 10)
    fns = {
        "scan": lambda: scan(problem, solver, x0, y0, data, KEY),
        "run": lambda: bl.run(problem, solver, x0, y0, data, num_steps, KEY),
        "solve": lambda: (
            bl.solve(
                problem,
                solver,
                x0,
                y0,
                data,
                num_steps,
                KEY,
                log_every=log_every,
                progress=False,
            ).state
        ),
    }
    times = interleaved_median_times(fns, repeats=repeats)
    cpu = interleaved_cpu_times(fns, repeats=repeats)
    run_state, history = fns["run"]()
    run_x = solver.params(run_state)[0]
    scan_x = solver.params(fns["scan"]()[0])[0]
    gap = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(
            jax.tree_util.tree_leaves(run_x), jax.tree_util.tree_leaves(scan_x)
        )
    )
    return {
        "steps": num_steps,
        "scan ms/step": 1e3 * times["scan"] / num_steps,
        "run/scan": times["run"] / times["scan"],
        "solve/scan": times["solve"] / times["scan"],
        "run/scan cpu": cpu["run"] / cpu["scan"],
        "solve/scan cpu": cpu["solve"] / cpu["scan"],
        "|x_run - x_scan|": gap,
        "kept": int(jnp.sum(history["finite"] & ~history["diverged"])),
    }


def table_diagonal():
    rows = []
    for d in SIZES:
        for name, cls in all_solvers().items():
            solver = cls(**CHEAP.get(name, {}))
            multi = "single_block" not in solver.supported_features()
            problem, x0, y0 = diagonal(d, multi)
            rows.append(
                {
                    "solver": name,
                    "d": f"{d:.0e}",
                    **ratios(problem, solver, x0, y0, None),
                }
            )
            print(f"  {name} d={d:.0e} done", flush=True)
    print_table(
        "loop overhead: diagonal quadratic, cheap steps (ratios to a bare lax.scan of "
        "solver.step; target <= 1.05; re-measure on a quiet machine)",
        rows,
    )


def first_solver(bench):
    """The first of ImplicitDiff, BSVRB, LVHBA that supports the problem and its data
    (tracing one step checks it, nothing is compiled)."""
    for solver in (bl.solvers.ImplicitDiff(), bl.solvers.BSVRB(), bl.solvers.LVHBA()):
        try:
            jax.eval_shape(
                lambda: bl.run(bench.problem, solver, bench.x0, bench.y0, bench.data, 1)
            )
        except (TypeError, ValueError):
            continue
        return solver
    return None


def table_problems():
    rows = []
    for name in bl.problems.registry:
        bench = bl.problems.make(name)
        solver = first_solver(bench)
        if solver is None:
            continue
        rows.append(
            {
                "problem": name,
                "solver": type(solver).__name__,
                **ratios(
                    bench.problem, solver, bench.x0, bench.y0, bench.data, repeats=5
                ),
            }
        )
        print(f"  {name} done", flush=True)
    print_table(
        "loop overhead on the problems library (ratios to a bare lax.scan)", rows
    )


class _CompileLog(logging.Handler):
    def __init__(self):
        super().__init__()
        self.names = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("Compiling"):
            self.names.append(message.split(" with ")[0])


def table_compile(num_steps: int = 200, log_every: int = 50):
    handler, logger = _CompileLog(), logging.getLogger("jax")
    logger.addHandler(handler)
    logger.propagate = False  # count the compilations without printing them
    rows = []
    for name, cls in all_solvers().items():
        solver = cls()
        multi = "single_block" not in solver.supported_features()
        bench = (
            bl.problems.multiblock_quadratic(seed=7)
            if multi
            else bl.problems.quadratic(dim_x=5, dim_y=10, seed=7)
        )
        args = (bench.problem, solver, bench.x0, bench.y0, bench.data, num_steps, KEY)
        row = {"solver": name}
        for label, call in (
            (
                "solve",
                lambda: bl.solve(*args, log_every=log_every, progress=False).state,
            ),
            ("run", lambda: bl.run(*args)[0]),
        ):
            handler.names.clear()
            with jax.log_compiles():
                first = _seconds(call)
            chunks = sum("_chunk" in n for n in handler.names)
            steady = min(_seconds(call) for _ in range(3))
            row.update(
                {
                    f"{label} first s": first,
                    f"{label} steady s": steady,
                    f"{label} compile s": first - steady,
                }
            )
            if label == "solve":
                row["chunk compiles"] = chunks
        rows.append(row)
        print(f"  {name} done", flush=True)
    logger.removeHandler(handler)
    logger.propagate = True
    print_table(
        f"compile time: first call vs steady state, {num_steps} steps on quadratic("
        f"dim_x=5, dim_y=10) (BSVRB: multiblock_quadratic); bl.solve with "
        f"log_every={log_every}",
        rows,
    )


def _seconds(call) -> float:
    start = time.perf_counter()
    jax.block_until_ready(call())
    return time.perf_counter() - start


if __name__ == "__main__":
    logging.getLogger("jax").setLevel(logging.WARNING)
    table_diagonal()
    table_problems()
    table_compile()
