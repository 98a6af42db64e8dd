"""run_experiment.py end to end, as a user runs it (subprocesses, tiny configs, packaged MNIST)."""

import dataclasses
import json
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cli import ENV, ROOT, run_cli
from digits import checkpoint, report

TINY = ["--train_examples=2000", "--validation_size=1000", "--layer_sizes=784,16,10", "--init=glorot",
        "--optimizer=sgd", "--learning_rate=0.1", "--batch_size=50", "--epochs=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    workdir = tmp_path_factory.mktemp("run") / "w"
    result = run_cli(*TINY, f"--workdir={workdir}", "--checkpoint_every=30", "--grad=both", "--audit_every=10",
                     "--tensorboard", cache_dir=cache_dir)
    return workdir, result


def test_train_writes_every_output(trained):
    workdir, result = trained
    assert "Gradient check: PASS" in result.stdout
    assert result.stdout.index("Gradient check") < result.stdout.index("Test accuracy")
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == 80 and summary["config"]["layer_sizes"] == [784, 16, 10]
    assert 0.7 < summary["final"]["test_accuracy"] <= 1.0
    assert set(summary["timings"]) >= {"compile_s", "train_s", "eval_s", "total_s", "examples_per_s"}
    timings = summary["timings"]  # where the wall time went, each part timed on its own
    assert timings["data_s"] > 0 and timings["gradcheck_s"] > 0 and timings["plot_s"] > 0
    assert sum(timings[k] for k in ("compile_s", "eval_compile_s", "train_s", "eval_s", "data_s",
                                    "gradcheck_s", "plot_s")) <= timings["total_s"]
    assert f"gradient check at init {timings['gradcheck_s']:.2f} s, plots {timings['plot_s']:.2f} s" in result.stdout
    assert summary["grad_audit"]["count"] == 8 and summary["grad_audit"]["max_relative_error"] < 1e-5
    config = json.loads((workdir / "config.json").read_text())
    assert config["backend"] == "cpu" and "jax" in config["versions"] and config["devices"]
    records = report.read_metrics(workdir / "metrics.jsonl")
    assert [r["step"] for r in records] == [40, 80]
    for key in ("epoch", "loss", "train_accuracy", "validation_accuracy", "learning_rate", "examples_per_s",
                "grad_audit_max_relative_error"):
        assert key in records[-1]
    for png in ("learning_curves.png", "confusion_matrix.png", "misclassified.png"):
        assert (workdir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((workdir / "tensorboard").iterdir())
    assert checkpoint.list_steps(workdir / "checkpoints") == [30, 60, 80]


def test_eval_mode_reports_per_class_accuracy(trained, cache_dir):
    workdir, _ = trained
    result = run_cli("--mode=eval", f"--workdir={workdir}", cache_dir=cache_dir)
    evaluation = json.loads((workdir / "eval.json").read_text())
    summary = json.loads((workdir / "summary.json").read_text())
    assert evaluation["test"]["accuracy"] == pytest.approx(summary["final"]["test_accuracy"], abs=1e-6)
    assert len(evaluation["test"]["per_class_accuracy"]) == 10
    assert np.sum(evaluation["test"]["confusion_matrix"]) == 10000
    assert "test" in result.stdout


def test_different_config_in_workdir_is_refused_then_overwritten(trained, cache_dir, tmp_path):
    workdir, _ = trained
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    refused = run_cli(*TINY, "--learning_rate=0.5", f"--workdir={copy}", cache_dir=cache_dir, check=False)
    assert refused.returncode != 0
    assert "different config" in refused.stderr and "learning_rate" in refused.stderr
    assert "Traceback" not in refused.stderr
    run_cli(*TINY, "--learning_rate=0.5", "--epochs=1", f"--workdir={copy}", "--overwrite", cache_dir=cache_dir)
    assert json.loads((copy / "summary.json").read_text())["config"]["learning_rate"] == 0.5


@pytest.mark.parametrize("args,message,status", [
    (["--layer_sizes=784,30,9"], "must start with 784 (pixels) and end with at least 10", 2),
    (["--learning_rate=nan"], "--learning_rate must be a finite number, got nan", 2),
    (["--schedule=cosin"], "schedule", 2),
    (["--layers=conv5x5:20,maxpool2,dense:7"], "dense:10", 2),
    (["--layers=conv5x5:20,blur3,dense:10"], "blur3", 2),
    (["--layer_sizes=784,x,10"], "comma-separated integers", 2),
    (["--learning_rate=-1"], "learning_rate", 2),
    (["--activation=swish"], "activation", 2),
    (["--batch_size=60000", "--optimizer=sgd"], "exceeds", 2),
    (["--optimizer=gd", "--batch_size=10"], "full-batch", 2),
    (["--data_source=idx"], "--idx_dir", 2),
    (["--data_source=idx", "--idx_dir=/nonexistent"], "does not exist", 2),
    (["--data_source=tfds", "--tfds_data_dir=/nonexistent"], "--tfds_download", 2),
    (["--mode=eval", "--workdir=/nonexistent/run"], "does not exist", 2),
    (["--sweep_learning_rates=0.1,abc"], "sweep_learning_rates", 2),
    (["--nosuchflag"], "nosuchflag", 2),
    (["--workdir=/proc/digits-cannot-create"], "digits-cannot-create", 1),
])
def test_invalid_input_is_one_line_and_non_zero(cache_dir, args, message, status):
    result = run_cli("--workdir=/tmp/digits-test-never-written", *args, cache_dir=cache_dir, check=False)
    assert result.returncode == status, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_divergence_exits_non_zero_and_keeps_last_good_checkpoint(cache_dir, tmp_path):
    import jax
    import jax.numpy as jnp

    from digits import experiment

    # The learning rate grows 10x every 10 steps: good checkpoints first, then NaN/inf.
    workdir = tmp_path / "w"
    diverged = run_cli(*TINY, "--epochs=10", "--schedule=exponential", "--decay_rate=10", "--decay_steps=10",
                       "--checkpoint_every=20", f"--workdir={workdir}", cache_dir=cache_dir, check=False)
    assert diverged.returncode == 1, diverged.stderr
    lines = [line for line in diverged.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "diverged" in lines[0] and "at step" in lines[0] and "learning rate" in lines[0]
    assert "Traceback" not in diverged.stderr
    good = checkpoint.latest_step(workdir / "checkpoints")
    assert good is not None and good >= 20 and f"step {good})" in lines[0]
    config = experiment.read_workdir_config(workdir)
    plan = experiment.make_plan(config, experiment.load_dataset(dataclasses.replace(config, cache_dir=str(cache_dir))))
    state, _ = checkpoint.restore(workdir / "checkpoints", plan.init_state())
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(state.params))


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(cache_dir, tmp_path):
    args = ["--train_examples=5000", "--validation_size=1000", "--layer_sizes=784,32,10", "--init=glorot",
            "--optimizer=sgd", "--batch_size=10", "--epochs=200", "--checkpoint_every=500", f"--workdir={tmp_path}"]
    process = subprocess.Popen([sys.executable, str(ROOT / "run_experiment.py"), f"--cache_dir={cache_dir}", *args],
                               env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not checkpoint.list_steps(tmp_path / "checkpoints"):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "interrupted at step" in stderr and "Traceback" not in stderr
    step = int(stderr.split("interrupted at step ")[1].split(";")[0])
    assert checkpoint.latest_step(tmp_path / "checkpoints") == step


def test_corrupt_checkpoint_is_reported_and_not_overwritten(trained, cache_dir, tmp_path):
    workdir, _ = trained
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    # The biggest file of the step: the array data (orbax's OCDBT store).
    latest = max((p for p in (copy / "checkpoints" / "checkpoint_00000080").rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)
    latest.write_bytes(latest.read_bytes()[:200])
    # A finished run is only reported; extending it restores the corrupt checkpoint.
    result = run_cli(*TINY, "--epochs=3", f"--workdir={copy}", "--checkpoint_every=30", "--grad=both",
                     "--audit_every=10", cache_dir=cache_dir, check=False)
    assert result.returncode == 1 and "corrupt or truncated" in result.stderr and "checkpoint_00000080" in result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr
    assert len(latest.read_bytes()) == 200
    assert checkpoint.list_steps(copy / "checkpoints") == [30, 60, 80]


def test_old_npz_checkpoints_are_refused_in_one_line(cache_dir, tmp_path):
    old = tmp_path / "checkpoints" / "checkpoint_00000010.npz"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"PK\x03\x04 written by digits 0.1")
    result = run_cli(*TINY, f"--workdir={tmp_path}", cache_dir=cache_dir, check=False)
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "old .npz format of digits < 0.2" in lines[0] and "Traceback" not in result.stderr
    assert [p.name for p in old.parent.iterdir()] == [old.name]  # no new-format checkpoint beside it


def test_sigkill_then_resume_matches_uninterrupted_run(cache_dir, tmp_path):
    args = ["--train_examples=5000", "--validation_size=1000", "--layer_sizes=784,32,10", "--init=glorot",
            "--optimizer=momentum", "--learning_rate=0.01", "--batch_size=10", "--epochs=6",
            "--checkpoint_every=500", "--eval_every=500"]
    reference = tmp_path / "reference"
    run_cli(*args, f"--workdir={reference}", cache_dir=cache_dir)

    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, str(ROOT / "run_experiment.py"), f"--cache_dir={cache_dir}", *args,
                                f"--workdir={killed}"], env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not checkpoint.list_steps(killed / "checkpoints"):
        time.sleep(0.05)
    process.send_signal(signal.SIGSTOP)  # (stopped, it still holds the workdir)
    second = run_cli(*args, f"--workdir={killed}", cache_dir=cache_dir, check=False)
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert second.returncode == 1 and len(lines) == 1 and "another process is training" in lines[0], second.stderr
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = checkpoint.latest_step(killed / "checkpoints")
    assert killed_at is not None and killed_at < 3000, "the run finished before it could be killed"

    resumed = run_cli(*args, f"--workdir={killed}", cache_dir=cache_dir)
    assert f"Resuming from the checkpoint at step {killed_at}" in resumed.stdout

    def final(workdir):
        return json.loads((workdir / "summary.json").read_text())["final"]

    assert final(killed) == final(reference)
    # The killed part's time up to its last checkpoint counts: its checkpoint recorded it.
    summary = json.loads((killed / "summary.json").read_text())
    first, last = summary["parts"]
    assert first["interrupted"] and first["end_step"] == first["steps_timed"] == killed_at
    assert first["train_s"] > 0 and first["data_s"] > 0 and first["gradcheck_s"] > 0
    assert summary["timings"]["train_s"] == pytest.approx(first["train_s"] + last["train_s"])
    assert summary["timings"]["steps_timed"] == 3000 and last["gradcheck_s"] == 0  # (checked once, at the start)
    steps = [r["step"] for r in report.read_metrics(killed / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 3000


def test_gradcheck_mode_in_float64_passes(cache_dir, tmp_path):
    result = run_cli("--mode=gradcheck", "--x64", "--layer_sizes=784,12,12,10", "--activation=tanh", "--output=sigmoid",
                     "--cost=quadratic", "--gradcheck_examples=32", "--gradcheck_coords=5", f"--workdir={tmp_path}",
                     cache_dir=cache_dir)
    assert "Verdict: PASS" in result.stdout and not (tmp_path / "summary.json").exists()
    summary = json.loads((tmp_path / "gradcheck.json").read_text())
    assert summary["passed"] and summary["dtype"] == "float64"
    auto = [leaf for leaf in summary["leaves"] if leaf["reference"] == "jax.grad"]
    assert auto and max(leaf["relative_error"] for leaf in auto) <= 1e-10
    assert any(leaf["reference"] == "finite_difference" for leaf in summary["leaves"])


def test_help_documents_every_flag(cache_dir):
    result = run_cli("--help", cache_dir=cache_dir, check=False)
    for flag in ("--layer_sizes", "--grad", "--optimizer", "--schedule", "--num_seeds", "--bench_layer_sizes",
                 "--images"):
        assert flag in result.stdout


def _save_png(path, image_u8):
    from PIL import Image

    Image.fromarray(image_u8).save(path)


@pytest.fixture(scope="module")
def predictor(tmp_path_factory, cache_dir):
    """A model good enough (~96%) that its predictions are not coin flips on borderline digits."""
    workdir = tmp_path_factory.mktemp("predictor") / "w"
    run_cli("--train_examples=20000", "--validation_size=1000", "--layer_sizes=784,64,10", "--init=he",
            "--optimizer=adam", "--learning_rate=0.002", "--batch_size=100", "--epochs=3", f"--workdir={workdir}",
            cache_dir=cache_dir)
    return workdir, None


def test_predict_on_saved_mnist_digits_agrees_with_the_model(predictor, cache_dir, mnist_splits, tmp_path):
    """Test digits saved as PNG (white-on-black, black-on-white, shifted and rescaled) are
    classified like the original arrays."""
    import jax.numpy as jnp
    from PIL import Image

    from digits import experiment, model

    workdir, _ = predictor
    trained = experiment.load_trained(workdir)
    spec = trained.plan.spec
    originals = mnist_splits.test.images[:12]
    logits = model.logits(trained.params, model.inputs(jnp.asarray(originals), spec), spec)
    expected = np.asarray(jnp.argmax(logits, -1))
    folder = tmp_path / "digits"
    folder.mkdir()
    for i, image in enumerate(originals):
        _save_png(folder / f"d{i:02d}_white_on_black.png", image)
        _save_png(folder / f"d{i:02d}_black_on_white.png", 255 - image)
        big = np.asarray(Image.fromarray(255 - image).resize((84, 84), Image.BILINEAR))
        canvas = np.full((150, 200), 255, np.uint8)
        canvas[20:104, 90:174] = big  # off-centre, 3x larger, on a white page
        _save_png(folder / f"d{i:02d}_shifted_scaled.png", canvas)
    result = run_cli("--mode=predict", f"--workdir={workdir}", f"--images={folder}", "--save_preprocessed",
                     cache_dir=cache_dir)
    predictions = json.loads((workdir / "predictions.json").read_text())["predictions"]
    assert len(predictions) == 36 and "d00_white_on_black.png" in result.stdout
    agree = [p["prediction"] == expected[int(pathlib.Path(p["file"]).name[1:3])] for p in predictions]
    assert np.mean(agree) >= 0.9, predictions
    assert all(abs(sum(prob for _, prob in p["top_k"][:1]) - p["probability"]) < 1e-9 for p in predictions)
    assert len(list((workdir / "preprocessed").glob("*.png"))) == 36


def test_predict_reports_bad_files_and_still_classifies_the_rest(predictor, cache_dir, mnist_splits, tmp_path):
    workdir, _ = predictor
    good = tmp_path / "good.png"
    _save_png(good, mnist_splits.test.images[0])
    (tmp_path / "notes.png").write_text("this is not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    result = run_cli("--mode=predict", f"--workdir={workdir}",
                     f"--images={good},{tmp_path / 'notes.png'},{tmp_path / 'empty.png'}", cache_dir=cache_dir,
                     check=False)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and any("notes.png" in e for e in errors) and any("empty.png" in e for e in errors)
    assert "Traceback" not in result.stderr
    output = json.loads((workdir / "predictions.json").read_text())
    assert [pathlib.Path(p["file"]).name for p in output["predictions"]] == ["good.png"]


def test_num_seeds_and_learning_rate_sweep_report_spread(cache_dir, tmp_path):
    run_cli(*TINY, "--epochs=1", "--num_seeds=2", "--sweep_learning_rates=0.05,0.2", f"--workdir={tmp_path}",
            cache_dir=cache_dir)
    summary = json.loads((tmp_path / "summary.json").read_text())
    test = summary["across_models"]["test_accuracy"]
    assert summary["num_models"] == 4 and len(test["values"]) == 4
    assert test["min"] <= test["mean"] <= test["max"] and test["std"] >= 0
    assert [(m["seed"], m["learning_rate"]) for m in summary["models"]] == [(0, 0.05), (1, 0.05), (0, 0.2), (1, 0.2)]


def test_quick_benchmark_writes_table_csv_json_png(cache_dir, tmp_path):
    import csv

    from digits import bench

    result = run_cli("--flagfile=experiments/benchmark_quick.cfg", "--bench_steps_per_call=10",
                     "--bench_layer_sizes=784,10,10", "--bench_max_row_seconds=0.2", f"--workdir={tmp_path}",
                     cache_dir=cache_dir)
    assert "man/auto" in result.stdout
    with open(tmp_path / "benchmark.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == list(bench.ROW_KEYS)
    assert {r["grad"] for r in rows} == {"manual", "autodiff"} and {r["num_models"] for r in rows} == {"1", "4"}
    assert all(float(r["examples_per_s"]) > 0 and float(r["compile_s"]) > 0 for r in rows)
    document = json.loads((tmp_path / "benchmark.json").read_text())
    assert len(document["rows"]) == len(rows) and "jax_version" in document["rows"][0]
    assert (tmp_path / "benchmark.png").read_bytes()[:4] == b"\x89PNG"


def test_idx_dataset_of_another_shape_trains_end_to_end(cache_dir, tmp_path):
    """IDX files are not only MNIST: 20x20 images of 3 classes need --layer_sizes=400,...,3."""
    from digits import data

    rng = np.random.default_rng(0)
    templates = rng.integers(0, 256, (3, 20, 20))
    for split, n in (("train", 600), ("test", 90)):
        labels = rng.integers(0, 3, n).astype(np.uint8)
        noise = rng.integers(-40, 40, (n, 20, 20))
        images = np.clip(templates[labels] + noise, 0, 255).astype(np.uint8)
        stem = "train" if split == "train" else "t10k"
        data.write_idx(tmp_path / f"{stem}-images-idx3-ubyte.gz", images)
        data.write_idx(tmp_path / f"{stem}-labels-idx1-ubyte.gz", labels)
    args = ["--data_source=idx", f"--idx_dir={tmp_path}", "--validation_size=100", "--optimizer=sgd", "--batch_size=20",
            "--epochs=3", "--init=glorot"]
    wrong = run_cli(*args, "--layer_sizes=784,16,10", f"--workdir={tmp_path / 'wrong'}", cache_dir=cache_dir,
                    check=False)
    assert wrong.returncode == 2 and "must start with 400" in wrong.stderr
    run_cli(*args, "--layer_sizes=400,16,3", f"--workdir={tmp_path / 'run'}", cache_dir=cache_dir)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final"]["test_accuracy"] > 0.9 and len(summary["per_class_test_accuracy"]) == 3
    evaluation = run_cli("--mode=eval", f"--workdir={tmp_path / 'run'}", cache_dir=cache_dir)
    assert "0..2" in evaluation.stdout


def test_nan_in_a_flagfile_is_a_flag_error(cache_dir, tmp_path):
    flagfile = tmp_path / "bad.cfg"
    flagfile.write_text("--learning_rate=nan\n")
    result = run_cli(f"--flagfile={flagfile}", "--workdir=/tmp/digits-test-never-written", cache_dir=cache_dir,
                     check=False)
    assert result.returncode == 2 and result.stderr.strip() == "error: --learning_rate must be a finite number, got nan"
