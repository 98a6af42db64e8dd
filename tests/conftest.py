"""Shared test set-up: absl flags parsed, a CPU-only JAX, and a small MNIST subset."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest
from absl import flags

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
