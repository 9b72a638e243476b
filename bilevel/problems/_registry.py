"""Problem registry: registry name -> constructor, with a checked `make`."""

import inspect
from collections.abc import Callable, Iterator, Mapping

from ._benchmark import Benchmark
from ._distillation import distillation
from ._hypercleaning import hypercleaning
from ._hyperrep import hyper_representation
from ._imaml import imaml
from ._logreg import logreg_hpo
from ._multiblock import multiblock_hpo, multiblock_quadratic
from ._quadratic import quadratic
from ._ridge import ridge_hpo
from ._svm import svm_hpo


class UnknownProblemError(KeyError, ValueError):
    """An unknown problem name, from `registry[name]` or `make(name)`: one error, which
    `except KeyError` and `except ValueError` both catch."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _unknown(name: str, available) -> UnknownProblemError:
    return UnknownProblemError(
        f"unknown problem {name!r}; available: {', '.join(sorted(available))}"
    )


class _Registry(Mapping):
    """Every problem constructor by name (a read-only mapping). Each constructor
    documents its parameters in its docstring
    (`help(bl.problems.registry["ridge_hpo"])`) and returns a
    [`bilevel.problems.Benchmark`][]. Unknown names raise a `KeyError` listing the
    available ones (also a `ValueError`); see also [`bilevel.problems.make`][]."""

    def __init__(self, constructors: dict[str, Callable[..., Benchmark]]):
        self._constructors = dict(constructors)

    def __getitem__(self, name: str) -> Callable[..., Benchmark]:
        try:
            return self._constructors[name]
        except KeyError:
            raise _unknown(name, self._constructors) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._constructors)

    def __len__(self) -> int:
        return len(self._constructors)

    def __repr__(self) -> str:
        return f"registry({sorted(self._constructors)})"


registry: Mapping[str, Callable[..., Benchmark]] = _Registry(
    {
        "quadratic": quadratic,
        "ridge_hpo": ridge_hpo,
        "logreg_hpo": logreg_hpo,
        "hypercleaning": hypercleaning,
        "distillation": distillation,
        "imaml": imaml,
        "svm_hpo": svm_hpo,
        "hyper_representation": hyper_representation,
        "multiblock_quadratic": multiblock_quadratic,
        "multiblock_hpo": multiblock_hpo,
    }
)
"""Every problem constructor by name (a read-only mapping): `registry["ridge_hpo"]` is
[`bilevel.problems.ridge_hpo`][]. Unknown names raise a `KeyError` (also a `ValueError`)
listing the valid ones; [`bilevel.problems.make`][] also checks the parameters."""


def parameters(name: str) -> dict[str, object]:
    """The parameters of the constructor registered as `name`, with their defaults
    (`inspect.Parameter.empty` for required ones)."""
    signature = inspect.signature(registry[name])
    return {p.name: p.default for p in signature.parameters.values()}


def make(name: str, **params: object) -> Benchmark:
    """Build the problem registered as `name` with keyword parameters `params`.

    Raises `ValueError` for an unknown name (the same error as `registry[name]`, also a
    `KeyError`) or an unknown parameter, listing the valid ones, before any data is
    loaded.
    """
    valid = parameters(name)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(
            f"{name}: unknown parameter(s) {unknown}; valid parameters: {sorted(valid)}"
        )
    return registry[name](**params)
