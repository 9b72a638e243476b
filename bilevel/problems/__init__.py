"""Benchmark tasks: each constructor returns a [`bilevel.problems.Benchmark`][]."""

from ._benchmark import Benchmark as Benchmark
from ._quadratic import quadratic as quadratic
