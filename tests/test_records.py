"""A run's records are never lost or silently wrong (issue 16), checked as a user meets them:
subprocesses of run_experiment.py on tiny runs of the packaged MNIST."""

import json
import shutil

import pytest

from cli import ROOT, run_cli
from digits import report

TINY = ["--train_examples=2000", "--validation_size=500", "--layer_sizes=784,16,10", "--init=glorot",
        "--optimizer=sgd", "--learning_rate=0.1", "--batch_size=50", "--epochs=2"]
RUN = [*(a for a in TINY if not a.startswith("--validation_size")), "--validation_size=0", "--num_seeds=2",
       "--grad=both"]
TRAIN_OUTPUTS = ["checkpoints", "config.json", "confusion_matrix.png", "learning_curves.png", "metrics.jsonl",
                 "misclassified.png", "summary.json"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_dir):
    """80 steps of 2 models at once, with --grad=both and no --audit_every (so: an audit at each of
    the 2 evaluations) and no validation split."""
    workdir = tmp_path_factory.mktemp("records") / "run"
    return workdir, run_cli(*RUN, f"--workdir={workdir}", cache_dir=cache_dir)


def _copy(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run[0], copy)
    return copy


def _files(workdir) -> dict:
    """Bytes and modification times of a run's own files (checkpoints apart)."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(workdir.iterdir()) if p.is_file()}


def _error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_the_report_labels_the_models_the_audit_and_the_missing_split(run):
    workdir, result = run
    assert "Test accuracy:       " in result.stdout and "mean ± std over 2 models (min" in result.stdout
    assert "Validation accuracy: none" in result.stdout
    assert "nan" not in result.stdout.lower() and "nan" not in result.stderr.lower()
    assert all("validation_accuracy" not in r for r in report.read_metrics(workdir / "metrics.jsonl"))
    audit = json.loads((workdir / "summary.json").read_text())["grad_audit"]
    assert audit["count"] == 2 and audit["passed"] and audit["max_violation"] <= 1
    line = next(line for line in result.stdout.splitlines() if line.startswith("Gradient audit"))
    assert "2 checks" in line and "worst ratio" in line and line.endswith("PASS")


def test_each_mode_writes_its_own_files_and_gradcheck_checks_the_run(run, cache_dir, tmp_path):
    workdir = _copy(run, tmp_path)
    before = _files(workdir)
    checked = run_cli("--mode=gradcheck", f"--workdir={workdir}", "--gradcheck_examples=16", "--gradcheck_coords=2",
                      cache_dir=cache_dir)
    assert "Checking the run in" in checked.stdout and "at the checkpoint at step 80" in checked.stdout
    found = json.loads((workdir / "gradcheck.json").read_text())
    assert found["params"] == "at step 80" and found["config"]["layer_sizes"] == [784, 16, 10] and found["passed"]
    evaluated = run_cli("--mode=eval", f"--workdir={workdir}", cache_dir=cache_dir)
    assert "model 0 of 2 (seed 0" in evaluated.stdout and "validation   none" in evaluated.stdout
    assert json.loads((workdir / "eval.json").read_text())["model"] == {"index": 0, "of": 2, "seed": 0,
                                                                       "learning_rate": 0.1}
    assert (workdir / "eval_confusion_matrix.png").exists()
    after = _files(workdir)
    assert {name: after[name] for name in before} == before  # training's files, byte for byte and untouched


def test_a_finished_run_is_finished_shorter_is_refused_longer_extends_in_parts(run, cache_dir, tmp_path):
    workdir = _copy(run, tmp_path)
    before = _files(workdir)
    again = run_cli(*RUN, f"--workdir={workdir}", cache_dir=cache_dir)
    assert "holds a finished run (80 of 80 steps)" in again.stdout and "Test accuracy" in again.stdout
    assert "Gradient check at init" not in again.stdout and _files(workdir) == before
    shorter = run_cli(*RUN, "--epochs=1", f"--workdir={workdir}", cache_dir=cache_dir, check=False)
    lines = _error_lines(shorter)
    assert shorter.returncode == 2 and len(lines) == 1 and "cannot be shortened" in lines[0], shorter.stderr
    assert _files(workdir) == before
    longer = run_cli(*RUN, "--epochs=3", f"--workdir={workdir}", cache_dir=cache_dir)
    assert "not repeated on resume" in longer.stdout and "changes from 80 to 120 steps" in longer.stdout
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == 120 and summary["extended"]
    parts = summary["parts"]
    assert [(p["start_step"], p["end_step"], p["total_steps"]) for p in parts] == [(0, 80, 80), (80, 120, 120)]
    assert summary["timings"]["steps_timed"] == sum(p["steps_timed"] for p in parts) == 120
    assert summary["timings"]["train_s"] == pytest.approx(sum(p["train_s"] for p in parts))
    assert summary["grad_audit"]["count"] == 3 and summary["gradient_check_at_init"]["passed"]
    assert json.loads((workdir / "config.json").read_text())["config"]["epochs"] == 3
    assert [r["step"] for r in report.read_metrics(workdir / "metrics.jsonl")] == [40, 80, 120]


def test_results_apply_every_flag_and_only_docs_publishes(cache_dir, tmp_path):
    flagfile = tmp_path / "tiny.cfg"
    flagfile.write_text("# A tiny experiment.\n#   python run_experiment.py --flagfile=tiny.cfg\n--mode=train\n"
                        + "\n".join(TINY) + "\n")
    text, docs, readme = (flagfile.read_text(), (ROOT / "docs" / "results.json").read_bytes(),
                          (ROOT / "README.md").read_bytes())
    common = ["--mode=results", f"--results_flagfiles={flagfile}", "--results_seeds=2", "--epochs=1",
              f"--workdir={tmp_path / 'runs'}"]
    refused = run_cli(*common, cache_dir=cache_dir, check=False)  # the default --results_dir is docs
    lines = _error_lines(refused)
    assert refused.returncode == 2 and len(lines) == 1 and "--results_dir" in lines[0], refused.stderr
    run_cli(*common, f"--results_dir={tmp_path / 'out'}", cache_dir=cache_dir)
    entry = json.loads((tmp_path / "out" / "results.json").read_text())["experiments"]["tiny"]
    assert entry["seeds"] == 2 and len(entry["test_accuracy"]["values"]) == 2 and entry["cpu"]
    assert entry["epochs"] == 1 and entry["overrides"] == {"epochs": 1} and entry["command"].endswith("--epochs=1")
    assert "| [tiny](../" in (tmp_path / "out" / "results.md").read_text()
    assert "(with --epochs=1)" in (tmp_path / "out" / "results.md").read_text()
    assert entry["models_trained_at_once"] == 2 and len(entry["train_s_per_model"]) == 2
    # One run per seed: the same seeds, combined into one entry with the ensemble of their models.
    run_cli(*common, "--results_one_at_a_time", f"--results_dir={tmp_path / 'one'}", cache_dir=cache_dir)
    one = json.loads((tmp_path / "one" / "results.json").read_text())["experiments"]["tiny"]
    runs = [json.loads((tmp_path / "runs" / "tiny" / f"seed_{s}" / "summary.json").read_text()) for s in (0, 1)]
    assert [r["num_models"] for r in runs] == [1, 1] and [r["config"]["seed"] for r in runs] == [0, 1]
    assert one["test_accuracy"]["values"] == [r["final"]["test_accuracy"] for r in runs]
    assert one["train_s_per_model"] == [r["timings"]["train_s"] for r in runs] and one["models_trained_at_once"] == 1
    assert one["train_s"] == pytest.approx(sum(one["train_s_per_model"]))
    # Models trained apart match the vmapped ones to within a last-bit difference's effect.
    assert one["test_accuracy"]["values"] == pytest.approx(entry["test_accuracy"]["values"], abs=0.005)
    assert one["ensemble_test_accuracy"] == pytest.approx(entry["ensemble_test_accuracy"], abs=0.005)
    assert f"| {one['seconds_per_epoch']:.2f} (1) |" in (tmp_path / "one" / "results.md").read_text()
    # --results_resume keeps the runs: a finished seed is reported as it is (its part of the ensemble
    # evaluated from its final checkpoint), a missing one is trained.
    seed_0 = (tmp_path / "runs" / "tiny" / "seed_0" / "summary.json").read_bytes()
    shutil.rmtree(tmp_path / "runs" / "tiny" / "seed_1")
    run_cli(*common, "--results_one_at_a_time", "--results_resume", f"--results_dir={tmp_path / 'resumed'}",
            cache_dir=cache_dir)
    resumed = json.loads((tmp_path / "resumed" / "results.json").read_text())["experiments"]["tiny"]
    assert (tmp_path / "runs" / "tiny" / "seed_0" / "summary.json").read_bytes() == seed_0
    assert resumed["test_accuracy"]["values"] == one["test_accuracy"]["values"]
    assert resumed["ensemble_test_accuracy"] == one["ensemble_test_accuracy"]
    # One seed one at a time is that seed's run in seed_0 too: its finished run is reported.
    single = [a if a != "--results_seeds=2" else "--results_seeds=1" for a in common]
    run_cli(*single, "--results_one_at_a_time", "--results_resume", f"--results_dir={tmp_path / 'single'}",
            cache_dir=cache_dir)
    alone = json.loads((tmp_path / "single" / "results.json").read_text())["experiments"]["tiny"]
    assert alone["seeds"] == 1 and alone["test_accuracy"]["values"] == one["test_accuracy"]["values"][:1]
    assert (tmp_path / "runs" / "tiny" / "seed_0" / "summary.json").read_bytes() == seed_0
    # A kept run of another config is refused, with advice for a results command.
    other = run_cli(*common, "--results_one_at_a_time", "--results_resume", "--learning_rate=0.2",
                    f"--results_dir={tmp_path / 'other'}", cache_dir=cache_dir, check=False)
    lines = _error_lines(other)
    assert other.returncode != 0 and len(lines) == 1 and "drop --results_resume" in lines[0], other.stderr
    # Only --results_dir=docs publishes (the README table, the flagfiles' "# Result" lines).
    assert flagfile.read_text() == text and (ROOT / "docs" / "results.json").read_bytes() == docs
    assert (ROOT / "README.md").read_bytes() == readme


@pytest.mark.parametrize("args,message", [
    (["--images=a.png,", "b.png"], "unexpected argument 'b.png'"),
    (["--flagfile=/nonexistent/x.cfg"], "cannot open a --flagfile"),
    (["--epochs=2", "--flagfile=experiments/nielsen_784_30_10.cfg"], "--epochs=2 comes before --flagfile"),
    (["--images=x.png"], "--images is for --mode=predict"),
    (["--layer_sizes=784,30"], "the last layer must have 10 units"),
    (["--data_source=tfds", "--tfds_data_dir=/nonexistent"], "/nonexistent does not exist"),
    (["--mode=benchmark", "--bench_layer_sizes=784,30,10,784,10,10"], "separate networks with ';'"),
])
def test_flag_errors_are_one_line_and_exit_2(cache_dir, args, message):
    result = run_cli("--workdir=/tmp/digits-test-never-written", *args, cache_dir=cache_dir, check=False)
    lines = _error_lines(result)
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert lines[0].startswith("error: ") and "ERROR" not in lines[0] and "Traceback" not in result.stderr


def test_eval_says_what_the_workdir_lacks(run, cache_dir, tmp_path):
    empty = run_cli("--mode=eval", f"--workdir={tmp_path}", cache_dir=cache_dir, check=False)
    assert empty.returncode == 2 and "holds no training run (no config.json)" in empty.stderr
    shutil.copy(run[0] / "config.json", tmp_path / "config.json")
    unsaved = run_cli("--mode=eval", f"--workdir={tmp_path}", cache_dir=cache_dir, check=False)
    lines = _error_lines(unsaved)
    assert unsaved.returncode == 2 and len(lines) == 1 and "no checkpoint yet" in lines[0], unsaved.stderr
    wrong = run_cli("--mode=eval", f"--workdir={run[0]}", "--model=2", cache_dir=cache_dir, check=False)
    assert wrong.returncode == 2 and "holds 2 model(s)" in wrong.stderr


def test_paths_expand_home_and_variables_and_a_model_is_picked(run, cache_dir, mnist_splits, tmp_path):
    from PIL import Image

    home = tmp_path / "home"
    shutil.copytree(run[0], home / "run")
    (home / "check.cfg").write_text("--mode=gradcheck\n--workdir=~/run\n--gradcheck_at=init\n"
                                    "--gradcheck_examples=8\n--gradcheck_coords=2\n")
    env = {"HOME": str(home), "DIGITS_TEST_CACHE": str(cache_dir)}
    checked = run_cli("--flagfile=~/check.cfg", "--cache_dir=$DIGITS_TEST_CACHE", cache_dir=None, env=env)
    assert "at its initialisation" in checked.stdout
    assert json.loads((home / "run" / "gradcheck.json").read_text())["params"] == "at init"
    assert not (ROOT / "~").exists() and not (ROOT / "$DIGITS_TEST_CACHE").exists()
    Image.fromarray(mnist_splits.test.images[0]).save(home / "digit.png")
    predicted = run_cli("--mode=predict", "--workdir=~/run", "--model=1", "--images=~/digit.png",
                        cache_dir=cache_dir, env=env)
    assert "model 1 of 2 (seed 1" in predicted.stdout
    assert json.loads((home / "run" / "predictions.json").read_text())["model"]["index"] == 1


def test_predict_with_no_readable_image_writes_nothing(run, cache_dir, tmp_path):
    workdir, _ = run
    (tmp_path / "notes.png").write_text("not an image")
    result = run_cli("--mode=predict", f"--workdir={workdir}", f"--images={tmp_path / 'notes.png'}",
                     cache_dir=cache_dir, check=False)
    assert result.returncode == 1 and "notes.png" in result.stderr and "nothing written" in result.stderr
    assert not (workdir / "predictions.json").exists() and "Traceback" not in result.stderr


def test_overwrite_removes_every_digits_output_and_nothing_else(run, cache_dir, tmp_path):
    workdir = _copy(run, tmp_path)
    for name in ("notes.txt", "eval.json", "predictions.json", "gradcheck.json", "benchmark.csv"):
        (workdir / name).write_text("{}")
    (workdir / "preprocessed").mkdir()
    (workdir / "preprocessed" / "a_28x28.png").write_bytes(b"")
    refused = run_cli(*RUN, "--learning_rate=0.2", f"--workdir={workdir}", cache_dir=cache_dir, check=False)
    lines = _error_lines(refused)
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr
    assert "different config (learning_rate differ" in lines[0] and "preprocessed/" in lines[0]
    assert "keeps notes.txt" in lines[0]
    run_cli(*RUN, "--learning_rate=0.2", "--epochs=1", "--overwrite", f"--workdir={workdir}", cache_dir=cache_dir)
    assert sorted(p.name for p in workdir.iterdir()) == sorted(TRAIN_OUTPUTS + ["notes.txt"])
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["config"]["learning_rate"] == 0.2 and summary["steps"] == 40 and len(summary["parts"]) == 1


def test_benchmark_table_shows_whole_network_names(cache_dir, tmp_path):
    network = "784,100,100,100,100,100,10"  # longer than the column: numbered, with a legend
    result = run_cli("--mode=benchmark", f"--bench_layer_sizes={network}", "--bench_batch_sizes=16",
                     "--bench_grads=manual", "--bench_steps_per_call=2", "--bench_repeats=1",
                     "--bench_max_row_seconds=0.05", "--train_examples=1000", "--validation_size=100",
                     f"--workdir={tmp_path}", cache_dir=cache_dir)
    assert f"#1 = {network}" in result.stdout
