"""`--set KEY=VALUE`: which solver field or problem parameter a key names, its value
checked against the field's type, then the solvers and the problem built from them."""

import dataclasses
import inspect
import json
import types
import typing
from collections.abc import Callable
from typing import Any


class UsageError(Exception):
    """Bad command-line input: reported on stderr in one line, exit status 2."""


def one_line(error: BaseException) -> str:
    """An exception's message on one line."""
    return " ".join(str(error).split())


def solver_classes() -> dict[str, type]:
    """Public solvers by lower-case name."""
    import bilevel as bl

    classes = {}
    for name in dir(bl.solvers):
        obj = getattr(bl.solvers, name)
        if isinstance(obj, type) and issubclass(obj, bl.AbstractBilevelSolver):
            classes[name.lower()] = obj
    return classes


def solver_class(name: str) -> type:
    """The solver called `name` (any case); `UsageError` listing the valid ones."""
    classes = solver_classes()
    if name.lower() not in classes:
        raise UsageError(
            f"unknown solver {name!r}; available: {', '.join(sorted(classes))}"
        )
    return classes[name.lower()]


def known_problem(name: str) -> str:
    """`name` if it is a registered problem; `UsageError` listing the valid ones."""
    from bilevel.problems import registry

    if name not in registry:
        raise UsageError(
            f"unknown problem {name!r}; available: {', '.join(sorted(registry))}"
        )
    return name


# -----------------------------------------------------------------------------------
# Values: read as JSON when they parse, else as a string, then checked against the type.


def _linear_solvers() -> dict[str, Callable[[], Any]]:
    """Lineax solvers by name, with the library's default tolerance for the dtype."""
    import jax.numpy as jnp
    import lineax as lx

    from bilevel._misc import default_tolerance

    tol = default_tolerance(jnp.result_type(float))
    return {
        "cg": lambda: lx.CG(rtol=tol, atol=tol, max_steps=1000),
        "gmres": lambda: lx.GMRES(rtol=tol, atol=tol, max_steps=1000, restart=20),
        "bicgstab": lambda: lx.BiCGStab(rtol=tol, atol=tol, max_steps=1000),
        "lu": lx.LU,
        "auto": lambda: lx.AutoLinearSolver(well_posed=None),
    }


def _named_objects(annotation: Any) -> dict[str, Callable[[], Any]] | None:
    import lineax as lx

    if isinstance(annotation, type) and issubclass(annotation, lx.AbstractLinearSolver):
        return _linear_solvers()
    return None


def _members(annotation: Any) -> tuple:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _accepts(member: Any, value: Any) -> bool:
    if typing.get_origin(member) is typing.Literal:
        return value in typing.get_args(member)
    if member is type(None):
        return value is None
    if member is bool:
        return isinstance(value, bool)
    if member is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if member is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if member is str:
        return isinstance(value, str)
    return False


def _describe(member: Any) -> str:
    if typing.get_origin(member) is typing.Literal:
        return " or ".join(repr(option) for option in typing.get_args(member))
    if member is type(None):
        return "null"
    names = {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
    }
    if member in names:
        return names[member]
    named = _named_objects(member)
    if named is not None:
        return " or ".join(named)
    return f"a {getattr(member, '__name__', member)} (set it from Python)"


def convert(key: str, text: str, annotation: Any) -> Any:
    """The value of `--set key=text` for a field annotated `annotation`; `UsageError`
    with a one-line reason when it does not fit. An unknown annotation (`Any`) takes
    the value as read."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    members = _members(annotation)
    if annotation is Any or any(_accepts(member, value) for member in members):
        return value
    for member in members:
        named = _named_objects(member)
        if named is not None and isinstance(value, str) and value.lower() in named:
            return named[value.lower()]()
    wanted = " or ".join(_describe(member) for member in members)
    raise UsageError(f"--set {key}={text}: must be {wanted}")


def _solver_types(cls: type) -> dict[str, Any]:
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):
        hints = {}
    return {field.name: hints.get(field.name, Any) for field in dataclasses.fields(cls)}


def _problem_types(problem: str) -> dict[str, Any]:
    from bilevel.problems import registry

    constructor = registry[problem]
    try:
        hints = typing.get_type_hints(constructor)
    except (NameError, TypeError):
        hints = {}
    names = inspect.signature(constructor).parameters
    return {name: hints.get(name, Any) for name in names}


# -----------------------------------------------------------------------------------
# Keys: `problem.NAME`, `SOLVER.FIELD` (one solver of the list), or `FIELD` (every
# solver of the list that has it).


@dataclasses.dataclass
class Settings:
    """Parsed `--set` values: keyword arguments per solver name and for the problem."""

    solvers: dict[str, dict[str, Any]]
    problem: dict[str, Any]


def parse_settings(pairs: list[str], solvers: list[str], problem: str) -> Settings:
    """Sort `--set` pairs into solver fields (keyed by lower-case solver name) and
    problem parameters, converting each value; `UsageError` naming the pair and the
    valid keys or values."""
    fields = {name.lower(): _solver_types(solver_class(name)) for name in solvers}
    params = _problem_types(problem)
    settings = Settings({name: {} for name in fields}, {})
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--set expects KEY=VALUE, got {pair!r}")
        prefix, dot, rest = key.partition(".")
        if dot and prefix == "problem" and rest in params:
            settings.problem[rest] = convert(key, text, params[rest])
            continue
        solver = prefix.lower() if dot and prefix.lower() in fields else None
        field = rest if solver else key
        applied = [n for n in ([solver] if solver else fields) if field in fields[n]]
        if not applied:
            valid = _valid_keys({solver: fields[solver]} if solver else fields, params)
            raise UsageError(f"unknown --set key {key!r}; valid keys: {valid}")
        for name in applied:
            settings.solvers[name][field] = convert(key, text, fields[name][field])
    return settings


def _valid_keys(fields: dict[str, dict], params: dict) -> str:
    solver_keys = list(
        dict.fromkeys(key for types_ in fields.values() for key in types_)
    )
    problem_keys = [f"problem.{name}" for name in params]
    return ", ".join(solver_keys + problem_keys)


# -----------------------------------------------------------------------------------
# Building the problem and the solvers.


def build_problem(name: str, seed: int, params: dict[str, Any]):
    """The benchmark `name` with `params` (and `seed`, if it takes one)."""
    from bilevel.problems import make, parameters

    if "seed" in parameters(name):
        params = {"seed": seed, **params}
    try:
        return make(name, **params)
    except (TypeError, ValueError) as err:
        raise UsageError(f"cannot build problem {name!r}: {one_line(err)}") from err


def build_solver(name: str, settings: dict[str, Any]):
    """The solver `name` with its defaults under `settings`; the solver validates its
    hyperparameters at construction."""
    cls = solver_class(name)
    try:
        return cls(**settings)
    except (TypeError, ValueError) as err:
        raise UsageError(f"cannot configure {cls.__name__}: {one_line(err)}") from err


def check_applies(name: str, solver: Any, bench: Any) -> None:
    """`UsageError` when `solver` cannot run on `bench` (capabilities, data kind)."""
    from bilevel._solver import check_supported

    try:
        check_supported(solver, bench.problem, bench.data)
    except (TypeError, ValueError) as err:
        raise UsageError(
            f"{name} does not apply to {bench.name}: {one_line(err)}"
        ) from err
