"""The `bilevel` command end to end in subprocesses (`python -m bilevel.cli`): Ctrl-C
and output off a terminal. In-process checks of the command are in test_cli_main.py."""

import csv
import json
import re
import signal
import subprocess
import sys
import time


TINY = ["--set", "problem.dim_x=2", "--set", "problem.dim_y=4"]


def bilevel_cmd(*args, timeout=300):
    """The command's exit status, stdout and stderr, read as bytes (text mode would
    turn the carriage returns of a redrawn progress bar into newlines)."""
    out = subprocess.run(
        [sys.executable, "-m", "bilevel.cli", *map(str, args)],
        capture_output=True,
        timeout=timeout,
    )
    return out.returncode, out.stdout.decode(), out.stderr.decode()


# A SIGINT set to "ignore" is inherited across exec (pytest-xdist workers run with
# Ctrl-C ignored): the command must start as from a shell. A small launcher restores
# the default and execs the command; a preexec_fn would run Python hooks in a forked
# child of a multithreaded JAX process, which JAX reports as an error.
RESTORE_SIGINT_THEN_EXEC = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def test_ctrl_c_writes_partial_history_config_and_plot_then_exits_130(tmp_path):
    history = tmp_path / "history.csv"
    command = "run quadratic --solver implicitdiff --steps 100000000 --log-every 200"
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            RESTORE_SIGINT_THEN_EXEC,
            sys.executable,
            "-m",
            "bilevel.cli",
            *command.split(),
            *TINY,
            "--quiet",
            "--out",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if history.exists() and len(history.read_text().splitlines()) >= 4:
            break  # the header and three log points are on disk
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "interrupted; partial results in" in err and "Traceback" not in err
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["state"] == "interrupted" and config["status"] == "interrupted"
    with open(history, newline="") as handle:
        rows = list(csv.DictReader(handle))
    steps = [int(row["step"]) for row in rows]
    assert len(steps) >= 3 and steps == list(range(200, 200 * len(steps) + 1, 200))
    assert config["results"][0]["steps"] == steps[-1]
    # evaluated at the last log point before the interrupt: the problem's metrics
    assert rows[-1]["eval_hyper_objective"] != "" and "x_error" in config["metrics"]
    assert (tmp_path / "convergence.png").stat().st_size > 1000


def test_output_off_a_terminal_is_plain_lines_within_100_columns():
    command = "compare quadratic --solvers implicitdiff,slbamm --steps 60".split()
    status, stdout, stderr = bilevel_cmd(*command, *TINY)
    assert status == 0, stderr
    for stream in (stdout, stderr):
        assert "\r" not in stream and "\x1b" not in stream  # no bar redraws, no colours
        assert max(map(len, stream.splitlines()), default=0) <= 100, stream
    assert re.search(r"^#\s+solver\s+status\s+hyper_objective", stdout, re.MULTILINE)
