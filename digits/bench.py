"""Training-throughput benchmark: manual backprop vs jax.grad over a sweep of sizes.

Each row of a sweep times the real training program: the chunk built by
`train.make_train_chunk` and AOT-compiled by `train.compile_chunk` (vmapped over K models when
`num_seeds > 1`), on uint8 images already on the device. Per row:

1. build the Config, spec, optimizer and state(s) exactly as training does;
2. compile, timed on its own (`compile_s`);
3. an untimed 1-step probe call estimates the step time, from which the steps per timed call
   are capped so the row's timed work stays near `max_row_seconds` (and, when even one step is
   too slow for that, the repeats too); mini-batch calls are also capped at one epoch, since a
   chunk must not cross an epoch boundary (each call starts at an epoch's first step);
4. `warmup` untimed calls of the planned length, each refining the plan from its own time (the
   probe counts as one when the plan is 1 step per call), then `repeats` timed calls, each
   ended by `jax.block_until_ready`.

Rows that differ only in the gradient method are timed together, with the same plan and their
timed calls interleaved (manual, autodiff, manual, ...), so that the manual/autodiff ratio is
not skewed by the machine's speed drifting between rows.

Step times are call times divided by the steps in the call. The requested steps per call is
kept in `steps_per_call_requested`; `steps_per_call` and `repeats` are what was run.

Library code: no flags and no printing. `run` reports progress through an optional callback.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import itertools
import os
import pathlib
import platform as _platform
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from digits import report, train
from digits.config import Config

BENCH_GRADS = ("manual", "autodiff")
PLATFORMS = ("", "cpu", "gpu", "tpu", "cuda", "rocm")

ROW_KEYS = (
    "layer_sizes",
    "batch_size",
    "grad",
    "steps_per_call",
    "steps_per_call_requested",
    "num_models",
    "repeats",
    "dtype",
    "compile_s",
    "step_time_median_s",
    "step_time_min_s",
    "step_time_max_s",
    "examples_per_s",
    "gflops",
    "manual_over_autodiff",
    "speedup_vs_one_model",
    "nonfinite_loss",
    "device_kind",
    "platform",
    "jax_version",
)

Progress = Callable[[int, int, dict], None]


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """A benchmark sweep: the cross product of the five tuples below, one row each.

    batch_sizes: 0 (or anything >= the number of training images) means full batch.
    num_seeds: K models trained at once by the vmapped chunk (1: the plain, unvmapped chunk).
    max_row_seconds: rough cap on one row's timed work (steps per call, then repeats, shrink).
    platform: "cpu" / "gpu" / "tpu"; "" is JAX's default backend.
    """

    layer_sizes: tuple[tuple[int, ...], ...] = ((784, 10, 10),)
    batch_sizes: tuple[int, ...] = (0,)
    grads: tuple[str, ...] = BENCH_GRADS
    steps_per_call: tuple[int, ...] = (1,)
    num_seeds: tuple[int, ...] = (1,)
    repeats: int = 5
    warmup: int = 1
    platform: str = ""
    x64: bool = False
    activation: str = "relu"
    optimizer: str = "sgd"
    learning_rate: float = 0.01
    max_row_seconds: float = 4.0

    def __post_init__(self):
        norm = object.__setattr__
        norm(self, "layer_sizes", tuple(tuple(int(n) for n in sizes) for sizes in self.layer_sizes))
        norm(self, "batch_sizes", tuple(int(b) for b in self.batch_sizes))
        norm(self, "grads", tuple(str(g) for g in self.grads))
        norm(self, "steps_per_call", tuple(int(s) for s in self.steps_per_call))
        norm(self, "num_seeds", tuple(int(k) for k in self.num_seeds))
        for name in ("layer_sizes", "batch_sizes", "grads", "steps_per_call", "num_seeds"):
            _check(len(getattr(self, name)) > 0, f"bench {name} must not be empty")
        for sizes in self.layer_sizes:
            _check(len(sizes) >= 2 and min(sizes) >= 1, f"bad bench layer sizes {sizes}")
        _check(min(self.batch_sizes) >= 0, f"bench batch sizes must be >= 0 (0: full batch), got {self.batch_sizes}")
        bad = [g for g in self.grads if g not in BENCH_GRADS]
        _check(not bad, f"unknown bench grads {bad}; choose from {', '.join(BENCH_GRADS)}")
        _check(min(self.steps_per_call) >= 1, f"bench steps_per_call must be >= 1, got {self.steps_per_call}")
        _check(min(self.num_seeds) >= 1, f"bench num_seeds must be >= 1, got {self.num_seeds}")
        _check(self.repeats >= 1, f"bench repeats must be >= 1, got {self.repeats}")
        _check(self.warmup >= 0, f"bench warmup must be >= 0, got {self.warmup}")
        _check(self.max_row_seconds > 0, f"max_row_seconds must be > 0, got {self.max_row_seconds}")
        _check(self.platform in PLATFORMS, f"unknown platform {self.platform!r}; choose from cpu, gpu, tpu or ''")

    @property
    def num_rows(self) -> int:
        return (len(self.layer_sizes) * len(self.batch_sizes) * len(self.grads)
                * len(self.steps_per_call) * len(self.num_seeds))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


# ------------------------------------------------------------------------------ parsing


def _parse_int(token: str, what: str, text: str) -> int:
    try:
        return int(token)
    except ValueError:
        raise ValueError(f"{what}: {token!r} in {text!r} is not an integer") from None


def parse_layer_sizes_list(text: str) -> tuple[tuple[int, ...], ...]:
    """"784,10,10;784,30,10" -> ((784, 10, 10), (784, 30, 10)). Each needs >= 2 sizes >= 1."""
    what = "layer sizes list"
    groups = [g.strip() for g in str(text).split(";")]
    if groups and groups[-1] == "":  # tolerate one trailing ';'
        groups = groups[:-1]
    if not groups:
        raise ValueError(f"{what}: empty; expected e.g. '784,10,10;784,30,10'")
    result = []
    for group in groups:
        if not group:
            raise ValueError(f"{what}: empty network between ';' in {text!r}")
        sizes = tuple(_parse_int(t.strip(), what, text) for t in group.split(","))
        if len(sizes) < 2:
            raise ValueError(f"{what}: {group!r} needs at least an input and an output size")
        if min(sizes) < 1:
            raise ValueError(f"{what}: sizes must be >= 1, got {group!r}")
        result.append(sizes)
    return tuple(result)


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """"10,128,full" -> (10, 128, 0); "full" (any case) or 0 is the full batch."""
    what = "batch sizes"
    tokens = [t.strip() for t in str(text).split(",")]
    if tokens == [""]:
        raise ValueError(f"{what}: empty; expected e.g. '10,128,full'")
    result = []
    for token in tokens:
        if token.lower() == "full":
            result.append(0)
            continue
        if not token:
            raise ValueError(f"{what}: empty entry in {text!r}")
        value = _parse_int(token, what, text)
        if value < 0:
            raise ValueError(f"{what}: {value} is negative; use a positive size or 'full'")
        result.append(value)
    return tuple(result)


def parse_positive_ints(text: str, what: str = "values") -> tuple[int, ...]:
    """"1,100" -> (1, 100); every entry must be an integer >= 1 (steps per call, num seeds)."""
    tokens = [t.strip() for t in str(text).split(",")]
    if tokens == [""]:
        raise ValueError(f"{what}: empty")
    values = tuple(_parse_int(t, what, text) for t in tokens)
    if min(values) < 1:
        raise ValueError(f"{what}: entries must be >= 1, got {text!r}")
    return values


def parse_grads(text: str) -> tuple[str, ...]:
    """"manual,autodiff" -> ("manual", "autodiff")."""
    grads = tuple(t.strip() for t in str(text).split(","))
    bad = [g for g in grads if g not in BENCH_GRADS]
    if bad:
        raise ValueError(f"grads: unknown {bad} in {text!r}; choose from {', '.join(BENCH_GRADS)}")
    return grads


# ------------------------------------------------------------------------------ environment


def _device(platform: str):
    try:
        return jax.devices(platform)[0] if platform else jax.devices()[0]
    except RuntimeError as e:
        raise ValueError(f"no JAX device for platform {platform!r}: {e}") from None


def environment(platform: str = "") -> dict:
    """What the numbers depend on: versions, backend, devices and CPU count."""
    device = _device(platform)
    try:
        import jaxlib

        jaxlib_version = jaxlib.__version__
    except (ImportError, AttributeError):
        jaxlib_version = None
    return {
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib_version,
        "numpy_version": np.__version__,
        "python_version": _platform.python_version(),
        "os": _platform.platform(),
        "backend": jax.default_backend(),
        "platform": device.platform,
        "devices": [str(d) for d in jax.devices(device.platform)],
        "device_kind": device.device_kind,
        "cpu_count": os.cpu_count(),
    }


# ------------------------------------------------------------------------------ the sweep


def _layer_name(sizes) -> str:
    return "-".join(str(n) for n in sizes)


def _delete(tree) -> None:
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array) and not leaf.is_deleted():
            leaf.delete()


class _RowTimer:
    """One row's compiled program and state; calling it runs `steps` steps and returns their time."""

    def __init__(self, bench: BenchConfig, sizes, batch_size: int, grad: str, num_seeds: int,
                 images, labels, device, dtype, cache: dict):
        n = int(images.shape[0])
        self.full = batch_size == 0 or batch_size >= n
        self.batch = n if self.full else batch_size
        self.config = Config(
            layer_sizes=tuple(sizes), activation=bench.activation, grad=grad, optimizer=bench.optimizer,
            learning_rate=bench.learning_rate, batch_size=0 if self.full else self.batch, x64=bench.x64,
            num_seeds=num_seeds,
        )
        self.spe = train.steps_per_epoch(n, self.config.batch_size)
        spec = self.config.spec(n)
        tx = train.make_optimizer(self.config, train.total_steps(self.config, n), self.spe)
        self.vmapped = self.config.num_models > 1
        state = train.init_run_state(self.config, spec, tx, dtype)
        perm = train.permutations(state, 0, n, self.vmapped)
        self.state, self.perm = jax.device_put((state, perm), device)
        self.images, self.labels, self.device = images, labels, device
        self.host_step, self.stats_seen = 0, []
        key = (tuple(sizes), self.batch, grad, self.config.num_models, jnp.dtype(dtype).name)
        if key not in cache:
            chunk = train.make_train_chunk(spec, tx, grad, self.batch, self.spe, self.full, 0, dtype)
            t0 = time.perf_counter()
            compiled = train.compile_chunk(chunk, self.state, images, labels, self.perm, self.vmapped)
            cache[key] = (compiled, time.perf_counter() - t0)
        self.compiled, self.compile_s = cache[key]

    def __call__(self, steps: int) -> float:
        """Runs `steps` steps; returns the seconds they took (ended by block_until_ready)."""
        if not self.full and self.host_step % self.spe + steps > self.spe:  # rewind rather than cross an epoch
            self.state = self.state._replace(step=jax.device_put(np.zeros(np.shape(self.state.step), np.int32), self.device))
            jax.block_until_ready(self.state.step)
            self.host_step = 0
        t = time.perf_counter()
        self.state, stats = self.compiled(self.state, self.images, self.labels, self.perm, np.int32(steps))
        jax.block_until_ready((self.state, stats))
        elapsed = time.perf_counter() - t
        self.host_step += steps
        self.stats_seen.append(stats.first_bad_step)
        return elapsed

    def close(self) -> None:
        _delete((self.state, self.perm))


def _plan(bench: BenchConfig, cap: int, step_s: float) -> tuple[int, int]:
    """(steps per call, repeats) keeping repeats * steps * step_s near each row's budget."""
    steps = max(1, min(cap, int(bench.max_row_seconds / (bench.repeats * step_s))))
    if steps > 1:
        return steps, bench.repeats
    return 1, max(1, min(bench.repeats, int(bench.max_row_seconds / step_s)))


def _time_group(bench: BenchConfig, sizes, batch_size: int, grads, steps_requested: int, num_seeds: int,
                images, labels, device, dtype, cache: dict) -> list[dict]:
    """Times the rows that differ only in the gradient method, interleaving their timed calls
    (manual, autodiff, manual, ...) so that drift in the machine's speed hits both alike.
    `cache` maps a program's key to (compiled, compile_s): rows that differ only in steps per
    call run the same program (the trip count is traced), compiled once."""
    if len(cache) > 2 * len(grads):
        cache.clear()  # frees programs of earlier groups
    timers = [_RowTimer(bench, sizes, batch_size, g, num_seeds, images, labels, device, dtype, cache) for g in grads]
    try:
        first = timers[0]
        cap = steps_requested if first.full else min(steps_requested, first.spe)
        slowest = max(timer(1) for timer in timers)  # a 1-step probe; it overestimates (it pays dispatch)
        steps, repeats = _plan(bench, cap, slowest)
        for _ in range(bench.warmup - 1 if steps == 1 else bench.warmup):
            steps, repeats = _plan(bench, cap, max(timer(steps) / steps for timer in timers))
        times = {id(t): [] for t in timers}
        for _ in range(repeats):
            for timer in timers:
                times[id(timer)].append(timer(steps) / steps)
        return [_row(timer, sizes, steps, steps_requested, repeats, times[id(timer)], dtype, device) for timer in timers]
    finally:
        for timer in timers:
            timer.close()


def _row(timer: _RowTimer, sizes, steps: int, steps_requested: int, repeats: int, times, dtype, device) -> dict:
    median = statistics.median(times)
    examples_per_step = timer.config.num_models * timer.batch
    return {
        "layer_sizes": _layer_name(sizes),
        "batch_size": timer.batch,
        "grad": timer.config.grad,
        "steps_per_call": steps,
        "steps_per_call_requested": steps_requested,
        "num_models": timer.config.num_models,
        "repeats": repeats,
        "dtype": jnp.dtype(dtype).name,
        "compile_s": timer.compile_s,
        "step_time_median_s": median,
        "step_time_min_s": min(times),
        "step_time_max_s": max(times),
        "examples_per_s": examples_per_step / median,
        "gflops": train.flops_per_example(sizes) * examples_per_step / median / 1e9,
        "manual_over_autodiff": None,
        "speedup_vs_one_model": None,
        "nonfinite_loss": bool(any(np.any(np.asarray(s) >= 0) for s in timer.stats_seen)),
        "device_kind": device.device_kind,
        "platform": device.platform,
        "jax_version": jax.__version__,
    }


def fill_comparisons(rows: list[dict]) -> list[dict]:
    """Fills `manual_over_autodiff` and `speedup_vs_one_model` in place (None without a partner).

    Partners match on layer sizes, batch size, requested steps per call and dtype, plus the
    number of models (for manual/autodiff) or the grad (for the speedup over one model).
    """

    def key(row, **override):
        fields = {k: row[k] for k in ("layer_sizes", "batch_size", "steps_per_call_requested", "dtype",
                                      "grad", "num_models")}
        fields.update(override)
        return tuple(sorted(fields.items()))

    by_key = {key(r): r for r in rows}
    for row in rows:
        manual = by_key.get(key(row, grad="manual"))
        auto = by_key.get(key(row, grad="autodiff"))
        row["manual_over_autodiff"] = (
            manual["step_time_median_s"] / auto["step_time_median_s"] if manual and auto else None
        )
        one = by_key.get(key(row, num_models=1))
        row["speedup_vs_one_model"] = row["examples_per_s"] / one["examples_per_s"] if one else None
    return rows


def run(bench: BenchConfig, images, labels, progress: Progress | None = None) -> list[dict]:
    """Times every combination of the sweep; returns one dict per row (keys: ROW_KEYS).

    images: uint8 (N, 28, 28) (or (N, 784)); labels: int (N,). `progress(i, total, row)` is
    called after row i (1-based) is timed; its comparison columns are filled only at the end.
    """
    images = np.asarray(images)
    labels = np.asarray(labels, np.int32)
    _check(images.dtype == np.uint8 and images.ndim >= 2, f"images must be uint8 (N, H, W), got {images.dtype} {images.shape}")
    _check(labels.shape == images.shape[:1], f"labels shape {labels.shape} does not match images {images.shape}")
    _check(len(labels) >= 1, "no training images")
    pixels = int(np.prod(images.shape[1:]))
    for sizes in bench.layer_sizes:
        _check(sizes[0] == pixels, f"layer sizes {sizes} must start with {pixels} (the image size)")
        _check(int(labels.max()) < sizes[-1] and int(labels.min()) >= 0,
               f"labels must lie in [0, {sizes[-1]}) for layer sizes {sizes}")

    device = _device(bench.platform)
    x64 = jax.enable_x64(True) if bench.x64 else contextlib.nullcontext()
    groups = list(itertools.product(bench.layer_sizes, bench.batch_sizes, bench.num_seeds, bench.steps_per_call))
    rows, cache = [], {}
    with x64, jax.default_device(device):
        dtype = jnp.float64 if bench.x64 else jnp.float32
        images_d, labels_d = jax.device_put((images, labels), device)
        try:
            for sizes, batch_size, num_seeds, steps in groups:
                for row in _time_group(bench, sizes, batch_size, bench.grads, steps, num_seeds, images_d, labels_d,
                                       device, dtype, cache):
                    rows.append(row)
                    if progress is not None:
                        progress(len(rows), bench.num_rows, row)
        finally:
            cache.clear()
            _delete((images_d, labels_d))
    return fill_comparisons(rows)


# ------------------------------------------------------------------------------ outputs


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _fmt_time(seconds) -> str:
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


TABLE_COLUMNS = (  # (header, width, format)
    ("layers", 16, lambda r: str(r["layer_sizes"])),
    ("batch", 7, lambda r: str(r["batch_size"])),
    ("grad", 8, lambda r: str(r["grad"])),
    ("steps", 9, lambda r: f"{r['steps_per_call']}/{r['steps_per_call_requested']}"),
    ("K", 3, lambda r: str(r["num_models"])),
    ("compile", 8, lambda r: _fmt(r["compile_s"], ".2f") + "s"),
    ("step (median)", 13, lambda r: _fmt_time(r["step_time_median_s"])),
    ("examples/s", 11, lambda r: _fmt(r["examples_per_s"], ".4g")),
    ("GFLOP/s", 8, lambda r: _fmt(r["gflops"], ".3g")),
    ("man/auto", 8, lambda r: _fmt(r["manual_over_autodiff"], ".2f")),
    ("vs K=1", 6, lambda r: _fmt(r["speedup_vs_one_model"], ".2f")),
)


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table of the main columns; `steps` is used/requested per call."""
    header = "  ".join(h.rjust(w) for h, w, _ in TABLE_COLUMNS)
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append("  ".join(f(row).rjust(w) for _, w, f in TABLE_COLUMNS))
    if rows:
        lines.append(f"device: {rows[0]['device_kind']} ({rows[0]['platform']}), jax {rows[0]['jax_version']}")
    return "\n".join(lines)


def write_outputs(rows: list[dict], workdir, bench: BenchConfig | None = None) -> dict[str, pathlib.Path]:
    """Writes benchmark.csv, benchmark.json ({"rows", "environment"[, "bench"]}) and benchmark.png."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    paths = {name: workdir / f"benchmark.{name}" for name in ("csv", "json", "png")}

    fields = list(ROW_KEYS) + [k for r in rows for k in r if k not in ROW_KEYS]
    fields = list(dict.fromkeys(fields))
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in fields})

    platform = bench.platform if bench else ""
    payload = {"rows": rows, "environment": environment(platform)}
    if bench is not None:
        payload["bench"] = dataclasses.asdict(bench)
    report.write_json(paths["json"], payload)
    report.plot_benchmark(rows, paths["png"])
    return paths
