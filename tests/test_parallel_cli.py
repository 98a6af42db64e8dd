"""Many devices and many processes on the command line: an 8-device checkpoint resumes on one
device, every mode runs on 8 fake devices, and a 2-process run survives SIGKILL. (Apart from
test_parallel.py's in-process mesh scenarios, so that xdist can run the two files side by side.)
"""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from cli import ENV, ROOT, run_cli
from digits import checkpoint, data, launch, train
from digits.config import Config

FLOAT32_ATOL = 1e-5  # float32 sums in another order, over 100 steps of parameters of size ~1


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
