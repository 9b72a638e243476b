"""`convergence.png`: the problem's evaluation metric, the upper loss, the lower
residual and the hypergradient norm against the step, one curve per solver."""

import pathlib
import sys

import numpy as np

from ._runner import EVAL_PREFIX, Trace


SOLVER_PANELS = (  # (history column, axis label, log scale)
    ("upper_loss", "upper loss f(x, y) (solver's own)", False),
    ("lower_residual", "lower residual ||Phi(x, y)||", True),
    ("grad_norm", "hypergradient norm", True),
)


def plot(path: pathlib.Path, traces: list[Trace], metric: str, start: float) -> None:
    """Draw the traces into `path`; says so on stderr when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "bilevel: no plot (matplotlib is missing: pip install 'bilevel[plot]')",
            file=sys.stderr,
        )
        return
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    panels = ((EVAL_PREFIX + metric, f"{metric} (problem's evaluation)", False),)
    for ax, (column, label, log) in zip(axes.flat, panels + SOLVER_PANELS):
        for trace in traces:
            steps, values = _series(trace, column)
            if column.startswith(EVAL_PREFIX):
                steps, values = [0, *steps], [start, *values]
            if len(steps):
                draw = ax.semilogy if log else ax.plot
                draw(
                    steps,
                    np.abs(values) if log else values,
                    marker=".",
                    label=trace.name,
                )
        ax.set(ylabel=label)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set(xlabel="step")
    axes[0, 0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _series(trace: Trace, column: str) -> tuple[list, list]:
    rows = [row for row in trace.rows if column in row]
    return [row["step"] for row in rows], [row[column] for row in rows]
