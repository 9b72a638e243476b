"""The runs of tests/test_distributed.py: built the same way in the test process (one
device, the reference) and in every process of a multi-process launch
(`tests/multiprocess.py`), which calls `main` and prints its JSON answer.

Phases (`main(phase, root, ...)`):

- `compare`: ImplicitDiff on a ridge problem with minibatches sharded along a `data`
  mesh axis, and BSVRB with its blocks sharded along a `blocks` axis, both over every
  device of every process; progress captured to check who prints.
- `kill`: a checkpointed ImplicitDiff run whose processes all exit (`os._exit`, no
  clean-up) at the log point of step `KILL_AT`, after that checkpoint is written.
- `resume`: the killed run resumed to `NUM_STEPS`, and the same run uninterrupted.
- `cli`: `bilevel run ... --distributed --out DIR` with stdout captured.
"""

import contextlib
import io
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import bilevel as bl


NUM_STEPS = 20
LOG_EVERY = 5
KILL_AT = 10
SHARDS = 4  # global devices of every launch, and BSVRB's `num_shards` reference


def _lower(x, y, batch):
    inputs, targets = batch
    residual = inputs @ y - targets
    return 0.5 * jnp.mean(residual**2) + 0.5 * jnp.exp(x) * jnp.sum(y**2)


def _upper(x, y, batch):
    inputs, targets = batch
    return 0.5 * jnp.mean((inputs @ y - targets) ** 2)


def ridge(sharding=None):
    """`(problem, data, x0, y0)`: a ridge penalty tuned on validation rows, minibatches
    of 16 of 64 training rows (4 per device on 4 devices) and of 32 validation rows."""
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(96, 5))
    targets = inputs @ rng.normal(size=5) + 0.3 * rng.normal(size=96)
    data = bl.Minibatch(
        upper=(inputs[64:], targets[64:]),
        lower=(inputs[:64], targets[:64]),
        batch_size=16,
        sharding=sharding,
    )
    return bl.BilevelProblem(_upper, _lower), data, np.array(0.0), np.zeros(5)


IMPLICIT_DIFF = bl.solvers.ImplicitDiff(inner_steps=5)


def solve_ridge(sharding=None, **kwargs) -> bl.Result:
    """The ImplicitDiff run on `ridge(sharding)`."""
    problem, data, x0, y0 = ridge(sharding)
    kwargs = {"progress": False, **kwargs}
    return bl.solve(
        problem,
        IMPLICIT_DIFF,
        x0,
        y0,
        data,
        num_steps=NUM_STEPS,
        log_every=LOG_EVERY,
        **kwargs,
    )


def solve_blocks(**solver_options) -> bl.Result:
    """BSVRB (v1, lazy lower updates) on an 8-block quadratic, 4 blocks per step."""
    bench = bl.problems.multiblock_quadratic(num_blocks=8, batch_size=4, seed=2)
    solver = bl.solvers.BSVRB(
        version=1,
        blocks_per_step=4,
        eta=0.1,
        tau=0.1,
        tau_v=0.1,
        gamma=1.0,
        hessian_floor=0.5,
        lower_update="lazy",
        **solver_options,
    )
    return bl.solve(
        bench.problem,
        solver,
        bench.x0,
        bench.y0,
        bench.data,
        num_steps=NUM_STEPS,
        log_every=LOG_EVERY,
        progress=False,
    )


def summary(result: bl.Result) -> dict:
    """What the tests compare: x, y (gathered) and the history, as lists."""
    x, y = bl.distributed.gather((result.x, result.y))
    return {
        "x": np.asarray(x).tolist(),
        "y": np.asarray(y).tolist(),
        "history": {k: np.asarray(v).tolist() for k, v in result.history.items()},
    }


def _mesh(axis: str, kind: str) -> Mesh:
    """A mesh over every device: `jax.make_mesh` (Explicit axes) or `Mesh` (Auto)."""
    if kind == "explicit":
        return jax.make_mesh((jax.device_count(),), (axis,))
    return Mesh(np.array(jax.devices()), (axis,))


def _compare(data_mesh: str, block_mesh: str) -> dict:
    sharding = NamedSharding(_mesh("data", data_mesh), P("data"))
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        ridge_run = solve_ridge(sharding, progress=True)
    blocks = solve_blocks(mesh=_mesh("blocks", block_mesh))
    return {
        "ridge": summary(ridge_run),
        "blocks": summary(blocks),
        "block_spec": [
            list(blocks.state.y.sharding.spec),
            blocks.state.y.sharding.mesh.size,
        ],
        "progress": captured.getvalue(),
    }


def _kill(directory: str) -> dict:
    def exit_at(step, metrics, x, y):
        if step >= KILL_AT:
            os._exit(0)  # every process, as a machine failure would: no clean-up

    solve_ridge(_data_sharding(), checkpoint=directory, callback=exit_at)
    raise AssertionError("the run was not killed")


def _resume(directory: str) -> dict:
    resumed = solve_ridge(_data_sharding(), checkpoint=directory, resume=True)
    return {
        "resumed": summary(resumed),
        "uninterrupted": summary(solve_ridge(_data_sharding())),
    }


def _cli(out: str) -> dict:
    from bilevel.cli import main as cli

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        code = cli(
            ["run", "ridge_hpo", "--solver", "implicitdiff", "--steps", "4", "--x64"]
            + ["--distributed", "--out", out]
        )
    return {"code": code, "stdout": stdout.getvalue()}


def _data_sharding() -> NamedSharding:
    return NamedSharding(_mesh("data", "explicit"), P("data"))


def main(argv: list[str]) -> None:
    """Run the phases `argv[0]` (`"compare+kill"`: one after the other) with their
    arguments (`argv[1:]`, one comma-separated string per phase). This process's
    answer, a JSON object, is printed before and after every phase (the last line
    printed is the answer: a killed phase leaves the answer up to it)."""
    phases, *args = argv
    answer = {
        "process": jax.process_index(),
        "processes": jax.process_count(),
        "devices": jax.device_count(),
        "pid": os.getpid(),
    }
    runs = {"compare": _compare, "kill": _kill, "resume": _resume, "cli": _cli}
    for phase, phase_args in zip(phases.split("+"), args, strict=True):
        print(json.dumps(answer), flush=True)
        start = time.perf_counter()
        answer[phase] = runs[phase](*phase_args.split(","))
        answer[f"{phase}_seconds"] = time.perf_counter() - start
    print(json.dumps(answer), flush=True)


if __name__ == "__main__":  # pragma: no cover - run by the launcher
    main(sys.argv[1:])
