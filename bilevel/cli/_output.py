"""The `--out` directory: checked before any compilation, never mixed with an older
run, written as the run goes (history rows flushed at every log point)."""

import csv
import io
import json
import math
import os
import pathlib
import tempfile
from typing import Any

from ._settings import UsageError


CONFIG = "config.json"
PLOT = "convergence.png"


def _is_output(name: str) -> bool:
    """Whether `name` is a file the command writes."""
    if name in (CONFIG, PLOT):
        return True
    return name.startswith("history") and name.endswith(".csv")


def check_writable(out: pathlib.Path) -> None:
    """Create `out` if needed and check that files can be written there."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise UsageError(f"--out {out} is not a writable directory ({reason})") from err


def prepare(out: pathlib.Path, *, force: bool, resume: bool, keep: pathlib.Path | None):
    """Make `out` ready for this run, before anything is compiled.

    A non-empty `out` is refused unless `resume` (continue the histories there) or
    `force` (delete the files an earlier run of the command wrote; anything else,
    except the checkpoint directory `keep`, is never deleted and makes the command
    refuse).
    """
    entries = sorted(p for p in out.iterdir() if keep is None or p.resolve() != keep)
    if not entries or resume:
        return
    others = [p.name for p in entries if not (p.is_file() and _is_output(p.name))]
    if not force or others:
        listed = ", ".join(p.name for p in entries[:5]) + (
            ", ..." if len(entries) > 5 else ""
        )
        hint = (
            "use --force to replace an earlier run's files"
            if not others
            else ("--force deletes only files this command writes")
        )
        raise UsageError(
            f"--out {out} is not empty ({listed}); {hint}, or pick a new directory"
        )
    for path in entries:
        path.unlink()


def write_atomic(path: pathlib.Path, text: str) -> None:
    """Replace `path` by `text` without ever leaving a half-written file."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_config(out: pathlib.Path, config: dict[str, Any]) -> None:
    """`config.json`: what was run and how it ended."""
    write_atomic(out / CONFIG, json.dumps(plain(config), indent=2) + "\n")


def read_config(out: pathlib.Path) -> dict[str, Any] | None:
    """The `config.json` of an earlier run in `out`, if there is one."""
    try:
        return json.loads((out / CONFIG).read_text())
    except (OSError, ValueError):
        return None


def plain(value: Any) -> Any:
    """JSON-ready: NaN and infinities as null, unknown objects as strings."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


class History:
    """A history CSV written row by row: one line per log point, flushed at once, so a
    killed run leaves every row it logged. Empty cells are values not measured at
    that point (the problem's evaluation runs at regular points only)."""

    def __init__(self, path: pathlib.Path, columns: list[str]):
        self.path = path
        self.columns = columns
        self._handle = None

    @staticmethod
    def read(path: pathlib.Path) -> list[dict[str, float]]:
        """The rows of an existing history file (none if it is missing)."""
        if not path.exists():
            return []
        with open(path, newline="") as handle:
            rows = [
                {k: float(v) for k, v in row.items() if v not in ("", None)}
                for row in csv.DictReader(handle)
            ]
        for row in rows:
            row["step"] = int(row["step"])
        return rows

    def _line(self, row: dict[str, Any]) -> str:
        buffer = io.StringIO()
        csv.writer(buffer).writerow(
            ["" if row.get(c) is None else row[c] for c in self.columns]
        )
        return buffer.getvalue()

    def append(self, row: dict[str, Any]) -> None:
        """Add one row and flush it to disk (one `write` call: an interrupt never
        leaves half a line)."""
        if self._handle is None:
            fresh = not self.path.exists() or self.path.stat().st_size == 0
            self._handle = open(self.path, "a", newline="")
            if fresh:
                self._handle.write(self._line(dict(zip(self.columns, self.columns))))
        self._handle.write(self._line(row))
        self._handle.flush()

    def rewrite(self, rows: list[dict[str, Any]]) -> None:
        """Replace the file by `rows` (atomically)."""
        self.close()
        text = self._line(dict(zip(self.columns, self.columns)))
        write_atomic(self.path, text + "".join(self._line(row) for row in rows))

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
