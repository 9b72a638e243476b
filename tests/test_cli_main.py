"""The `bilevel` command in-process (`bilevel.cli.main(argv)`): usage errors, the
`--out` and `--checkpoint` rules, exit statuses, ranking by the problem's evaluation,
`list`.

Runs use `bl.problems.quadratic` shrunk with `--set problem.*` and a few dozen steps;
its closed-form optimum (`x_error` in `evaluate`) is the oracle."""

import csv
import importlib.metadata
import json
import math
import re

import pytest

import bilevel as bl
from bilevel.cli import format_table, main, solver_classes
from bilevel.cli._settings import parse_settings
from bilevel.cli._summaries import PROBLEMS, SOLVERS


TINY = "--set problem.dim_x=2 --set problem.dim_y=4 --quiet"
RUN = "run quadratic --solver implicitdiff"


def cli(capsys, *parts):
    """`(exit status, stdout, stderr)` of `bilevel PARTS`: strings are split at spaces,
    paths and numbers are single arguments."""
    argv = [w for p in parts for w in (p.split() if isinstance(p, str) else [str(p)])]
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def no_solve(monkeypatch):
    """Fail the test if anything is run (i.e. compiled): errors must come first."""

    def forbidden(*args, **kwargs):
        raise AssertionError("bl.solve was called")

    monkeypatch.setattr(bl, "solve", forbidden)


def read_history(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# -- bad usage: exit 2, one line, nothing compiled -------------------------------------


@pytest.mark.parametrize(
    "command, message",
    [
        ("run nosuch --solver implicitdiff", r"unknown problem 'nosuch'; .*quadratic"),
        ("run quadratic --solver nosuch", r"unknown solver 'nosuch'; .*unrolled"),
        ("compare nosuch --solvers implicitdiff", r"unknown problem 'nosuch'"),
        (RUN + " --set bogus=1", r"unknown --set key 'bogus'; valid keys: .*inner_st"),
        (RUN + " --set linear_solver=abc", r"linear_solver=abc: must be cg or gmres"),
        (RUN + " --set outer_lr=abc", r"--set outer_lr=abc: must be a number"),
        (RUN + " --set inner_steps=1.5", r"inner_steps=1\.5: must be an integer"),
        (RUN + " --set inner_steps=0", r"cannot configure ImplicitDiff: .*inner_steps"),
        (RUN + " --set problem.dim_x=x", r"problem\.dim_x=x: must be an integer"),
        (RUN + " --resume", r"--resume needs --checkpoint"),
        (RUN + " --steps 0", r"--steps must be >= 1"),
        (RUN + " --log-every 0", r"--log-every must be >= 1"),
        (
            "run quadratic --solver slbamm --set strategy=s9",
            r"--set strategy=s9: must be 's1' or 's2' or 's3'",
        ),
        (
            "compare hypercleaning --solvers implicitdiff --set problem.model=a",
            r"--set problem\.model=a: must be 'linear' or 'mlp'",
        ),
        (
            "compare quadratic --solvers unrolled,slbamm --set slbamm.inner_steps=1",
            r"unknown --set key 'slbamm\.inner_steps'; valid keys: s, mu0, p,",
        ),
        (
            "run svm_hpo --solver implicitdiff",
            r"implicitdiff does not apply to svm_hpo: .*Solvers that do: .*LVHBA",
        ),
    ],
)
def test_bad_usage_exits_2_with_a_one_line_reason(capsys, no_solve, command, message):
    status, _, err = cli(capsys, command)
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("bilevel: error: "), err
    assert re.search(message, err), err


def test_unwritable_out_is_refused_before_compiling(capsys, no_solve, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    status, _, err = cli(capsys, RUN, TINY, "--out", blocker / "run")
    assert status == 2
    assert re.search(r"--out .*a_file/run is not a writable directory", err), err


def test_non_empty_out_is_refused_and_force_never_mixes_runs(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "history_oldsolver.csv").write_text("step\n1\n")
    argv = (RUN, TINY, "--steps 30 --set outer_lr=1 --out", out)
    status, _, err = cli(capsys, *argv)
    assert status == 2 and "is not empty" in err and "--force" in err
    assert (out / "config.json").read_text() == "{}"
    (out / "notes.txt").write_text("mine")  # not written by the command: never deleted
    status, _, err = cli(capsys, *argv, "--force")
    assert status == 2 and "deletes only files this command writes" in err
    assert (out / "history_oldsolver.csv").exists()
    (out / "notes.txt").unlink()
    status, stdout, err = cli(capsys, *argv, "--force")
    assert status == 0, err
    written = sorted(p.name for p in out.iterdir())
    assert written == ["config.json", "convergence.png", "history.csv"]
    config = json.loads((out / "config.json").read_text())
    assert config["state"] == "finished"
    assert config["problem_params"] == {"dim_x": 2, "dim_y": 4}
    # ImplicitDiff approaches the closed-form optimum x*: |x - x*| = 6e-9 after 30 steps
    # of size 1 on this 2 x 4 problem (float64); 1e-6 leaves room for other platforms.
    assert config["metrics"]["x_error"] < 1e-6
    rows = read_history(out / "history.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    assert {"upper_loss", "lower_residual", "seconds", "eval_x_error"} <= set(rows[0])
    assert rows[-1]["eval_x_error"] != ""  # the last log point is always evaluated
    assert "x_error" in stdout


def test_a_diverging_run_exits_3(capsys, tmp_path):
    # outer step 1e4 on curvature ~1: x grows ~1e4-fold per step, so the run ends
    # `diverged` (growth detection) or `nonfinite` (float64 overflow) within 100 steps
    status, _, err = cli(
        capsys, RUN, TINY, "--steps 100 --set outer_lr=1e4 --out", tmp_path
    )
    assert status == 3, err
    assert re.search(r"implicitdiff ended (nonfinite|diverged)", err)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["status"] in ("nonfinite", "diverged")


def test_resume_continues_the_checkpointed_run(capsys, tmp_path):
    base = (RUN, TINY, "--log-every 5")
    resumed, straight, checkpoint = tmp_path / "r", tmp_path / "s", tmp_path / "ck"
    first = (*base, "--steps 20 --out", resumed, "--checkpoint", checkpoint)
    assert cli(capsys, *first)[0] == 0
    status, _, err = cli(capsys, *first)  # the directory holds a run: say what to do
    assert status == 2 and "--resume" in err
    more = ("--steps 40 --resume --out", resumed, "--checkpoint", checkpoint)
    status, _, err = cli(capsys, *base, *more)
    assert status == 0, err
    assert cli(capsys, *base, "--steps 40 --out", straight)[0] == 0
    rows = read_history(resumed / "history.csv")
    reference = read_history(straight / "history.csv")
    assert [r["step"] for r in rows] == [str(s) for s in range(5, 45, 5)]
    for got, want in zip(rows, reference, strict=True):
        for column in ("upper_loss", "grad_norm", "lower_residual"):
            # the same steps from the same state and keys: equal up to round-off
            assert math.isclose(
                float(got[column]), float(want[column]), rel_tol=1e-9, abs_tol=1e-14
            )


# -- compare: ranked by the problem's own evaluation -----------------------------------


def test_compare_ranks_by_the_problems_evaluation(capsys, tmp_path):
    status, out, err = cli(
        capsys,
        "compare quadratic --solvers slbamm,vpbgd,implicitdiff --steps 150 --quiet",
        "--set problem.dim_x=3 --set implicitdiff.inner_steps=15 --out",
        tmp_path,
    )
    assert status == 0, err
    config = json.loads((tmp_path / "config.json").read_text())
    x_error = {r["solver"]: r["x_error"] for r in config["results"]}
    ranking = config["ranking"]
    # The oracle: the closed-form optimum x*. The solver closest to it ranks first.
    assert ranking[0]["solver"] == min(x_error, key=x_error.get)
    values = [r["hyper_objective"] for r in ranking]
    assert values == sorted(values)  # ranked by F(x) = f(x, y*(x)), lower first
    assert config["solvers"]["implicitdiff"]["settings"]["inner_steps"] == 15
    assert "inner_steps" not in config["solvers"]["slbamm"]["settings"]
    by_value = sorted(config["results"], key=lambda r: r["hyper_objective"])
    for row, result in zip(ranking, by_value, strict=True):
        assert row["solver"] == result["solver"]
        assert result["compile_seconds"] >= 0 and result["run_seconds"] > 0
        if row["target s"] is not None:
            assert row["target s"] <= result["run_seconds"]
    for name in x_error:
        rows = read_history(tmp_path / f"history_{name}.csv")
        assert rows[-1]["eval_hyper_objective"] != ""
    assert max(len(line) for line in out.splitlines()) <= 100
    assert "ranked by hyper_objective" in out


def test_compare_set_applies_to_every_solver_with_the_field():
    settings = parse_settings(
        ["inner_steps=7", "slbamm.s=0.5", "problem.dim_x=2", "linear_solver=cg"],
        ["implicitdiff", "Unrolled", "slbamm"],
        "quadratic",
    )
    assert settings.solvers["implicitdiff"]["inner_steps"] == 7
    assert settings.solvers["unrolled"] == {"inner_steps": 7}
    assert settings.solvers["slbamm"] == {"s": 0.5}
    assert settings.problem == {"dim_x": 2}
    assert type(settings.solvers["implicitdiff"]["linear_solver"]).__name__ == "CG"


# -- list, table, entry point, registry errors -----------------------------------------


def test_list_gives_plain_one_line_summaries(capsys):
    status, out, _ = cli(capsys, "list")
    assert status == 0
    names = list(bl.problems.registry) + list(solver_classes())
    for name in names:
        (line,) = [line for line in out.splitlines() if line.split()[:1] == [name]]
        summary = line.split(None, 1)[1]
        assert summary == {**PROBLEMS, **SOLVERS}[name]
        assert len(line) <= 100 and not re.search(r"[$\\`]|spec", summary)


def test_format_table_aligns_columns_and_marks_missing_values():
    table = format_table([{"a": 1.23456789, "b": None}, {"a": "long text", "c": 3}])
    assert table.splitlines() == [
        "a          b  c",
        "1.235      -  -",
        "long text  -  3",
    ]


def test_console_script_entry_point():
    (script,) = importlib.metadata.entry_points(group="console_scripts", name="bilevel")
    assert script.value == "bilevel.cli:main" and script.load() is main


def test_unknown_problem_is_one_error_for_registry_and_make():
    with pytest.raises(KeyError) as from_registry:
        bl.problems.registry["nope"]
    with pytest.raises(ValueError) as from_make:
        bl.problems.make("nope")
    assert type(from_registry.value) is type(from_make.value)
    assert isinstance(from_registry.value, ValueError)
    assert str(from_make.value).startswith("unknown problem 'nope'; available: ")
