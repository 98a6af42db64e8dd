"""Training-throughput benchmark: manual backprop vs jax.grad over a sweep of networks.

The sweep is the cross product of the config's bench_* fields (networks x batch sizes x grads x
steps per call x models). Each row times the real training program: the chunk built by
`train.Plan.make_chunk` and AOT-compiled by `train.compile_chunk` (vmapped over K models when
K > 1), on uint8 images already on the device. Besides time, each row reads the compiled
gradient program (one step's value_and_grad) for its FLOPs and bytes accessed
(`cost_analysis()`) and its peak temporary memory (`memory_analysis()`): where manual and
automatic differentiation differ, these say how. Per row:

1. build the row's Config, plan and state(s) exactly as training does;
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

import csv
import dataclasses
import itertools
import math
import pathlib
import re
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from digits import compiling, data, model, parallel, report, train
from digits.config import Config

ROW_KEYS = (
    "network",
    "batch_size",
    "grad",
    "steps_per_call",
    "steps_per_call_requested",
    "num_models",
    "sweep",
    "num_devices",
    "mesh",
    "repeats",
    "dtype",
    "compile_s",
    "step_time_median_s",
    "step_time_min_s",
    "step_time_max_s",
    "examples_per_s",
    "gflops",
    "grad_flops",
    "grad_bytes_accessed",
    "grad_temp_bytes",
    "allreduce_bytes",
    "manual_over_autodiff",
    "speedup_vs_one_model",
    "speedup_vs_one_device",
    "nonfinite_loss",
    "device_kind",
    "platform",
    "jax_version",
)

Progress = Callable[[int, int, dict], None]
OUTPUT_FILES = ("benchmark.csv", "benchmark.json", "benchmark.png")  # what write_outputs writes in a workdir


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def network_config(config: Config, network: str) -> Config:
    """The config with one benchmark network: layer sizes ("784,30,10") or a layer stack."""
    tokens = network.split(",")
    if all(t.strip().isdigit() for t in tokens):
        return dataclasses.replace(config, layer_sizes=tuple(int(t) for t in tokens), layers="")
    return dataclasses.replace(config, layers=network)


@dataclasses.dataclass(frozen=True)
class Group:
    """Rows that differ only in the gradient method (timed together)."""

    network: str
    batch_size: int
    num_models: int
    steps: int  # requested steps per call
    sweep: str = "seeds"
    devices: int = 1


def sweep_rates(learning_rate: float, num_models: int) -> tuple[float, ...]:
    """K distinct learning rates spread geometrically over [lr / 4, lr * 4] (() for K = 1)."""
    if num_models == 1:
        return ()
    return tuple(float(learning_rate * 4.0 ** (2 * i / (num_models - 1) - 1)) for i in range(num_models))


def row_config(config: Config, group: Group, grad: str, train_size: int) -> Config:
    """The Config one row trains with (full batch for batch 0 or >= n; gd becomes sgd on mini-batches)."""
    full = group.batch_size == 0 or group.batch_size >= train_size
    optimizer = "sgd" if config.optimizer == "gd" and not full else config.optimizer
    lr_sweep = group.sweep == "learning_rates"
    return dataclasses.replace(
        network_config(config, group.network), batch_size=0 if full else group.batch_size, grad=grad,
        num_seeds=1 if lr_sweep else group.num_models, shared_data_order=group.sweep == "shared_seeds",
        sweep_learning_rates=sweep_rates(config.learning_rate, group.num_models) if lr_sweep else (),
        num_devices=group.devices, optimizer=optimizer, audit_every=0, epochs=0, steps=1,
        augment_shift=0, augment_rotation=0.0, augment_scale=0.0, augment_elastic_alpha=0.0,
        augment_elastic_sigma=4.0,
    )


def groups(config: Config) -> list[Group]:
    """The sweep's groups; K = 1 is one group whatever the sweeps (they differ only for K > 1)."""
    found = []
    for network, batch, k, sweep, devices, steps in itertools.product(
            config.bench_layer_sizes, config.bench_batch_sizes, config.bench_num_seeds, config.bench_sweeps,
            config.bench_devices or (1,), config.bench_steps_per_call):
        group = Group(network, batch, k, steps, "seeds" if k == 1 else sweep, devices)
        if group not in found:
            found.append(group)
    return found


def num_rows(config: Config) -> int:
    return len(groups(config)) * len(config.bench_grads)


def check_networks(config: Config, dataset: data.Dataset) -> None:
    """A list of layer sizes in which the input width follows the class count again
    (784,30,10,784,10,10) is several networks joined by commas, not one: a ValueError saying so."""
    pixels, classes = math.prod(dataset.image_shape), dataset.num_classes
    for network in config.bench_layer_sizes:
        tokens = network.split(",")
        if not all(t.strip().isdigit() for t in tokens):
            continue
        sizes = [int(t) for t in tokens]
        cuts = [i for i in range(2, len(sizes) - 1) if sizes[i] == pixels and sizes[i - 1] == classes]
        if cuts:
            parts = [",".join(map(str, sizes[a:b])) for a, b in zip([0] + cuts, cuts + [len(sizes)], strict=True)]
            raise ValueError(f"bench_layer_sizes: {network} looks like {len(parts)} networks joined by commas; "
                             f"separate networks with ';': --bench_layer_sizes='{';'.join(parts)}'")


def plans(config: Config, dataset: data.Dataset) -> list[train.Plan]:
    """One plan per group (checked against the data and the devices before any timing);
    ValueError if one does not fit."""
    check_networks(config, dataset)
    devices = jax.devices(config.bench_platform) if config.bench_platform else None
    return [train.Plan.create(row_config(config, g, "manual", len(dataset.train)), dataset, devices)
            for g in groups(config)]


# ------------------------------------------------------------------------------ the sweep


def _delete(tree) -> None:
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array) and not leaf.is_deleted():
            leaf.delete()


def analyse_gradient(plan: train.Plan) -> dict:
    """FLOPs, bytes accessed and peak temporary bytes of one model's compiled value_and_grad for
    one step (on one device: the whole batch), and the bytes one step all-reduces across the
    plan's data axis (read from the data-parallel program's HLO; 0 without a data axis)."""
    fn = train.grad_function(plan.config.grad)
    x = jax.ShapeDtypeStruct((plan.batch_size,) + plan.spec.input_shape, plan.dtype)
    labels = jax.ShapeDtypeStruct((plan.batch_size,), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), plan.spec, plan.dtype))
    key = jax.random.PRNGKey(0) if plan.spec.has_dropout else None
    jitted = compiling.jit(lambda p, b, k: fn(p, b, plan.spec, k), platform=plan.layout.platform)
    compiled = train.compile_step_program(plan, jitted.lower(params, (x, labels), key))  # as the training chunk is
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    memory = compiled.memory_analysis()
    allreduce = 0
    if plan.layout.data_size > 1:
        step = jax.jit(train.plan_value_and_grad(plan))
        allreduce = allreduce_bytes(step.lower(params, (x, labels), key).compile().as_text())
    return {"grad_flops": cost.get("flops"), "grad_bytes_accessed": cost.get("bytes accessed"),
            "grad_temp_bytes": getattr(memory, "temp_size_in_bytes", None), "allreduce_bytes": allreduce}


_HLO_ARRAY = re.compile(r"\b(pred|[sfu]\d+|bf16)\[([\d,]*)\]")


def allreduce_bytes(hlo_text: str) -> int:
    """Bytes of every all-reduce result in a compiled program's HLO (XLA may have combined
    several into one tuple-shaped all-reduce; each element counts)."""
    total = 0
    for line in hlo_text.splitlines():
        match = re.search(r"=\s*(.*?)\s+all-reduce(?:-start)?\(", line)
        if not match:
            continue
        for kind, dims in _HLO_ARRAY.findall(match.group(1)):
            bits = 8 if kind == "pred" else int(kind[2:] if kind == "bf16" else kind[1:])
            total += math.prod(int(d) for d in dims.split(",") if d) * bits // 8
    return total


class _RowTimer:
    """One row's compiled program and state; calling it runs `steps` steps and returns their time."""

    def __init__(self, config: Config, group: Group, grad: str, dataset: data.Dataset, data_on: Callable, cache: dict,
                 devices):
        self.network = group.network
        self.group = group
        self.plan = train.Plan.create(row_config(config, group, grad, len(dataset.train)), dataset, devices)
        self.state = self.plan.init_state()
        self.perm = self.plan.permutation(0)
        self.images, self.labels = data_on(self.plan.layout)
        self.host_step, self.stats_seen = 0, []
        key = (group, grad, jnp.dtype(self.plan.dtype).name)
        if key not in cache:
            t0 = time.perf_counter()
            compiled = train.compile_chunk(self.plan, self.state, self.images, self.labels, self.perm)
            cache[key] = (compiled, time.perf_counter() - t0, analyse_gradient(self.plan))
        self.compiled, self.compile_s, self.analysis = cache[key]

    def __call__(self, steps: int) -> float:
        """Runs `steps` steps; returns the seconds they took (ended by block_until_ready)."""
        spe = self.plan.steps_per_epoch
        if not self.plan.full_batch and self.host_step % spe + steps > spe:  # rewind rather than cross an epoch
            zero = jax.device_put(np.zeros(np.shape(self.state.step), np.int32), self.state.step.sharding)
            self.state = self.state._replace(step=zero)
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


def _plan_calls(config: Config, cap: int, step_s: float) -> tuple[int, int]:
    """(steps per call, repeats) keeping repeats * steps * step_s near each row's budget."""
    steps = max(1, min(cap, int(config.bench_max_row_seconds / (config.bench_repeats * step_s))))
    if steps > 1:
        return steps, config.bench_repeats
    return 1, max(1, min(config.bench_repeats, int(config.bench_max_row_seconds / step_s)))


WARMUP_CALLS = 1


def _time_group(config: Config, group: Group, dataset, data_on: Callable, devices, cache: dict) -> list[dict]:
    """Times the rows that differ only in the gradient method, interleaving their timed calls
    (manual, autodiff, manual, ...) so that drift in the machine's speed hits both alike.
    `cache` maps a program's key to (compiled, compile_s, analysis): rows that differ only in
    steps per call run the same program (the trip count is traced), compiled once."""
    grads = config.bench_grads
    if len(cache) > 2 * len(grads):
        cache.clear()  # frees programs of earlier groups
    timers = [_RowTimer(config, group, g, dataset, data_on, cache, devices) for g in grads]
    steps_requested = group.steps
    try:
        first = timers[0]
        cap = steps_requested if first.plan.full_batch else min(steps_requested, first.plan.steps_per_epoch)
        slowest = max(timer(1) for timer in timers)  # a 1-step probe; it overestimates (it pays dispatch)
        steps, repeats = _plan_calls(config, cap, slowest)
        for _ in range(WARMUP_CALLS - 1 if steps == 1 else WARMUP_CALLS):
            steps, repeats = _plan_calls(config, cap, max(timer(steps) / steps for timer in timers))
        times = {id(t): [] for t in timers}
        for _ in range(repeats):
            for timer in timers:
                times[id(timer)].append(timer(steps) / steps)
        return [_row(timer, steps, steps_requested, repeats, times[id(timer)], devices[0]) for timer in timers]
    finally:
        for timer in timers:
            timer.close()


def _row(timer: _RowTimer, steps: int, steps_requested: int, repeats: int, times, device) -> dict:
    median = statistics.median(times)
    plan = timer.plan
    examples_per_step = plan.config.num_models * plan.batch_size
    flops = timer.analysis["grad_flops"]
    return {
        "network": timer.network,
        "batch_size": plan.batch_size,
        "grad": plan.config.grad,
        "steps_per_call": steps,
        "steps_per_call_requested": steps_requested,
        "num_models": plan.config.num_models,
        "sweep": timer.group.sweep,
        "num_devices": plan.layout.num_devices,
        "mesh": f"{plan.layout.model_size}x{plan.layout.data_size}",
        "repeats": repeats,
        "dtype": jnp.dtype(plan.dtype).name,
        "compile_s": timer.compile_s,
        "step_time_median_s": median,
        "step_time_min_s": min(times),
        "step_time_max_s": max(times),
        "examples_per_s": examples_per_step / median,
        "gflops": flops * plan.config.num_models / median / 1e9 if flops else None,
        **timer.analysis,
        "manual_over_autodiff": None,
        "speedup_vs_one_model": None,
        "speedup_vs_one_device": None,
        "nonfinite_loss": bool(any(np.any(np.asarray(s) >= 0) for s in timer.stats_seen)),
        "device_kind": device.device_kind,
        "platform": device.platform,
        "jax_version": jax.__version__,
    }


def fill_comparisons(rows: list[dict]) -> list[dict]:
    """Fills `manual_over_autodiff`, `speedup_vs_one_model` and `speedup_vs_one_device` in place
    (None without a partner): the row with the other gradient method, with one model (seeds
    sweep), or on one device, everything else equal.
    """

    def key(row, **override):
        fields = {k: row[k] for k in ("network", "batch_size", "steps_per_call_requested", "dtype",
                                      "grad", "num_models", "sweep", "num_devices")}
        fields.update(override)
        return tuple(sorted(fields.items()))

    by_key = {key(r): r for r in rows}
    for row in rows:
        manual = by_key.get(key(row, grad="manual"))
        auto = by_key.get(key(row, grad="autodiff"))
        row["manual_over_autodiff"] = (
            manual["step_time_median_s"] / auto["step_time_median_s"] if manual and auto else None
        )
        one = by_key.get(key(row, num_models=1, sweep="seeds"))
        row["speedup_vs_one_model"] = row["examples_per_s"] / one["examples_per_s"] if one else None
        alone = by_key.get(key(row, num_devices=1))
        row["speedup_vs_one_device"] = row["examples_per_s"] / alone["examples_per_s"] if alone else None
    return rows


def _devices(platform: str) -> list:
    try:
        return jax.devices(platform) if platform else jax.devices()
    except RuntimeError as e:
        raise ValueError(f"no JAX device for platform {platform!r}: {' '.join(str(e).split())}") from None


def run(config: Config, dataset: data.Dataset, progress: Progress | None = None) -> list[dict]:
    """Times every combination of the config's sweep on the dataset's training split; returns one
    dict per row (keys: ROW_KEYS). `progress(i, total, row)` is called after row i (1-based) is
    timed; its comparison columns are filled only at the end. Call it inside `jax.enable_x64`
    for a float64 config."""
    devices = _devices(config.bench_platform)
    plans(config, dataset)  # every network fits the data and the devices, before any timing
    rows, cache, placed = [], {}, {}

    def data_on(layout):
        """The training images and labels on a layout's devices, placed once per layout."""
        if layout not in placed:
            placed[layout] = parallel.replicated((dataset.train.images, dataset.train.labels), layout)
        return placed[layout]

    with jax.default_device(devices[0]):
        try:
            for group in groups(config):
                for row in _time_group(config, group, dataset, data_on, devices, cache):
                    rows.append(row)
                    if progress is not None:
                        progress(len(rows), num_rows(config), row)
        finally:
            cache.clear()
            _delete(list(placed.values()))
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


NETWORK_WIDTH = 24  # longer network names are numbered in the table, with a legend below it

TABLE_COLUMNS = (  # (header, width, format); the network column is sized to its names
    ("batch", 7, lambda r: str(r["batch_size"])),
    ("grad", 8, lambda r: str(r["grad"])),
    ("steps", 9, lambda r: f"{r['steps_per_call']}/{r['steps_per_call_requested']}"),
    ("K", 3, lambda r: str(r["num_models"])),
    ("sweep", 6, lambda r: {"seeds": "seeds", "shared_seeds": "shared", "learning_rates": "lrs"}[r["sweep"]]),
    ("mesh", 5, lambda r: r["mesh"]),
    ("compile", 8, lambda r: _fmt(r["compile_s"], ".2f") + "s"),
    ("step (median)", 13, lambda r: _fmt_time(r["step_time_median_s"])),
    ("examples/s", 11, lambda r: _fmt(r["examples_per_s"], ".4g")),
    ("GFLOP/s", 8, lambda r: _fmt(r["gflops"], ".3g")),
    ("MFLOP/step", 10, lambda r: _fmt(r["grad_flops"] and r["grad_flops"] / 1e6, ".4g")),
    ("MB moved", 9, lambda r: _fmt(r["grad_bytes_accessed"] and r["grad_bytes_accessed"] / 1e6, ".4g")),
    ("temp MB", 8, lambda r: _fmt(r["grad_temp_bytes"] and r["grad_temp_bytes"] / 1e6, ".3g")),
    ("all-red KB", 10, lambda r: _fmt(r["allreduce_bytes"] / 1e3, ".4g")),
    ("man/auto", 8, lambda r: _fmt(r["manual_over_autodiff"], ".2f")),
    ("vs K=1", 6, lambda r: _fmt(r["speedup_vs_one_model"], ".2f")),
    ("vs 1 dev", 8, lambda r: _fmt(r["speedup_vs_one_device"], ".2f")),
)


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table of the main columns; `steps` is used/requested per call.

    Network names are never cut: up to NETWORK_WIDTH characters they fill their column, and if
    any is longer the networks are numbered (#1, #2, ...) with a legend of their full names.
    """
    networks = list(dict.fromkeys(str(r["network"]) for r in rows))
    numbered = any(len(n) > NETWORK_WIDTH for n in networks)
    names = {n: f"#{i + 1}" if numbered else n for i, n in enumerate(networks)}
    width = max([len("network")] + [len(v) for v in names.values()])
    columns = (("network", width, lambda r: names[str(r["network"])]),) + TABLE_COLUMNS
    header = "  ".join(h.rjust(w) for h, w, _ in columns)
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append("  ".join(f(row).rjust(w) for _, w, f in columns))
    if numbered:
        lines += ["networks:"] + [f"  {names[n]} = {n}" for n in networks]
    if rows:
        lines.append(f"device: {rows[0]['device_kind']} ({rows[0]['platform']}; CPU {report.cpu_model()}), "
                     f"jax {rows[0]['jax_version']}; FLOPs, bytes and temp memory: one step's compiled value_and_grad")
    return "\n".join(lines)


def write_outputs(rows: list[dict], workdir, config: Config | None = None) -> dict[str, pathlib.Path]:
    """Writes benchmark.csv, benchmark.json ({"rows", "environment"[, "bench"]}) and benchmark.png."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    paths = {pathlib.Path(name).suffix[1:]: workdir / name for name in OUTPUT_FILES}

    fields = list(ROW_KEYS) + [k for r in rows for k in r if k not in ROW_KEYS]
    fields = list(dict.fromkeys(fields))
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in fields})

    payload = {"rows": rows, "environment": report.environment(config.bench_platform if config else "")}
    if config is not None:
        payload["config"] = config.to_dict()
    report.write_json(paths["json"], payload)
    report.plot_benchmark(rows, paths["png"])
    return paths
