"""The `bilevel` command: list, run and compare solvers on the problems library.

    bilevel list
    bilevel run PROBLEM --solver NAME [--steps N] [--set KEY=VALUE ...] [--out DIR] ...
    bilevel compare PROBLEM --solvers a,b,c [--steps N] [--set KEY=VALUE ...] ...

`--set` takes solver fields (`--set outer_lr=0.5`) and problem parameters
(`--set problem.corruption=0.4`). Exit status: 0 done, 2 bad usage (with a one-line
reason), 3 a run ended non-finite or diverged, 130 interrupted (partial results
written). docs/cli.md documents every option.

`format_table` is the one text-table printer of the command, the examples and the
benchmarks.
"""

from ._main import build_parser as build_parser, main as main
from ._settings import solver_classes as solver_classes
from ._table import format_table as format_table
