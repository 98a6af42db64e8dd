"""Tests for digits.report: JSON / JSON-lines files, confusion matrices and PNG figures."""

from __future__ import annotations

import json
import math

import matplotlib.pyplot as plt
import numpy as np
import pytest

from digits import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 1000  # more than an empty canvas header


@pytest.fixture(autouse=True)
def no_leaked_figures():
    before = len(plt.get_fignums())
    yield
    assert len(plt.get_fignums()) == before


# ---------------------------------------------------------------------------- JSON files


def test_write_json_converts_numpy_types(tmp_path):
    path = tmp_path / "sub" / "results.json"
    report.write_json(
        path,
        {
            "accuracy": np.float32(0.5),
            "count": np.int64(3),
            "flag": np.bool_(True),
            "cm": np.array([[1, 2], [3, 4]], dtype=np.int64),
            "per_class": (np.float64(0.25), 1),
            5: "int key",
        },
    )
    text = path.read_text()
    assert json.loads(text) == {
        "accuracy": 0.5,
        "count": 3,
        "flag": True,
        "cm": [[1, 2], [3, 4]],
        "per_class": [0.25, 1],
        "5": "int key",
    }
    assert text.index('"5"') < text.index('"accuracy"') < text.index('"cm"')  # sorted keys
    assert '\n  "accuracy"' in text  # indent=2
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temp left over


def test_write_json_failure_keeps_old_file(tmp_path):
    path = tmp_path / "results.json"
    report.write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        report.write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_to_jsonable_handles_jax_arrays():
    import jax.numpy as jnp

    assert report.to_jsonable({"x": jnp.arange(3), "y": jnp.float32(1.5)}) == {
        "x": [0, 1, 2],
        "y": 1.5,
    }


def test_metrics_writer_appends_and_reads_back(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with report.MetricsWriter(path) as writer:
        writer.write({"step": 1, "loss": np.float32(2.5)})
        writer.write({"step": 2, "loss": 1.5})
        # Flushed per record: a reader sees it while the writer is still open.
        assert len(report.read_metrics(path)) == 2
    with report.MetricsWriter(path) as writer:  # a resumed run continues the same file
        writer.write({"step": 3, "loss": 0.5, "test_accuracy": 0.9})

    assert report.read_metrics(path) == [
        {"step": 1, "loss": 2.5},
        {"step": 2, "loss": 1.5},
        {"step": 3, "loss": 0.5, "test_accuracy": 0.9},
    ]


def test_read_metrics_skips_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with report.MetricsWriter(path) as writer:
        writer.write({"step": 1, "loss": 2.0})
    with open(path, "a") as f:
        f.write('{"step": 2, "lo')  # the process died mid-write

    assert report.read_metrics(path) == [{"step": 1, "loss": 2.0}]

    # Resuming drops the torn fragment instead of gluing the next record onto it.
    with report.MetricsWriter(path) as writer:
        writer.write({"step": 2, "loss": 1.0})
    assert report.read_metrics(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]
    assert path.read_text().count("\n") == 2


def test_read_metrics_rejects_damage_before_the_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        report.read_metrics(path)


# ------------------------------------------------------------------------ evaluation numbers


def test_confusion_matrix_matches_hand_count():
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 2])
    predictions = np.array([0, 1, 1, 1, 2, 2, 0, 2])
    cm = report.confusion_matrix(labels, predictions, num_classes=4)
    expected = np.array(
        [
            [1, 1, 0, 0],  # true 0: one right, one called 1
            [0, 2, 1, 0],  # true 1: two right, one called 2
            [1, 0, 2, 0],  # true 2: two right, one called 0
            [0, 0, 0, 0],  # class 3 never occurs
        ]
    )
    np.testing.assert_array_equal(cm, expected)
    assert cm.dtype == np.int64
    assert cm.sum() == len(labels)


def test_confusion_matrix_rejects_out_of_range():
    with pytest.raises(ValueError):
        report.confusion_matrix([0, 3], [0, 1], num_classes=3)
    with pytest.raises(ValueError):
        report.confusion_matrix([0, 1], [0], num_classes=3)


def test_per_class_accuracy_with_absent_class():
    cm = np.array([[1, 1, 0, 0], [0, 2, 1, 0], [1, 0, 2, 0], [0, 0, 0, 0]])
    accuracy = report.per_class_accuracy(cm)
    np.testing.assert_allclose(accuracy[:3], [0.5, 2 / 3, 2 / 3])
    assert math.isnan(accuracy[3])
    assert accuracy.dtype.kind == "f"


# ----------------------------------------------------------------------------------- figures


def test_plot_learning_curves(tmp_path):
    records = [
        {"step": 0, "loss": 2.3},
        {"step": 100, "loss": 0.9, "train_accuracy": 0.7, "validation_accuracy": 0.68},
        {"step": 200, "loss": 0.5, "validation_loss": 0.6, "test_accuracy": 0.9},
        {"step": 300, "note": "no metrics in this record"},
    ]
    path = tmp_path / "plots" / "curves.png"
    report.plot_learning_curves(records, path)
    assert_png(path)


def test_plot_learning_curves_without_accuracy(tmp_path):
    path = tmp_path / "curves.png"
    report.plot_learning_curves([{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}], path)
    assert_png(path)


def test_plot_confusion_matrix(tmp_path):
    rng = np.random.default_rng(0)
    cm = report.confusion_matrix(rng.integers(0, 10, 500), rng.integers(0, 10, 500), 10)
    path = tmp_path / "cm.png"
    report.plot_confusion_matrix(cm, path, title="Validation confusion matrix")
    assert_png(path)


def test_plot_misclassified(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(50, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 50)
    predictions = labels.copy()
    predictions[::3] = (predictions[::3] + 1) % 10  # 17 mistakes
    path = tmp_path / "wrong.png"
    report.plot_misclassified(images, labels, predictions, path, max_images=9)
    assert_png(path)


def test_misclassified_mosaic_places_each_digit_under_its_title_band():
    images = np.arange(1, 6, dtype=np.uint8)[:, None, None] * np.ones((5, 3, 2), np.uint8)  # digit k is all k+1
    mosaic = report.misclassified_mosaic(images, np.array([4, 0, 2]), cols=2, title_px=2)
    assert mosaic.shape == (2 * (2 + 3 + 2), 2 * (2 + 2))  # 2 rows of cells: title band, digit, 1 px around
    np.testing.assert_array_equal(mosaic[3:6, 1:3], 5)  # first cell: images[4]
    np.testing.assert_array_equal(mosaic[3:6, 5:7], 1)  # second: images[0]
    np.testing.assert_array_equal(mosaic[10:13, 1:3], 3)  # second row: images[2]
    assert mosaic.sum() == 6 * (5 + 1 + 3)  # and nothing else: blank elsewhere, the spare cell too


def test_plot_misclassified_when_all_correct(tmp_path):
    images = np.zeros((4, 28, 28), np.uint8)
    labels = np.arange(4)
    path = tmp_path / "wrong.png"
    report.plot_misclassified(images, labels, labels, path)
    assert_png(path)


BENCHMARK_ROWS = [
    {"network": "784-30-10", "batch_size": b, "grad": g, "steps_per_call": s,
     "examples_per_s": 1e4 * b * s / (1 + b)}
    for b in (16, 64, 256)
    for g in ("autodiff", "backprop")
    for s in (1, 10)
] + [
    {"network": "784-100-10", "batch_size": b, "grad": "autodiff", "steps_per_call": 1,
     "examples_per_s": 5e3 * b}
    for b in (16, 64)
]


def test_benchmark_lines_use_largest_steps_per_call():
    lines = report._benchmark_lines(BENCHMARK_ROWS)
    assert set(lines) == {
        ("784-30-10", "autodiff"),
        ("784-30-10", "backprop"),
        ("784-100-10", "autodiff"),
    }
    spc, batches, speeds = lines[("784-30-10", "backprop")]
    assert spc == 10 and batches == [16, 64, 256]
    np.testing.assert_allclose(speeds, [1e5 * b / (1 + b) for b in batches])
    assert lines[("784-100-10", "autodiff")][0] == 1


def test_plot_benchmark(tmp_path):
    path = tmp_path / "bench.png"
    report.plot_benchmark(BENCHMARK_ROWS, path)
    assert_png(path)


def test_tensorboard_writer_writes_event_file(tmp_path):
    pytest.importorskip("tensorboardX")
    with report.TensorBoardWriter(tmp_path / "tb") as writer:
        writer.scalars(10, {"loss": np.float32(0.5), "test_accuracy": 0.9, "name": "skip me"})
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1
    data = events[0].read_bytes()
    assert b"loss" in data and b"test_accuracy" in data and b"skip me" not in data
