"""Atomic checkpoints of a `solve` run: full solver state, PRNG key, step and history.

One file per checkpoint, written to a temporary name and moved into place with
`os.replace` (atomic on POSIX), so a crash mid-write never damages the last good
checkpoint; the one before it is kept as `checkpoint.prev.npz`.
"""

import io
import json
import os
import pathlib
import zipfile
from typing import Any

import equinox as eqx
import numpy as np


CURRENT = "checkpoint.npz"
PREVIOUS = "checkpoint.prev.npz"


def save(directory: str | os.PathLike, state: Any, rows: list[dict], meta: dict) -> None:
    """Write `state` (any pytree, incl. the PRNG key), history rows and metadata."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, state)
    arrays = {"state": np.frombuffer(buffer.getvalue(), dtype=np.uint8),
              "meta": np.array(json.dumps(meta))}
    for name in rows[0] if rows else ():
        arrays[f"history/{name}"] = np.stack([row[name] for row in rows])
    temporary = directory / f".{CURRENT}.tmp"
    with open(temporary, "wb") as handle:
        np.savez(handle, **arrays)
        handle.flush()
        os.fsync(handle.fileno())
    current = directory / CURRENT
    if current.exists():
        os.replace(current, directory / PREVIOUS)
    os.replace(temporary, current)


def exists(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a checkpoint."""
    return (pathlib.Path(directory) / CURRENT).exists()


def load(directory: str | os.PathLike, like: Any) -> tuple[Any, list[dict], dict]:
    """Read the checkpoint in `directory` into a pytree shaped like `like`.

    Raises `ValueError` naming the file when it is unreadable or does not match the
    solver state (e.g. another solver or problem size); the previous checkpoint is kept.
    """
    path = pathlib.Path(directory) / CURRENT
    try:
        with np.load(path, allow_pickle=False) as archive:
            meta = json.loads(str(archive["meta"]))
            state = eqx.tree_deserialise_leaves(io.BytesIO(archive["state"].tobytes()), like)
            names = [k.split("/", 1)[1] for k in archive.files if k.startswith("history/")]
            columns = {name: archive[f"history/{name}"] for name in names}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, RuntimeError) as err:
        previous = pathlib.Path(directory) / PREVIOUS
        hint = f"; the previous checkpoint is kept at {previous}" if previous.exists() else ""
        raise ValueError(
            f"checkpoint {path} is corrupted or does not match this solver state ({err}). "
            f"Delete it, or restore a previous one{hint}."
        ) from err
    num_rows = len(next(iter(columns.values()))) if columns else 0
    rows = [{name: column[i] for name, column in columns.items()} for i in range(num_rows)]
    return state, rows, meta
