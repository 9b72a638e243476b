"""The `bilevel` command end to end, in subprocesses."""

import csv
import json
import subprocess
import sys

import pytest

import bilevel as bl
from bilevel.cli import solver_classes


def bilevel_cmd(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "bilevel.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_list_names_every_problem_and_solver():
    out = bilevel_cmd("list")
    assert out.returncode == 0, out.stderr
    for name in list(bl.problems.registry) + list(solver_classes()):
        assert name in out.stdout


def test_run_writes_history_config_and_plot(tmp_path):
    out = bilevel_cmd(
        "run", "quadratic", "--solver", "ImplicitDiff", "--steps", "200", "--x64", "--quiet",
        "--set", "outer_lr=1.0", "--set", "problem.dim_x=3", "--out", str(tmp_path),
    )
    assert out.returncode == 0, out.stderr
    config = json.loads((tmp_path / "config.json").read_text())
    # The quadratic's evaluate() measures |x - x*| against its closed-form optimum.
    assert config["metrics"]["x_error"] < 1e-4
    assert config["problem_params"] == {"dim_x": 3}
    with open(tmp_path / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert int(rows[-1]["step"]) == 200 and "upper_loss" in rows[0]
    assert (tmp_path / "convergence.png").stat().st_size > 1000
    assert "x_error" in out.stdout


def test_compare_runs_each_solver_with_the_same_budget(tmp_path):
    out = bilevel_cmd(
        "compare", "quadratic", "--solvers", "implicitdiff,unrolled", "--steps", "150",
        "--x64", "--quiet", "--out", str(tmp_path),
    )
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "config.json").read_text())["results"]
    assert [r["solver"] for r in results] == ["implicitdiff", "unrolled"]
    for r in results:
        assert r["x_error"] < 1e-3  # both reach the closed-form optimum (recipes in _recipes)
    assert (tmp_path / "history_implicitdiff.csv").exists()
    assert (tmp_path / "convergence.png").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (("run", "nosuchproblem", "--solver", "implicitdiff"), "unknown problem 'nosuchproblem'; available: .*quadratic"),
        (("run", "quadratic", "--solver", "nosuch"), "unknown solver 'nosuch'; available: .*implicitdiff"),
        (("run", "quadratic", "--solver", "implicitdiff", "--set", "bogus=1"), "unknown --set key 'bogus'; valid keys: .*inner_steps.*problem.dim_x"),
        (("run", "quadratic", "--solver", "implicitdiff", "--set", "inner_steps=0"), "inner_steps"),
        (("compare", "nosuchproblem", "--solvers", "implicitdiff"), "unknown problem"),
    ],
)
def test_bad_usage_exits_with_code_2_and_says_what_is_valid(args, message):
    import re

    out = bilevel_cmd(*args)
    assert out.returncode == 2
    assert re.search(message, out.stderr), out.stderr
