"""Many devices and many processes: data-parallel training equals one device, sharded seeds equal
the vmapped run, checkpoints move between device counts, and a 2-process run survives SIGKILL.

JAX fixes its device count at its first operation, so the 8-device runs happen in subprocesses
(`tests/mesh_worker.py`, `run_experiment.py --cpu_devices=8`, `digits.launch`).
"""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cli import ENV, ROOT, run_cli
from digits import checkpoint, data, launch, parallel, train
from digits.config import Config

FLOAT32_ATOL = 1e-5  # float32 sums in another order, over 100 steps of parameters of size ~1


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
    assert found["mesh"] == [1, 4] and found["diff"] < FLOAT32_ATOL and found["scale"] > 0.1


def test_batchnorm_seeds_on_a_two_axis_mesh(models):
    assert models["batchnorm_K2_D8"]["mesh"] == [2, 4] and models["batchnorm_K2_D8"]["diff"] < FLOAT32_ATOL


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


# --- the command line: checkpoints across device counts, and processes -----------------------------

TINY = ["--train_examples=2000", "--validation_size=1000", "--layer_sizes=784,16,10", "--init=glorot",
        "--optimizer=sgd", "--learning_rate=0.1", "--batch_size=16", "--eval_every=100"]


def tiny_dataset(mnist_splits) -> data.Dataset:
    """What TINY trains on: the first 2000 training images."""
    train_split = data.Split(mnist_splits.train.images[:2000], mnist_splits.train.labels[:2000])
    return data.Dataset("mnist", "packaged", train_split, mnist_splits.test)


def tiny_config(steps: int, num_seeds: int = 1) -> Config:
    return Config(layer_sizes=(784, 16, 10), init="glorot", optimizer="sgd", learning_rate=0.1, batch_size=16,
                  steps=steps, train_examples=2000, validation_size=1000, num_devices=1, num_seeds=num_seeds)


def final_params(workdir: pathlib.Path, steps: int, mnist_splits, num_seeds: int = 1):
    """The parameters of a workdir's last checkpoint, which must be at `steps`."""
    plan = train.Plan.create(tiny_config(steps, num_seeds), tiny_dataset(mnist_splits))
    state, _ = checkpoint.restore(workdir / "checkpoints", plan.init_state())
    assert train.host_step(state) == steps
    return jax.tree.map(np.asarray, state.params)


def one_device_params(steps: int, mnist_splits, num_seeds: int = 1):
    """TINY trained here, on one device, without a break."""
    dataset = tiny_dataset(mnist_splits)
    plan = train.Plan.create(tiny_config(steps, num_seeds), dataset)
    return jax.tree.map(np.asarray, train.fit(plan, plan.init_state(), train.device_splits(dataset)).state.params)


def max_difference(a, b) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_two_processes_train_survive_sigkill_equal_one_process_and_evaluate(cache_dir, tmp_path, mnist_splits):
    killed = tmp_path / "killed"
    args = [f"--cache_dir={cache_dir}", *TINY, "--steps=800", "--checkpoint_every=100", f"--workdir={killed}"]
    children = [subprocess.Popen(c, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for c in launch.commands(2, args, launch.free_port(), cpu_devices=1)]
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not checkpoint.list_steps(killed / "checkpoints"):
            time.sleep(0.05)
    finally:
        for child in children:
            child.send_signal(signal.SIGKILL)
            child.wait()
    killed_at = checkpoint.latest_step(killed / "checkpoints")
    assert killed_at is not None and killed_at < 800, "the run ended before it could be killed"
    assert json.loads((killed / "config.json").read_text())["mesh"] == {
        "num_devices": 2, "model_axis": 1, "data_axis": 2, "processes": 2}

    assert launch.run(2, args, cpu_devices=1, timeout=240) == 0
    metrics = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(100, 801, 100))  # one writer, none lost or repeated
    assert json.loads((killed / "summary.json").read_text())["mesh"]["processes"] == 2
    assert max_difference(final_params(killed, 800, mnist_splits), one_device_params(800, mnist_splits)) < 1e-4

    # Evaluation in two processes reads the final checkpoint to the numbers training reported.
    assert launch.run(2, [f"--cache_dir={cache_dir}", "--mode=eval", f"--workdir={killed}"], timeout=240) == 0
    evaluated = json.loads((killed / "eval.json").read_text())
    trained = json.loads((killed / "summary.json").read_text())
    assert evaluated["test"]["accuracy"] == pytest.approx(trained["final"]["test_accuracy"], abs=1e-6)
    assert evaluated["validation"]["loss"] == pytest.approx(trained["final"]["validation_loss"], rel=1e-5)


def test_every_mode_runs_on_eight_fake_devices(cache_dir, tmp_path, mnist_splits):
    """train (2 seeds: a 2 x 4 mesh), resume on 1 device, eval, predict and a benchmark across 1
    and 2 devices. (gradcheck runs on one device whatever the mesh.)"""
    from PIL import Image

    workdir, eight = tmp_path / "run", "--cpu_devices=8"
    trained = run_cli(*TINY, "--steps=40", "--num_seeds=2", eight, f"--workdir={workdir}", cache_dir=cache_dir)
    assert "8 cpu devices = 2 (model) x 4 (data)" in trained.stdout
    assert json.loads((workdir / "config.json").read_text())["mesh"]["data_axis"] == 4
    # The 8-device checkpoint resumes on 1 device and ends where 1 device all the way does.
    resumed = run_cli(*TINY, "--steps=80", "--num_seeds=2", f"--workdir={workdir}", cache_dir=cache_dir)
    assert "Resuming from the checkpoint at step 40" in resumed.stdout and "1 device" in resumed.stdout
    resumed, one_device = final_params(workdir, 80, mnist_splits, 2), one_device_params(80, mnist_splits, 2)
    assert max_difference(resumed, one_device) < FLOAT32_ATOL
    accuracy = json.loads((workdir / "summary.json").read_text())["across_models"]["test_accuracy"]["values"][0]
    run_cli("--mode=eval", eight, f"--workdir={workdir}", cache_dir=cache_dir)
    assert json.loads((workdir / "eval.json").read_text())["test"]["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    Image.fromarray(mnist_splits.test.images[0]).save(tmp_path / "digit.png")
    predicted = run_cli("--mode=predict", eight, f"--workdir={workdir}", f"--images={tmp_path / 'digit.png'}",
                        cache_dir=cache_dir)
    assert "digit.png" in predicted.stdout
    run_cli("--mode=benchmark", eight, "--bench_layer_sizes=784,10,10", "--bench_batch_sizes=16",
            "--bench_grads=manual", "--bench_steps_per_call=5", "--bench_devices=1,2", "--bench_repeats=1",
            "--bench_max_row_seconds=0.1",
            f"--workdir={tmp_path / 'bench'}", cache_dir=cache_dir)
    rows = json.loads((tmp_path / "bench" / "benchmark.json").read_text())["rows"]
    assert [(r["num_devices"], r["mesh"]) for r in rows] == [(1, "1x1"), (2, "1x2")]
    assert rows[0]["allreduce_bytes"] == 0
    assert rows[1]["allreduce_bytes"] == 4 * (784 * 10 + 10 + 10 * 10 + 10 + 1)  # every dW, db and the loss
    assert rows[1]["speedup_vs_one_device"] == pytest.approx(rows[1]["examples_per_s"] / rows[0]["examples_per_s"])


def test_a_bad_flag_in_two_processes_is_one_line_and_a_non_zero_exit(capfd, tmp_path):
    assert launch.run(2, ["--num_devices=5", "--steps=1", f"--workdir={tmp_path}"], timeout=120) == 2
    errors = [line for line in capfd.readouterr().err.splitlines() if "error" in line]
    assert errors == ["error: --num_devices=5 but only 2 cpu device(s) are available",
                      "process 1: error: --num_devices=5 but only 2 cpu device(s) are available"]
    assert not (tmp_path / "config.json").exists()  # nothing written before the check
