"""Run one Python script in several local processes joined by JAX's distributed runtime
(coordinator on 127.0.0.1, gloo CPU collectives), with timeouts and clean-up."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _environment(port: int, num_processes: int, process_id: int, devices: int) -> dict:
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_NUM_PROCESSES=str(num_processes),
        JAX_PROCESS_ID=str(process_id),
    )
    return env


def launch(
    script: str,
    num_processes: int,
    devices: int,
    *,
    timeout: float = 90,
    args: tuple[str, ...] = (),
) -> list[dict]:
    """Run `script` (source text) in `num_processes` processes with `devices` CPU
    devices each; every process must print one JSON object on a line of its own (the
    last such line is its answer).
    Returns those objects by process id. Raises `RuntimeError` with the outputs when a
    process fails or the group exceeds `timeout` seconds (all processes are killed)."""
    port = free_port()
    command = [sys.executable, "-c", textwrap.dedent(script), *args]
    processes = [
        subprocess.Popen(
            command,
            env=_environment(port, num_processes, pid, devices),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for pid in range(num_processes)
    ]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=timeout))
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"multi-process run exceeded {timeout} s") from None
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    failed = [i for i, p in enumerate(processes) if p.returncode != 0]
    if failed:
        details = "\n".join(
            f"--- process {i}:\n{outputs[i][1][-3000:]}" for i in failed
        )
        raise RuntimeError(f"processes {failed} failed:\n{details}")
    return [_last_json(out) for out, _ in outputs]


def _last_json(stdout: str) -> dict:
    """The last line of `stdout` that holds a JSON object (gloo's C++ code prints its
    own lines to the same stdout)."""
    lines = [s for s in stdout.splitlines() if s.startswith("{")]
    if not lines:
        raise RuntimeError(f"no JSON line in the output:\n{stdout[-3000:]}")
    return json.loads(lines[-1])
