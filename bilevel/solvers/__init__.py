"""Bilevel solvers: equinox Modules with `init`, `step` and `params`."""

from ._implicit_diff import ImplicitDiff as ImplicitDiff
from ._unrolled import Unrolled as Unrolled
