"""Test configuration: float64, strict dtype and rank promotion, key fixture; XLA's
CPU backend without its optimisation passes."""

import gc
import os


# Compilation dominates this suite's time and the tests check values, not speed: XLA's
# CPU code generation at optimisation level 0 takes a third less time on the whole
# (measured on the slowest modules: 78 s -> 52 s). Set before JAX starts its backend;
# child processes (the multi-process tests) inherit it. Benchmarks do not set it.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]
).strip()

import jax  # noqa: E402
import jax.random as jr  # noqa: E402
import pytest  # noqa: E402


jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def getkey():
    """Hands out fresh PRNG keys, deterministically per test."""
    state = {"key": jr.PRNGKey(1234)}

    def _next():
        state["key"], sub = jr.split(state["key"])
        return sub

    return _next


# The slowest modules first: pytest-xdist hands whole modules to its workers
# (`--dist loadscope`), so a slow module collected last would run alone at the end.
_SLOW_MODULES = (
    "test_distributed.py",
    "test_migration.py",
    "test_bsvrb.py",
    "test_stochastic.py",
    "test_unrolled.py",
    "test_solve.py",
)


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in _SLOW_MODULES)


def _cgroup_cpus() -> float:
    """The CPU quota of this process's cgroup (v2, then v1), in CPUs; inf if none."""
    for quota_file, period_file in (
        ("/sys/fs/cgroup/cpu.max", None),
        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
    ):
        try:
            with open(quota_file) as handle:
                fields = handle.read().split()
            if period_file is not None:
                with open(period_file) as handle:
                    fields.append(handle.read().strip())
        except OSError:
            continue
        if fields[0] not in ("max", "-1"):
            return int(fields[0]) / int(fields[1])
    return float("inf")


def _available_bytes() -> float:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: as many workers as the CPUs this process may use (affinity and cgroup
    quota, which `os.cpu_count` ignores) and the memory can hold. Every worker runs its
    own JAX, so more workers than that only compete for cores and memory."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    limits = (cpus, _cgroup_cpus(), _available_bytes() / _WORKER_MEMORY)
    return max(1, int(min(limits)))


# A worker's resident memory above which its compiled programs are dropped after a
# module (`_release_compiled_programs`).
_MEMORY_LIMIT = 2 * 1024**3
# Memory set aside per worker by `-n auto`: up to `_MEMORY_LIMIT` before its programs
# are dropped, plus room for the children of the multi-process tests.
_WORKER_MEMORY = _MEMORY_LIMIT + 1024**3


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: always release
        return _MEMORY_LIMIT + 1


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after a module once the worker holds more than
    `_MEMORY_LIMIT`: a worker runs many modules, their accumulated executables grew a
    worker past 5 GB, and XLA's compiler crashed in a later module (an abort, then a
    segfault). Dropping them after every module costs recompiles of shared programs."""
    yield
    if _resident_bytes() > _MEMORY_LIMIT:
        jax.clear_caches()
        gc.collect()
