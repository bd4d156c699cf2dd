"""Run a module as an N-process JAX job on this machine, as a multi-host launch would.

    results = run_processes("dgae_jax.main", ["--config=...", "--workdir=..."], num_processes=2)
    for r in results:
        assert r.returncode == 0, r.output[-3000:]

Each process is `python -m MODULE ARGS` with JAX_COORDINATOR_ADDRESS (a free localhost port),
JAX_NUM_PROCESSES, JAX_PROCESS_ID, JAX_NUM_CPU_DEVICES and gloo CPU collectives. Device-count
settings of the calling process (XLA_FLAGS, JAX_NUM_CPU_DEVICES, JAX_PLATFORMS, ...) are not
inherited. A job that outlives `timeout` is killed whole, and each process's output so far is
returned with return code None.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

# Variables of the calling process that would fight the job's own device and process settings.
_DROPPED = ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES", "JAX_PLATFORMS", "JAX_PLATFORM_NAME",
            "JAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_PORT", "JAX_NUM_PROCESSES",
            "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS", "JAX_CPU_COLLECTIVES_IMPLEMENTATION")


@dataclasses.dataclass
class ProcessResult:
    process_id: int
    returncode: int | None  # None: killed at the timeout
    output: str  # stdout and stderr, interleaved


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(process_id: int, num_processes: int, port: int, devices_per_process: int,
                extra_env: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED}
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes),
               JAX_PROCESS_ID=str(process_id), JAX_NUM_CPU_DEVICES=str(devices_per_process),
               JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    env.update(extra_env or {})
    return env


def run_processes(module: str, args: list[str] = (), *, num_processes: int = 2,
                  devices_per_process: int = 4, timeout: float = 300.0, cwd: str | None = None,
                  extra_env: dict[str, str] | None = None) -> list[ProcessResult]:
    """Starts `python -m module *args` as processes 0..num_processes-1 of one JAX job and waits
    for all of them (at most `timeout` seconds in all); returns one result per process."""
    port = free_port()
    procs, logs = [], []
    try:
        for i in range(num_processes):
            log = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", module, *args], cwd=cwd, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,  # its own group, killed whole
                env=process_env(i, num_processes, port, devices_per_process, extra_env)))
        deadline = time.monotonic() + timeout
        codes: list[int | None] = [None] * num_processes
        while any(c is None for c in codes) and time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if any(c is None for c in codes):
                time.sleep(0.2)
    finally:  # the timeout, or an exception (Ctrl-C) here: leave no process behind
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in procs:
            p.wait()
    results = []
    for i, (code, log) in enumerate(zip(codes, logs)):
        log.seek(0)
        results.append(ProcessResult(i, code, log.read()))
        log.close()
    return results


def describe(results: list[ProcessResult], tail: int = 3000) -> str:
    """The return codes and the end of each process's output, for an assertion message."""
    return "\n".join(f"--- process {r.process_id}: returncode {r.returncode}\n{r.output[-tail:]}"
                     for r in results)
