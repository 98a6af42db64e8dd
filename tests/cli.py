"""Running `run_experiment.py` in a subprocess, as a user does (shared by the CLI-level tests)."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}


def run_cli(*args, cache_dir, check=True, timeout=300, env=None):
    """`run_experiment.py --cache_dir=... ARGS` (cache_dir None: no such flag); with check, asserts
    exit status 0. env: variables to add to the environment."""
    cache = [f"--cache_dir={cache_dir}"] if cache_dir is not None else []
    result = subprocess.run([sys.executable, str(ROOT / "run_experiment.py"), *cache, *args],
                            capture_output=True, text=True, env={**ENV, **(env or {})}, timeout=timeout, cwd=ROOT)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result
