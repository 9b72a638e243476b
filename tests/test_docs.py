"""Documentation coverage: every public symbol has a docstring and an API-reference
entry.

Public symbols are the names defined in `bilevel/__init__.py`,
`bilevel/solvers/__init__.py` and `bilevel/problems/__init__.py` that do not start
with `_`, submodules excluded. Each must appear as `::: bilevel.<path>` in
`docs/api/*.md`. No mkdocs build happens here (`make docs` does that); these checks
only read files and import the package.
"""

import inspect
import pathlib
import re
import types

import pytest

import bilevel
import bilevel.problems
import bilevel.solvers


ROOT = pathlib.Path(__file__).resolve().parent.parent
API_DIR = ROOT / "docs" / "api"
NAMESPACES = (bilevel, bilevel.solvers, bilevel.problems, bilevel.distributed)
ENTRY = re.compile(r"^:::[ \t]+(bilevel(?:\.\w+)+)[ \t]*$", re.MULTILINE)


def public_symbols(modules=NAMESPACES) -> dict[str, object]:
    """`{"bilevel.solvers.ImplicitDiff": obj, ...}` for the public names of
    `modules`."""
    symbols = {}
    for module in modules:
        names = getattr(module, "__all__", vars(module))  # `__all__` when it has one
        for name in names:
            obj = getattr(module, name)
            if name.startswith("_") or isinstance(obj, types.ModuleType):
                continue
            symbols[f"{module.__name__}.{name}"] = obj
    return symbols


def api_entries(api_dir: pathlib.Path = API_DIR) -> dict[str, str]:
    """`{"bilevel.X": "file.md", ...}` for every `::: bilevel.X` line of
    `api_dir/*.md`."""
    entries = {}
    for page in sorted(api_dir.glob("*.md")):
        for path in ENTRY.findall(page.read_text(encoding="utf-8")):
            entries[path] = page.name
    return entries


def own_docstring(obj: object) -> str:
    """The docstring written for `obj`, or "" when there is none.

    Dataclasses (hence equinox Modules) without a docstring get an automatic `__doc__`
    holding their signature, `Name(field: type = default, ...)`; that does not count.
    An instance (e.g. a registry mapping) is documented by its class.
    """
    doc = getattr(obj, "__doc__", None) or ""
    if inspect.isclass(obj) and doc.startswith(f"{obj.__name__}("):
        return ""
    return inspect.cleandoc(doc).strip()


def undocumented(symbols: dict[str, object]) -> list[str]:
    return sorted(path for path, obj in symbols.items() if not own_docstring(obj))


def missing_from_reference(
    symbols: dict[str, object], entries: dict[str, str]
) -> list[str]:
    return sorted(set(symbols) - set(entries))


SYMBOLS = public_symbols()
ENTRIES = api_entries()


def test_namespaces_are_not_empty():
    # Guards the scan itself: an import or filtering mistake must not make the
    # coverage tests below pass vacuously.
    assert "bilevel.BilevelProblem" in SYMBOLS
    assert "bilevel.solvers.ImplicitDiff" in SYMBOLS
    assert "bilevel.problems.quadratic" in SYMBOLS
    assert not any(path.endswith((".solvers", ".problems")) for path in SYMBOLS)
    assert ENTRIES, f"no `::: bilevel.X` entries found under {API_DIR}"


@pytest.mark.parametrize("path", sorted(SYMBOLS))
def test_public_symbol_has_docstring(path):
    assert own_docstring(SYMBOLS[path]), (
        f"{path} has no docstring of its own; write one (Markdown, with an "
        "`**Arguments:**` list) in its source"
    )


@pytest.mark.parametrize("path", sorted(SYMBOLS))
def test_public_symbol_in_api_reference(path):
    assert path in ENTRIES, (
        f"{path} is public but missing from the API reference: add a line "
        f"`::: {path}` to the matching page in docs/api/"
    )


def test_api_entries_are_public_symbols():
    # An entry for a removed or private name would document the wrong thing (or break
    # the strict build); the canonical public path must be used.
    stale = sorted(set(ENTRIES) - set(SYMBOLS))
    assert not stale, "API entries that are not public symbols: " + ", ".join(
        f"{path} (docs/api/{ENTRIES[path]})" for path in stale
    )


def test_every_solver_has_a_page():
    pages = ROOT / "docs" / "solvers"
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for name, obj in vars(bilevel.solvers).items():
        if inspect.isclass(obj) and issubclass(obj, bilevel.AbstractBilevelSolver):
            page = f"solvers/{name.lower()}.md"
            assert (pages / f"{name.lower()}.md").is_file(), (
                f"no docs/{page} for {name}"
            )
            assert page in nav, f"docs/{page} is not in the mkdocs.yml nav"


def test_checks_catch_an_undocumented_symbol(tmp_path):
    # The checks must be able to fail: a new public name without a docstring or an API
    # entry is reported, and a dataclass-generated __doc__ is not taken for a docstring.
    class Undocumented(bilevel.AbstractBilevelSolver):
        step_size: float = 0.1

        def init(self, problem, x0, y0, key):
            return None

        def step(self, problem, state, data, key):
            return state, {}

        def params(self, state):
            return None, None

    def no_docstring():
        pass

    fake = types.ModuleType("bilevel.fake")
    fake.Undocumented = Undocumented
    fake.no_docstring = no_docstring
    fake.documented = bilevel.solve
    symbols = public_symbols([fake])
    assert Undocumented.__doc__  # the automatic signature text
    assert undocumented(symbols) == [
        "bilevel.fake.Undocumented",
        "bilevel.fake.no_docstring",
    ]

    (tmp_path / "page.md").write_text("# Page\n\n::: bilevel.fake.documented\n")
    entries = api_entries(tmp_path)
    assert entries == {"bilevel.fake.documented": "page.md"}
    assert missing_from_reference(symbols, entries) == [
        "bilevel.fake.Undocumented",
        "bilevel.fake.no_docstring",
    ]
