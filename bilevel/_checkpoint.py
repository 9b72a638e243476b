"""Checkpoints of a `solve` run: the loop state (solver state, PRNG key, step), the
history and a fingerprint of what the run is.

Layout of a checkpoint directory:

- `checkpoint.npz`: the latest checkpoint; `checkpoint.prev.npz`: the one before. A new
  checkpoint is written to a uniquely named temporary file, the current one is
  hard-linked (or copied) to `checkpoint.prev.npz`, then the new file is moved into
  place with `os.replace`: at every instant a complete checkpoint exists, and reading
  falls back to the previous one if the latest is missing or damaged.
- `checkpoint.lock`: held (`flock`, exclusive) by the one run writing the directory.

Writing (`Writer`: lock, fingerprint check, atomic save) is separate from reading
(`load`: no lock). In a multi-process run (`jax.distributed`) process 0 alone locks,
checks and writes; arrays sharded over processes are gathered first (every process
takes part), and on resume every process reads the same files (the directory must be
on a file system they all see), between barriers, and places the arrays as its fresh
state is placed.
"""

import contextlib
import dataclasses
import functools as ft
import hashlib
import io
import json
import os
import pathlib
import shutil
import tempfile
import types
import warnings
import zipfile
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from . import distributed
from ._result import Status


try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock
    fcntl = None


CURRENT = "checkpoint.npz"
PREVIOUS = "checkpoint.prev.npz"
LOCK = "checkpoint.lock"
FORMAT = 2
_META_KEYS = ("format", "done", "status", "fingerprint")
_TEMPORARY = ".checkpoint.*.tmp"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: damaged, of another run, or in use."""


def exists(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a checkpoint (the latest or the previous one)."""
    directory = pathlib.Path(directory)
    return (directory / CURRENT).exists() or (directory / PREVIOUS).exists()


# --------------------------------------------------------------------------------------
# Writing.


class Writer:
    """The one writer of a checkpoint directory, for the duration of a run.

    Takes the directory's lock (a second writer fails at once, naming the process that
    holds it), removes temporary files left by a killed writer, and refuses to replace
    an existing checkpoint unless `resume` (continue it) or `overwrite` (delete it).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        fingerprint: dict[str, str],
        *,
        resume: bool,
        overwrite: bool,
    ):
        self.directory = pathlib.Path(directory)
        self.fingerprint = fingerprint
        self.resumable = False
        self._lock = None
        # In a multi-process run process 0 alone opens, checks and writes the
        # directory; it tells the others whether that worked and what to resume.
        self._main = distributed.is_main_process()
        error = None
        if self._main:
            try:
                self._open(resume, overwrite)
            except (CheckpointError, OSError) as err:
                error = err
        opened, resumable = distributed._broadcast(
            np.array([error is None, self.resumable])
        )
        if error is not None:
            raise error
        if not opened:
            raise CheckpointError(
                f"process 0 could not open the checkpoint directory {self.directory} "
                "(its error says why)"
            )
        self.resumable = bool(resumable)

    def _open(self, resume: bool, overwrite: bool) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = _acquire(self.directory)
        try:
            for stale in self.directory.glob(_TEMPORARY):
                stale.unlink(missing_ok=True)
            present = exists(self.directory)
            if present and not resume and not overwrite:
                raise CheckpointError(
                    f"{self.directory} already holds a checkpoint; pass resume=True to "
                    "continue it or overwrite=True to start over"
                )
            if present and overwrite:
                for name in (CURRENT, PREVIOUS):
                    (self.directory / name).unlink(missing_ok=True)
            self.resumable = present and resume
            if self.resumable:  # before anything is compiled: refuse another run early
                for name in (CURRENT, PREVIOUS):
                    try:
                        meta = _read(self.directory / name)["meta"]
                    except _DAMAGED:
                        continue
                    check_fingerprint(
                        meta["fingerprint"], self.fingerprint, self.directory / name
                    )
                    break
        except BaseException:
            self.close()
            raise

    def has_checkpoint(self) -> bool:
        """Whether the directory holds a checkpoint now."""
        return exists(self.directory)

    def load(self, like: Any) -> tuple[Any, list[dict], Status]:
        """The checkpointed loop state (shaped and placed like `like`), history rows
        and status. In a multi-process run every process reads the same files."""
        with _shared_read():
            # process 0 has checked the fingerprint; the others' descriptions of data
            # sharded over processes cover their own shards only
            fingerprint = self.fingerprint if self._main else None
            state, rows, meta = load(self.directory, like, fingerprint)
        return state, rows, Status(meta["status"])

    def sources(self, like: Any) -> list[Any]:
        """The loop states of the latest and the previous checkpoint, as far as they
        can be read (no warnings): where a failed run is re-run from."""
        found = []
        with _shared_read():
            for name in (CURRENT, PREVIOUS):
                try:
                    archive = _read(self.directory / name)
                    found.append(_deserialise(archive["state"], like))
                except _DAMAGED:
                    continue
        return found

    def save(self, state: Any, rows: list[dict], status: Status) -> None:
        """Write a checkpoint of `state` (a pytree with a `step`), `rows`, `status`.
        In a multi-process run every process calls it (arrays sharded over processes
        are gathered) and process 0 writes."""
        serialised = _serialise(state)
        if not self._main:
            return
        meta = {
            "format": FORMAT,
            "done": int(state.step),
            "status": status.value,
            "fingerprint": self.fingerprint,
        }
        arrays = {"state": serialised, "meta": np.array(json.dumps(meta))}
        for name in rows[0] if rows else ():
            arrays[f"history/{name}"] = np.stack([row[name] for row in rows])
        _write(self.directory, arrays)

    def close(self) -> None:
        """Release the lock."""
        if self._lock is not None:
            if fcntl is not None:
                fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None


@contextlib.contextmanager
def _shared_read():
    """Barriers around a read in a multi-process run: before it, so that process 0
    has finished writing; after it, so that it writes nothing new while others read."""
    distributed.barrier("bilevel checkpoint written")
    try:
        yield
    finally:
        distributed.barrier("bilevel checkpoint read")


def _acquire(directory: pathlib.Path):
    handle = open(directory / LOCK, "a+")
    if fcntl is None:
        return handle
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise CheckpointError(
            f"checkpoint directory {directory} is in use by another run (process "
            f"{owner}); two runs cannot share a checkpoint directory"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _write(directory: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    descriptor, temporary = tempfile.mkstemp(
        dir=directory, prefix=".checkpoint.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        current = directory / CURRENT
        if current.exists():
            _keep_previous(current, directory)
        os.replace(temporary, current)
    except BaseException:
        pathlib.Path(temporary).unlink(missing_ok=True)
        raise


def _keep_previous(current: pathlib.Path, directory: pathlib.Path) -> None:
    """Make `checkpoint.prev.npz` a copy of the current file, atomically, leaving the
    current one in place (so a kill at any point leaves a complete checkpoint)."""
    descriptor, temporary = tempfile.mkstemp(
        dir=directory, prefix=".checkpoint.", suffix=".tmp"
    )
    os.close(descriptor)
    os.unlink(temporary)
    try:
        os.link(current, temporary)
    except OSError:  # no hard links on this file system
        shutil.copyfile(current, temporary)
    os.replace(temporary, directory / PREVIOUS)


# --------------------------------------------------------------------------------------
# Reading.


def load(
    directory: str | os.PathLike, like: Any, fingerprint: dict[str, str] | None = None
) -> tuple[Any, list[dict], dict]:
    """Read the checkpoint in `directory` into a pytree shaped like `like`.

    Falls back to the previous checkpoint (with a warning) when the latest is missing
    or damaged. Raises `CheckpointError` when neither can be read, when the
    checkpoint's fingerprint differs from `fingerprint` (naming what differs), or when
    its state does not fit `like` (a solver state saved by another version).
    """
    directory = pathlib.Path(directory)
    problems = []
    for name in (CURRENT, PREVIOUS):
        path = directory / name
        if not path.exists():
            problems.append(f"{path} is missing")
            continue
        try:
            archive = _read(path)
        except _DAMAGED as err:
            problems.append(f"{path} is corrupted ({err})")
            continue
        if fingerprint is not None:
            check_fingerprint(archive["meta"]["fingerprint"], fingerprint, path)
        try:
            state = _deserialise(archive["state"], like)
        except _DAMAGED as err:  # read intact (zip checksums): a state of another shape
            raise CheckpointError(
                f"{path} holds a solver state laid out differently from the one this "
                f"run builds ({err}): it was saved by another version of bilevel or "
                "of the solver. Resume with that version, or pass overwrite=True "
                "(resume=False) or another directory to start over"
            ) from err
        if problems:
            warnings.warn(f"{'; '.join(problems)}: resuming from {path}", stacklevel=3)
        return state, archive["rows"], archive["meta"]
    raise CheckpointError(
        f"no usable checkpoint in {directory}: {'; '.join(problems)}. Delete the "
        "directory (or pass overwrite=True) to start over"
    )


_DAMAGED = (
    OSError,
    ValueError,
    KeyError,
    EOFError,
    TypeError,
    zipfile.BadZipFile,
    RuntimeError,
)


def _read(path: pathlib.Path) -> dict[str, Any]:
    with np.load(path, allow_pickle=False) as archive:
        meta = json.loads(str(archive["meta"]))
        missing = [key for key in _META_KEYS if key not in meta]
        if missing or meta["format"] != FORMAT:
            raise ValueError(
                f"metadata without {missing}"
                if missing
                else f"format {meta['format']}, expected {FORMAT}"
            )
        names = [k.split("/", 1)[1] for k in archive.files if k.startswith("history/")]
        columns = {name: archive[f"history/{name}"] for name in names}
        state = archive["state"].tobytes()
    num_rows = len(next(iter(columns.values()))) if columns else 0
    rows = [
        {name: column[i] for name, column in columns.items()} for i in range(num_rows)
    ]
    return {"meta": meta, "rows": rows, "state": state}


# PRNG keys of the new style (`jax.random.key`) are stored as their raw data.


def _is_key(leaf) -> bool:
    return isinstance(leaf, jax.Array) and jnp.issubdtype(
        leaf.dtype, jax.dtypes.prng_key
    )


def _raw(tree):
    return jtu.tree_map(lambda u: jax.random.key_data(u) if _is_key(u) else u, tree)


def _serialise(state: Any) -> np.ndarray:
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, distributed.gather(_raw(state)))
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8)


def _deserialise(data: bytes, like: Any) -> Any:
    raw = eqx.tree_deserialise_leaves(io.BytesIO(data), _raw(like))

    def restore(value, model):
        if _is_key(model):
            value = jax.random.wrap_key_data(value, impl=jax.random.key_impl(model))
        if isinstance(model, jax.Array) and len(model.sharding.device_set) > 1:
            return jax.device_put(value, model.sharding)  # as the fresh state is
        return value

    return jtu.tree_map(restore, raw, like)


# --------------------------------------------------------------------------------------
# Fingerprints: what a run is, as {"path": "description"}.


def fingerprint(
    problem: Any, solver: Any, x0: Any, y0: Any, data: Any, log_every: int
) -> dict[str, str]:
    """Describe a run: the solver's type and hyperparameters, the problem's objectives
    (functions by name and bytecode, with the constants they close over), the
    structure, shapes and dtypes of `x0` and `y0`, the data's shapes and a content
    hash, and `log_every`. Module-level globals that functions read are not included.
    """
    out: dict[str, str] = {"log_every": str(log_every)}
    for name, value, content in (
        ("solver", solver, True),
        ("problem", problem, True),
        ("x0", x0, False),
        ("y0", y0, False),
        ("data", data, True),
    ):
        _describe(value, name, out, content, ())
    return out


def check_fingerprint(stored: dict[str, str], current: dict[str, str], path) -> None:
    """Raise `CheckpointError` naming the differences between two fingerprints."""
    differ = sorted(
        k for k in stored.keys() | current.keys() if stored.get(k) != current.get(k)
    )
    if not differ:
        return
    lines = [
        f"  {k}: {_short(stored.get(k))} (checkpoint) vs {_short(current.get(k))} (now)"
        for k in differ[:8]
    ]
    more = f"\n  ... and {len(differ) - 8} more" if len(differ) > 8 else ""
    raise CheckpointError(
        f"{path} belongs to another run; resuming would mix two runs. What differs:\n"
        + "\n".join(lines)
        + more
        + "\nResume with the original settings, or pass overwrite=True (resume=False) "
        "or another directory to start over."
    )


def _short(text: str | None) -> str:
    if text is None:
        return "absent"
    return text if len(text) <= 60 else text[:57] + "..."


_MAX_DEPTH = 24
_MAX_ENTRIES = 5000
_HASHED_WHOLE = 1 << 20  # arrays up to this many elements are hashed whole
_SAMPLES = 1 << 16


def _describe(obj: Any, path: str, out: dict, content: bool, ancestors: tuple) -> None:
    if len(out) >= _MAX_ENTRIES or len(ancestors) >= _MAX_DEPTH:
        out[path] = _type_name(obj)
        return
    if obj is None or isinstance(obj, bool | int | float | complex | str | bytes):
        out[path] = repr(obj)
        return
    if isinstance(obj, np.generic):
        out[path] = f"{obj.dtype}({obj.item()!r})"
        return
    if isinstance(obj, jax.Array | np.ndarray):
        out[path] = _describe_array(obj, content)
        return
    if any(obj is a for a in ancestors):
        out[path] = "(cycle)"
        return
    ancestors = (*ancestors, obj)
    children = _children(obj)
    out[path] = _summary(obj)
    for name, child in children:
        _describe(child, f"{path}.{name}", out, content, ancestors)


def _children(obj: Any) -> list[tuple[str, Any]]:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [(f.name, getattr(obj, f.name, None)) for f in dataclasses.fields(obj)]
    if isinstance(obj, ft.partial):
        return [("func", obj.func), ("args", obj.args), ("keywords", obj.keywords)]
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return list(zip(obj._fields, obj))
    if isinstance(obj, list | tuple):
        return [(str(i), v) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        return [(str(k), obj[k]) for k in sorted(obj, key=str)]
    if isinstance(obj, types.MethodType):
        return [("__func__", obj.__func__), ("__self__", obj.__self__)]
    if isinstance(obj, types.FunctionType):
        cells = obj.__closure__ or ()
        closure = [
            (name, _cell(cell)) for name, cell in zip(obj.__code__.co_freevars, cells)
        ]
        defaults = [("defaults", obj.__defaults__)] if obj.__defaults__ else []
        return closure + defaults
    wrapped = getattr(obj, "__wrapped__", None)
    if wrapped is not None:
        return [("__wrapped__", wrapped)]
    return []


def _cell(cell) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def _summary(obj: Any) -> str:
    if isinstance(obj, types.FunctionType):
        code = obj.__code__
        return f"function {obj.__module__}.{obj.__qualname__} [{_code_digest(code)}]"
    if isinstance(obj, list | tuple | dict):
        return f"{type(obj).__name__}[{len(obj)}]"
    return _type_name(obj)


def _type_name(obj: Any) -> str:
    if callable(obj) and hasattr(obj, "__qualname__") and not isinstance(obj, type):
        return (
            f"{type(obj).__name__} {getattr(obj, '__module__', '')}.{obj.__qualname__}"
        )
    kind = obj if isinstance(obj, type) else type(obj)
    return f"{kind.__module__}.{kind.__qualname__}"


def _code_digest(code: types.CodeType) -> str:
    digest = hashlib.blake2b(digest_size=8)
    digest.update(code.co_code)
    digest.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            digest.update(_code_digest(const).encode())
        else:
            digest.update(repr(const).encode())
    return digest.hexdigest()


def _describe_array(array: Any, content: bool) -> str:
    if _is_key(array):
        array = jax.random.key_data(array)
    text = f"{array.dtype}{list(array.shape)}"
    if not content:
        return text
    return f"{text} #{_array_digest(array)}"


def _array_digest(array: Any) -> str:
    """A content hash: of every element for arrays up to 2**20 elements, else of
    2**16 evenly spaced elements and the sum (computed where the array lives); of an
    array sharded over several processes, of this process's shards."""
    digest = hashlib.blake2b(digest_size=8)
    if isinstance(array, jax.Array) and not (
        array.is_fully_addressable or array.is_fully_replicated
    ):  # sharded over processes: this process's shards
        for shard in array.addressable_shards:
            digest.update(repr(shard.index).encode())
            digest.update(np.asarray(shard.data).tobytes())
    elif array.size <= _HASHED_WHOLE:
        digest.update(np.ascontiguousarray(np.asarray(array)).tobytes())
    else:
        flat = array.reshape(-1)
        stride = array.size // _SAMPLES
        digest.update(np.asarray(flat[::stride]).tobytes())
        digest.update(np.asarray(flat.sum()).tobytes())
    return digest.hexdigest()
