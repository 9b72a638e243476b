"""Progress of a `solve` run: a compact bar on a terminal, plain lines elsewhere."""

import sys
import time
from typing import Any, TextIO


_BAR_FORMAT = (
    "{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {postfix}"
)


def display(
    enabled: bool,
    total: int,
    done: int,
    tol: float | None,
    tol_metric: str,
    stream: TextIO | None = None,
):
    """A progress display for a run of `total` steps starting at `done`, or None.

    On a terminal (or in a Jupyter kernel): a tqdm bar whose fixed text fits in 80
    columns, with the upper loss and the lower residual. Anywhere else (a log file, a
    pipe): one plain line per log point.
    """
    if not enabled:
        return None
    stream = sys.stderr if stream is None else stream
    shown = ["upper_loss", "lower_residual"]
    if tol is not None and tol_metric not in shown:
        shown.append(tol_metric)
    if _interactive(stream):
        return Bar(total, done, shown, stream)
    return Lines(total, done, shown, stream)


def _interactive(stream: TextIO) -> bool:
    if type(stream).__module__.startswith("ipykernel"):
        return True
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _number(value: Any) -> str:
    return f"{float(value):.3e}"


class Lines:
    """One line per log point: `step 150/1000  upper_loss 1.234e-01  ...  [0:00:03]`."""

    def __init__(self, total: int, done: int, shown: list[str], stream: TextIO):
        self.total, self.shown, self.stream = total, shown, stream
        self.started = time.monotonic()
        self.width = len(str(total))

    def update(self, done: int, row: dict) -> None:
        values = "  ".join(
            f"{name} {_number(row[name])}" for name in self.shown if name in row
        )
        seconds = int(time.monotonic() - self.started)
        elapsed = f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        print(
            f"step {done:>{self.width}}/{self.total}  {values}  [{elapsed}]",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        pass


class Bar:
    """A tqdm bar at most 80 columns wide (narrower if the terminal is), the numbers
    in its postfix never cut: short labels, fixed-width numbers."""

    labels = {"upper_loss": "loss", "lower_residual": "lower_res"}

    def __init__(self, total: int, done: int, shown: list[str], stream: TextIO):
        from tqdm.auto import tqdm

        self.shown = shown
        self.bar = tqdm(
            total=total,
            initial=done,
            unit="step",
            file=stream,
            bar_format=_BAR_FORMAT,
            ncols=_columns(stream),
        )

    def update(self, done: int, row: dict) -> None:
        self.bar.set_postfix_str(
            " ".join(
                f"{self.labels.get(name, name)}={_number(row[name])}"
                for name in self.shown
                if name in row
            ),
            refresh=False,
        )
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def _columns(stream: TextIO) -> int:
    import shutil

    return min(80, shutil.get_terminal_size((80, 24)).columns)
