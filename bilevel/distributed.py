"""Multi-process runs on JAX's multi-controller runtime (`jax.distributed`).

One Python process runs per host (or per accelerator); every process executes the same
program, and a global `jax.sharding.Mesh` spans the devices of all of them. `bilevel`
code does not change: build a mesh over `jax.devices()`, give batches a sharding along
its data axis (`bl.Minibatch(..., sharding=...)`) or BSVRB a block axis (`mesh=`), and
call `bl.solve` in every process. Only the main process prints progress and writes
checkpoints and outputs.

```python
import bilevel as bl
bl.distributed.initialize()  # before any other JAX call
mesh = jax.make_mesh((jax.device_count(),), ("data",))
```
"""

import os
from typing import Any

import jax
import jax.tree_util as jtu
import numpy as np
from jax.experimental import multihost_utils
from jaxtyping import PyTree


__all__ = ["barrier", "gather", "initialize", "is_main_process"]

_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an int, got {value!r}")


def _cluster_launch() -> bool:
    """True under a multi-task SLURM step or an Open MPI launch, which
    `jax.distributed.initialize` detects by itself."""
    slurm_tasks = _env_int("SLURM_STEP_NUM_TASKS") or _env_int("SLURM_NTASKS")
    if "SLURM_JOB_ID" in os.environ and (slurm_tasks or 1) > 1:
        return True
    return (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto_detect: bool | None = None,
    initialization_timeout: int = 300,
) -> bool:
    """Start JAX's distributed runtime when this process is part of a multi-process
    launch; do nothing for a single process. Call it before any other JAX work.

    Where the settings come from, in order:

    1. the arguments;
    2. the environment variables `JAX_COORDINATOR_ADDRESS` (`host:port` of process 0),
       `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`, for launchers that set them (a shell
       loop, `torchrun`-style wrappers, Kubernetes);
    3. cluster auto-detection by `jax.distributed.initialize` (SLURM, Open MPI, Cloud
       TPU pods), used when `auto_detect=True` or when a multi-task SLURM or Open MPI
       launch is recognised (`auto_detect=None`).

    On CPU, cross-process collectives use gloo (`jax_cpu_collectives_implementation`).

    **Returns:** whether the runtime was started (`False` for a single process, or when
    it is already running).
    """
    if jax.distributed.is_initialized():
        return False
    coordinator_address = coordinator_address or os.environ.get(_ENV[0]) or None
    num_processes = num_processes if num_processes is not None else _env_int(_ENV[1])
    process_id = process_id if process_id is not None else _env_int(_ENV[2])
    explicit = (coordinator_address, num_processes, process_id)
    if all(value is None for value in explicit):
        if auto_detect is False or (auto_detect is None and not _cluster_launch()):
            return False
    elif any(value is None for value in explicit) and not auto_detect:
        missing = [name for name, value in zip(_ENV, explicit) if value is None]
        raise ValueError(
            "bl.distributed.initialize: a multi-process launch needs the coordinator "
            "address, the number of processes and this process's id; missing "
            f"{', '.join(missing)} (pass them as arguments or environment variables)"
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address,
        num_processes,
        process_id,
        initialization_timeout=initialization_timeout,
    )
    return True


def is_main_process() -> bool:
    """True in process 0, the one that prints and writes files."""
    return jax.process_index() == 0


def gather(tree: PyTree) -> PyTree:
    """Host (NumPy) copies of the array leaves of `tree`, each whole in every process.

    An array sharded over the devices of several processes (e.g. BSVRB's blocks, or a
    `Result.y` of a multi-process run) cannot be read by one process alone; this
    collects its shards (`multihost_utils.process_allgather`). Arrays that one process
    can read whole (replicated, or on its own devices) are copied without
    communication. In a multi-process run, every process must call it (it is a
    collective). PRNG key arrays: gather `jax.random.key_data(key)`.
    """
    return jtu.tree_map(_gather_leaf, tree)


def _gather_leaf(leaf: Any) -> Any:
    if not isinstance(leaf, jax.Array):
        return leaf
    if leaf.is_fully_addressable or leaf.is_fully_replicated:
        return np.asarray(leaf)
    return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name` (no-op in one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _broadcast(value: np.ndarray) -> np.ndarray:
    """Process 0's `value` in every process (each passes an array of the same shape
    and dtype); `value` itself in one process."""
    if jax.process_count() == 1:
        return np.asarray(value)
    return np.asarray(multihost_utils.broadcast_one_to_all(value))
