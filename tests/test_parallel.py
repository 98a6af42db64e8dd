"""Many devices: data-parallel training equals one device, sharded seeds equal the vmapped run,
impossible meshes are one-line errors. (The command line across devices and processes is
test_parallel_cli.py.)

JAX fixes its device count at its first operation, so the 8-device runs happen in subprocesses
(`tests/mesh_worker.py`).
"""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import pytest

from cli import ENV, ROOT
from digits import parallel

FLOAT32_ATOL = 1e-5  # float32 sums in another order, over 100 steps of parameters of size ~1
# Batch norm divides by the batch's standard deviation, which amplifies the rounding of its sums
# (here 8 x 28 x 28 values per channel, summed in another order on 4 devices) over the 20 steps:
# measured 2.6e-5 in the tests' unoptimised XLA code (which adds them one by one), 2.2e-6 in
# optimised code (vectorised partial sums). Statistics of each device's own slice of the batch
# (2 of the 8 images) would change every step's update itself (learning rate 0.01 x gradients of
# order 1: differences of order 1e-2, by estimate), far above this bound.
BATCHNORM_ATOL = 1e-4


SCENARIOS = ("data_parallel", "models", "errors")


@pytest.fixture(scope="module")
def workers():
    """The mesh_worker scenarios, started together: each is mostly single-threaded compilation,
    so on 2 cores running them side by side saves a good part of their time."""
    started = {name: subprocess.Popen([sys.executable, str(ROOT / "tests" / "mesh_worker.py"), name], env=ENV, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name in SCENARIOS}
    yield started
    for process in started.values():  # a scenario no selected test asked for
        if process.poll() is None:
            process.kill()
            process.communicate()


def result(process: subprocess.Popen) -> dict:
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def data_parallel(workers):
    return result(workers["data_parallel"])


@pytest.fixture(scope="module")
def models(workers):
    return result(workers["models"])


@pytest.fixture(scope="module")
def mesh_errors(workers):
    return result(workers["errors"])


@pytest.mark.parametrize("grad", ["manual", "autodiff"])
def test_all_reduced_gradient_equals_the_one_device_gradient(data_parallel, grad):
    assert data_parallel[f"gradient_{grad}_scale"] > 0.1  # a real gradient, not zeros
    assert data_parallel[f"gradient_{grad}_D4"] < 1e-6


@pytest.mark.parametrize("grad", ["manual", "autodiff"])
@pytest.mark.parametrize("devices", [2, 4, 8])
def test_data_parallel_sgd_ends_where_one_device_does(data_parallel, grad, devices):
    found = data_parallel[f"dense_{grad}_D{devices}"]
    assert found["mesh"] == [1, devices]
    assert found["diff"] < FLOAT32_ATOL
    assert data_parallel[f"scale_{grad}"] > 0.1


def test_conv_net_and_full_batch_train_data_parallel(data_parallel):
    assert data_parallel["conv_D4"]["mesh"] == [1, 4] and data_parallel["conv_D4"]["diff"] < FLOAT32_ATOL
    assert data_parallel["full_batch_D8"]["mesh"] == [1, 8] and data_parallel["full_batch_D8"]["diff"] < FLOAT32_ATOL


@pytest.mark.parametrize("grad", ["manual", "autodiff"])
def test_batchnorm_statistics_are_all_reduced_over_the_data_axis(data_parallel, grad):
    found = data_parallel[f"batchnorm_{grad}_D4"]
    assert found["mesh"] == [1, 4] and found["diff"] < BATCHNORM_ATOL and found["scale"] > 0.1


def test_batchnorm_seeds_on_a_two_axis_mesh(models):
    assert models["batchnorm_K2_D8"]["mesh"] == [2, 4] and models["batchnorm_K2_D8"]["diff"] < BATCHNORM_ATOL


def test_eight_seeds_on_eight_devices_equal_the_vmapped_run(models):
    assert models["seeds_K8_D8"]["mesh"] == [8, 1]
    assert models["seeds_K8_D8"]["diff"] < 1e-4  # one model per device vs 8 vmapped: other fusions


def test_shared_data_sweep_on_a_two_axis_mesh(models):
    assert models["shared_K4_D8"]["mesh"] == [4, 2] and models["shared_K4_D8"]["diff"] < FLOAT32_ATOL
    assert models["shared_first_layers_differ"]


def test_many_one_step_chunks_with_collectives_do_not_deadlock(models):
    # 100 chunk calls that each all-reduce; this scenario hangs (and times out) if the loop
    # queues them without waiting.
    assert models["one_step_chunks_D8"]["mesh"] == [1, 8] and models["one_step_chunks_D8"]["diff"] < FLOAT32_ATOL


def test_impossible_meshes_are_one_line_errors(mesh_errors):
    found = mesh_errors
    assert found["too_many"] == "num_devices=9 but only 8 cpu device(s) are available"
    assert "batch_size=10 cannot be split over the data axis of 4 devices" in found["batch_not_divisible"]
    assert "more devices than examples" in found["more_devices_than_examples"]
    for message in ("too_many", "batch_not_divisible", "more_devices_than_examples"):
        assert "\n" not in found[message]
    # The default uses what splits evenly: batch 10 on 8 devices -> 2, K = 4 -> 4 x 2.
    assert (found["auto_batch_10_on_8"]["model_axis"], found["auto_batch_10_on_8"]["data_axis"]) == (1, 2)
    assert (found["auto_K4_on_8"]["model_axis"], found["auto_K4_on_8"]["data_axis"]) == (4, 2)


def test_one_device_is_no_mesh():
    assert parallel.choose_layout(4, 10, devices=jax.devices()[:1]) is parallel.SINGLE
