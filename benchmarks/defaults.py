"""The defaults matrix: every solver with its defaults (no CLI recipes) on every
registry problem it supports, judged by the problem's own evaluation metric against the
problem's baseline; then the scale battery of the single-block solvers.

Run: `make bench` (all benchmarks) or `python benchmarks/run_all.py defaults`.
`--steps N` sets the budget (default 2000)."""

import argparse
import pathlib
import sys

import jax.numpy as jnp
import numpy as np
from _registry_defaults import defaults_rows
from _timing import print_table

import bilevel as bl


sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))
from tests import scale_battery  # noqa: E402


SOLVERS = (
    *("ImplicitDiff", "Unrolled", "Penalty", "VPBGD", "F2SA", "SLBAMM", "BOREP"),
    *("LVHBA", "SOBA", "SABA", "SRBA", "MASOBA", "BSVRB"),
)


def matrix(num_steps: int) -> list[dict]:
    rows = []
    for name in SOLVERS:
        for row in defaults_rows(getattr(bl.solvers, name), num_steps=num_steps):
            rows.append({"solver": name, **row})
    return rows


def battery(num_steps: int) -> list[dict]:
    """Relative hyper-objective gap per (s, t, condition) member after `num_steps`."""
    rows = []
    for name in SOLVERS:
        solver = getattr(bl.solvers, name)()
        try:
            x, history = scale_battery.run_family(solver, jnp.float32, num_steps)
        except (TypeError, ValueError) as error:  # not applicable
            print(f"{name}: {error}")
            continue
        gaps = scale_battery.relative_gaps(x, jnp.float32)
        row = {"solver": name}
        for (s, t, kappa), gap in zip(scale_battery.MEMBERS, gaps):
            row[f"s={s:g},t={t:g},k={kappa:g}"] = f"{gap:.1e}"
        row["finite"] = bool(np.all(np.asarray(history["finite"])[:, -1]))
        rows.append(row)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2000)
    steps = parser.parse_known_args()[0].steps
    print_table(f"Defaults matrix ({steps} steps, float32 problems)", matrix(steps))
    print_table(
        f"Scale battery, float32 (relative gap (F - F*)/(F0 - F*) after {steps} steps)",
        battery(steps),
    )
