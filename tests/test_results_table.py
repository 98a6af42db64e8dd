"""The results table's columns from training summaries (no training): the test accuracy at the
best validation epoch beside the final one, for one model, K vmapped and K trained apart."""

import math
import pathlib

from digits import experiment, results, train

ENV = {"cpu": "AMD EPYC", "device_kind": "cpu", "versions": {"jax": "0.10.2"}}
TIMINGS = {"seconds_per_epoch": 2.0, "train_s": 4.0, "compile_s": 1.0, "eval_s": 0.5, "eval_compile_s": 0.1,
           "total_s": 6.0, "peak_rss_bytes": 2**30}


def summary(test: float, best_test: float | None) -> dict:
    out = {"environment": ENV, "timings": TIMINGS, "num_models": 1, "epochs": 2,
           "final": {"test_accuracy": test, "validation_accuracy": 0.99}, "config": {}, "steps": 10}
    if best_test is not None:
        out["best_validation"] = {"test_accuracy": best_test, "step": 5}
    return out


def row(entry_summary: dict) -> tuple[dict, str]:
    """(the results.json entry, its results.md line) of a summary."""
    table = results.add({}, "x", pathlib.Path(__file__).resolve().parents[1] / "experiments" / "x.cfg", entry_summary)
    return table["experiments"]["x"], results.markdown_table(table).splitlines()[-1]


def test_one_model_reports_its_best_validation_test_accuracy_beside_the_final_one():
    entry, line = row(summary(0.9940, 0.9938))
    assert entry["best_validation_test_accuracy"]["values"] == [0.9938]
    cells = [c.strip() for c in line.split("|")]
    assert cells[3] == "99.40 ± 0.00" and cells[6] == "99.38 ± 0.00" and cells[7] == "99.00 ± 0.00"
    assert ", test at best validation 99.38 ± 0.00%;" in results.result_line(entry)


def test_a_run_that_reports_its_final_model_shows_no_best_validation():
    entry, line = row(summary(0.99, None))
    assert entry["best_validation_test_accuracy"] is None and line.split("|")[6].strip() == "-"


def test_seeds_trained_apart_combine_their_best_validation_accuracies():
    summaries = [summary(0.9940, 0.9938), summary(0.9930, 0.9932)]
    ensemble = {"test_accuracy": 0.995, "models": 2}
    combined = experiment.combined_summary([{**s, "timings": {**TIMINGS, "steps_timed": 10, "seconds_per_step": 0.2,
                                                              "examples_per_s": 5.0}} for s in summaries], ensemble)
    entry, _ = row(combined)
    best = entry["best_validation_test_accuracy"]
    assert best["values"] == [0.9938, 0.9932] and math.isclose(best["mean"], 0.9935)
    assert best == {k: train.summarise([0.9938, 0.9932])[k] for k in ("mean", "std", "min", "max", "values")}
    assert entry["test_accuracy"]["values"] == [0.9940, 0.9930]
