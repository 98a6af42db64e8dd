"""Shared test set-up: absl flags parsed, a CPU-only JAX, and a small MNIST subset."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache per test run, shared by the xdist workers and every
# `run_experiment.py` / mesh_worker subprocess they start (all inherit this environment): a
# program compiled once (the same tiny MLP's training chunk, trained by dozens of CLI runs and
# resumes) is read back instead of compiled again. Keys are the program's HLO, compile options and
# devices, so a different program (a mutated backward, another mesh) still compiles, and a cached
# executable computes exactly what a fresh compilation would. The process that creates the cache
# (the xdist controller, or a plain pytest) removes it at exit; nothing carries over between runs.
if "DIGITS_TEST_JAX_CACHE" not in os.environ:
    os.environ["DIGITS_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="digits-test-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["DIGITS_TEST_JAX_CACHE"], ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["DIGITS_TEST_JAX_CACHE"]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
# Tests compile hundreds of small programs and run each briefly: XLA's CPU backend without LLVM's
# optimisations compiles them in about a third less time (test_layer_kinds.py: 340 s -> 228 s),
# and runs them no differently in what tests judge (results equal within the same flags; every
# comparison in the tests is between programs of one session). Benchmarks and runs compile at -O2
# (digits/compiling.py), which defers to a level given in XLA_FLAGS: this one, and
# XLA_FLAGS=--xla_backend_optimization_level=2 make test checks the runs' code the same way, slower.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

# (in case jax was imported before this file, e.g. by a plugin: its config read the environment then)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def mnist_splits(tmp_path_factory):
    """The packaged MNIST, parsed once per session into a temporary cache."""
    from digits import data

    cache = tmp_path_factory.mktemp("cache")
    return data.split_validation(data.load("packaged", cache_dir=cache), 10000)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory, mnist_splits):
    """A cache with the parsed MNIST, so each `run_experiment.py` subprocess loads it fast."""
    from digits import data

    cache = tmp_path_factory.mktemp("cli_cache")
    data.load("packaged", cache_dir=cache)
    return cache
