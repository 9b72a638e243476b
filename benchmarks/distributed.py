"""Steps per second of one data-parallel ImplicitDiff run on 1, 2 and 4 local processes
(`jax.distributed`, gloo CPU collectives, one CPU device per process).

The run is the ridge example of docs/scaling-out.md with a larger training set: a
minibatch of 256 of 4096 rows per step, sharded along the mesh's `data` axis, 10 inner
steps. Every process compiles, then times `bl.solve` over `STEPS` steps after a
warm-up solve of the same chunk size (compilation excluded); the table shows process
0's median over `REPEATS` timed solves and the ratio to one process. All process counts
run one after the other on the same machine: on a shared 2-core machine, re-measure
when it is quiet.

    python benchmarks/distributed.py
"""

import pathlib
import sys

from _timing import print_table


ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.multiprocess import launch  # noqa: E402


STEPS = 200
REPEATS = 3
SCRIPT = """
import json, statistics, sys, time
import bilevel as bl
bl.distributed.initialize()
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

steps, repeats = int(sys.argv[1]), int(sys.argv[2])


def lower(x, y, batch):
    inputs, targets = batch
    residual = inputs @ y - targets
    return 0.5 * jnp.mean(residual**2) + 0.5 * jnp.exp(x) * jnp.sum(y**2)


def upper(x, y, batch):
    inputs, targets = batch
    return 0.5 * jnp.mean((inputs @ y - targets) ** 2)


rng = np.random.default_rng(0)
inputs = rng.normal(size=(5120, 32)).astype(np.float32)
targets = (inputs @ rng.normal(size=32) + 0.5 * rng.normal(size=5120)).astype(
    np.float32
)
mesh = jax.make_mesh((jax.device_count(),), ("data",))
data = bl.Minibatch(
    upper=(inputs[4096:], targets[4096:]),
    lower=(inputs[:4096], targets[:4096]),
    batch_size=256,
    sharding=NamedSharding(mesh, P("data")),
)
arguments = (
    bl.BilevelProblem(upper, lower),
    bl.solvers.ImplicitDiff(inner_steps=10),
    np.array(0.0, np.float32),
    np.zeros(32, np.float32),
    data,
)
options = dict(num_steps=steps, log_every=steps // 4, progress=False)
bl.solve(*arguments, **options)  # compiles
seconds = []
for _ in range(repeats):
    bl.distributed.barrier("timed solve")
    start = time.perf_counter()
    result = bl.solve(*arguments, **options)
    seconds.append(time.perf_counter() - start)
print(json.dumps({"seconds": statistics.median(seconds), "x": float(result.x)}))
"""


def measure(processes: int) -> dict:
    """Process 0's median seconds per timed solve and its final x."""
    answers = launch(SCRIPT, processes, 1, timeout=900, args=(str(STEPS), str(REPEATS)))
    return answers[0]


def main() -> None:
    rows, base = [], None
    for processes in (1, 2, 4):
        answer = measure(processes)
        rate = STEPS / answer["seconds"]
        base = base or rate
        rows.append(
            {
                "processes": processes,
                "steps/s": f"{rate:.1f}",
                "relative to 1": f"{rate / base:.3g}",
                "final x": f"{answer['x']:.6f}",
            }
        )
        print(rows[-1], flush=True)
    print_table(
        f"ImplicitDiff, minibatch 256 sharded over processes, {STEPS} steps", rows
    )


if __name__ == "__main__":
    main()
