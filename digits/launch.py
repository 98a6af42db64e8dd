"""Starts N local processes of one run, joined by `jax.distributed` on 127.0.0.1 (multi-host
training, tried on one machine):

    python -m digits.launch --processes=2 -- --flagfile=experiments/nielsen_784_30_10.cfg --workdir=runs/two

Every process runs `run_experiment.py` with the given flags plus --coordinator_address,
--num_processes and --process_id; each gets `--cpu_devices` CPU devices (default 1), and CPU
collectives go through gloo. Process 0's output is shown; the others are quiet unless they fail.
If one process fails the others are stopped, and the launcher exits with its status. Ctrl-C
reaches every process (each saves a checkpoint, as a single-process run does).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time

RUN_EXPERIMENT = pathlib.Path(__file__).resolve().parent.parent / "run_experiment.py"


def free_port() -> int:
    """A TCP port nobody listens on right now (the coordinator binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commands(processes: int, args: list[str], port: int, cpu_devices: int) -> list[list[str]]:
    """The command line of each process."""
    common = [sys.executable, str(RUN_EXPERIMENT), *args, f"--coordinator_address=127.0.0.1:{port}",
              f"--num_processes={processes}", f"--cpu_devices={cpu_devices}"]
    return [common + [f"--process_id={i}"] for i in range(processes)]


def run(processes: int, args: list[str], cpu_devices: int = 1, timeout: float | None = None) -> int:
    """Runs the processes to the end; returns 0, or the status of the first that failed."""
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    children, logs = [], []
    for i, command in enumerate(commands(processes, args, free_port(), cpu_devices)):
        # Process 0 speaks for the run; the others' stderr goes to a file (a pipe could fill and block them).
        logs.append(tempfile.TemporaryFile("w+") if i else None)
        children.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL if i else None, stderr=logs[i],
                                         text=True))
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            codes = [c.poll() for c in children]
            failed = [code for code in codes if code not in (None, 0)]
            if failed or all(code == 0 for code in codes):
                break
            if deadline is not None and time.monotonic() > deadline:
                print(f"error: the {processes} processes did not finish within {timeout:g} s", file=sys.stderr)
                failed = [124]
                break
            time.sleep(0.1)
    except KeyboardInterrupt:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGINT)
        return max(child.wait() for child in children) or 130
    for child in children:
        if child.poll() is None:
            child.terminate()
        child.wait()
    for i, (child, log) in enumerate(zip(children, logs, strict=True)):
        if log is not None:
            log.seek(0)
            lines = log.read().strip().splitlines()
            if child.returncode and lines:
                print(f"process {i}: {lines[-1]}", file=sys.stderr)
            log.close()
    return failed[0] if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="python -m digits.launch --processes=N [--cpu_devices=D] -- FLAGS...")
    parser.add_argument("--processes", type=int, default=2, help="local processes to start (default 2)")
    parser.add_argument("--cpu_devices", type=int, default=1, help="CPU devices per process (default 1)")
    parser.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    parser.add_argument("flags", nargs=argparse.REMAINDER, help="run_experiment.py flags, after --")
    options = parser.parse_args(argv)
    flags = options.flags[1:] if options.flags[:1] == ["--"] else options.flags
    if options.processes < 1 or options.cpu_devices < 1:
        parser.error("--processes and --cpu_devices must be >= 1")
    return run(options.processes, flags, options.cpu_devices, options.timeout)


if __name__ == "__main__":
    sys.exit(main())
