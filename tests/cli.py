"""Running `run_experiment.py` in a subprocess, as a user does (shared by the CLI-level tests)."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}


def run_cli(*args, cache_dir, check=True, timeout=300):
    """`run_experiment.py --cache_dir=... ARGS`; with check, asserts exit status 0."""
    result = subprocess.run([sys.executable, str(ROOT / "run_experiment.py"), f"--cache_dir={cache_dir}", *args],
                            capture_output=True, text=True, env=ENV, timeout=timeout, cwd=ROOT)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result
