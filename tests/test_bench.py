"""Tests for digits.bench: the timing sweep, its derived columns, outputs and flag parsing.

Offline and fast: synthetic uint8 images, tiny networks, a few repeats.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import pytest

from digits import bench, train
from digits import data as data_lib
from digits.config import Config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_IMAGES = 512
MINI_BATCH = 128  # 4 steps per epoch on 512 images


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)

    def split(n):
        return data_lib.Split(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                              rng.integers(0, 10, n).astype(np.int32))

    return data_lib.Dataset("random", "test", split(N_IMAGES), split(16))


def sweep_config(**overrides):
    return Config(**{**dict(optimizer="sgd", learning_rate=0.01, bench_layer_sizes=("784,10,10",),
                            bench_batch_sizes=(MINI_BATCH, 0), bench_grads=("manual", "autodiff"),
                            bench_steps_per_call=(1, 10), bench_num_seeds=(1, 2), bench_repeats=2), **overrides})


SWEEP = sweep_config()


@pytest.fixture(scope="module")
def sweep(data):
    calls = []
    rows = bench.run(SWEEP, data, progress=lambda i, total, row: calls.append((i, total, dict(row))))
    return rows, calls


def by(rows, **match):
    found = [r for r in rows if all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, (match, found)
    return found[0]


# ------------------------------------------------------------------------------ run


def test_run_returns_one_well_formed_row_per_combination(sweep):
    rows, _ = sweep
    assert len(rows) == bench.num_rows(SWEEP) == 16
    combos = {(r["batch_size"], r["grad"], r["steps_per_call_requested"], r["num_models"]) for r in rows}
    assert len(combos) == 16  # every combination exactly once
    for row in rows:
        assert tuple(row) == bench.ROW_KEYS
        assert row["network"] == "784,10,10"
        assert row["batch_size"] in (MINI_BATCH, N_IMAGES)  # full batch reports its actual size
        assert row["dtype"] == "float32"
        assert row["platform"] == "cpu" and row["device_kind"] and row["jax_version"]
        assert row["compile_s"] > 0
        assert 0 < row["step_time_min_s"] <= row["step_time_median_s"] <= row["step_time_max_s"]
        assert 1 <= row["repeats"] <= SWEEP.bench_repeats
        assert 1 <= row["steps_per_call"] <= row["steps_per_call_requested"]
        expected_examples = row["num_models"] * row["batch_size"] / row["step_time_median_s"]
        assert row["examples_per_s"] == pytest.approx(expected_examples)
        expected_gflops = row["grad_flops"] * row["num_models"] / row["step_time_median_s"] / 1e9
        assert row["gflops"] == pytest.approx(expected_gflops)
        assert row["grad_bytes_accessed"] > 0 and row["grad_temp_bytes"] >= 0
        assert row["nonfinite_loss"] is False  # the small learning rate keeps the runs finite


def test_mini_batch_calls_are_capped_at_one_epoch(sweep):
    rows, _ = sweep
    steps_per_epoch = N_IMAGES // MINI_BATCH
    for row in rows:
        if row["batch_size"] == MINI_BATCH and row["steps_per_call_requested"] == 10:
            assert row["steps_per_call"] <= steps_per_epoch
        if row["steps_per_call_requested"] == 1:
            assert row["steps_per_call"] == 1


def test_progress_is_called_after_every_row(sweep):
    rows, calls = sweep
    assert [c[0] for c in calls] == list(range(1, len(rows) + 1))
    assert {c[1] for c in calls} == {len(rows)}
    assert [c[2]["step_time_median_s"] for c in calls] == [r["step_time_median_s"] for r in rows]


def test_comparison_columns_are_filled_from_partner_rows(sweep):
    rows, _ = sweep
    for row in rows:
        same = {k: row[k] for k in ("batch_size", "steps_per_call_requested", "num_models")}
        manual, auto = by(rows, grad="manual", **same), by(rows, grad="autodiff", **same)
        assert row["manual_over_autodiff"] == pytest.approx(
            manual["step_time_median_s"] / auto["step_time_median_s"]
        )
        one = by(rows, grad=row["grad"], batch_size=row["batch_size"],
                 steps_per_call_requested=row["steps_per_call_requested"], num_models=1)
        assert row["speedup_vs_one_model"] == pytest.approx(row["examples_per_s"] / one["examples_per_s"])
        if row["num_models"] == 1:
            assert row["speedup_vs_one_model"] == 1.0


def test_comparison_columns_are_none_without_a_partner(sweep):
    rows, _ = sweep
    lonely = [dict(r) for r in rows if r["grad"] == "manual" and r["num_models"] == 2]
    bench.fill_comparisons(lonely)
    assert lonely and all(r["manual_over_autodiff"] is None for r in lonely)
    assert all(r["speedup_vs_one_model"] is None for r in lonely)


def test_timed_work_adapts_to_the_row_budget(data):
    config = sweep_config(bench_batch_sizes=(0,), bench_grads=("manual",), bench_steps_per_call=(50,),
                          bench_num_seeds=(1,), bench_repeats=3, bench_max_row_seconds=1e-9)
    (row,) = bench.run(config, data)
    assert row["steps_per_call_requested"] == 50
    assert row["steps_per_call"] == 1 and row["repeats"] == 1  # even one step blows the budget


def test_x64_on_an_explicit_platform(data):
    config = sweep_config(bench_layer_sizes=("784,5,10",), bench_batch_sizes=(64,), bench_grads=("autodiff",),
                          bench_steps_per_call=(3,), bench_num_seeds=(1,), bench_repeats=1, bench_platform="cpu",
                          x64=True)
    with jax.enable_x64(True):
        (row,) = bench.run(config, data)
    assert row["dtype"] == "float64" and row["platform"] == "cpu"
    assert row["steps_per_call"] == 3 and row["batch_size"] == 64
    assert row["manual_over_autodiff"] is None and row["speedup_vs_one_model"] == 1.0
    assert jnp.zeros(1).dtype == jnp.float32  # x64 is switched off again afterwards


def test_run_rejects_networks_that_do_not_fit_the_data(data):
    with pytest.raises(ValueError, match="must start with 784"):
        bench.run(sweep_config(bench_layer_sizes=("100,10",)), data)
    with pytest.raises(ValueError, match="dense:10"):
        bench.run(sweep_config(bench_layer_sizes=("conv3x3:2,maxpool2,dense:5",)), data)


def test_a_conv_network_gets_a_row_with_its_compiled_costs(data):
    config = sweep_config(bench_layer_sizes=("conv3x3:2,maxpool2,dense:10",), bench_batch_sizes=(8,),
                          bench_steps_per_call=(2,), bench_num_seeds=(1,), bench_repeats=1)
    rows = bench.run(config, data)
    assert [r["grad"] for r in rows] == ["manual", "autodiff"]
    assert all(r["network"] == "conv3x3:2,maxpool2,dense:10" and r["grad_flops"] > 0 for r in rows)
    assert rows[0]["manual_over_autodiff"] > 0


def test_grad_flops_match_a_hand_count_of_the_matmuls():
    """784-30-10 at batch 128: forward x@W1, a1@W2; backward dW1, dW2 and dA1 (no dX)."""
    zeros = data_lib.Dataset("random", "test",
                             data_lib.Split(np.zeros((N_IMAGES, 28, 28), np.uint8), np.zeros(N_IMAGES, np.int32)),
                             data_lib.Split(np.zeros((1, 28, 28), np.uint8), np.zeros(1, np.int32)))
    row = bench.row_config(SWEEP, bench.Group("784,30,10", 128, 1, 1), "manual", N_IMAGES)
    plan = bench.train.Plan.create(row, zeros)
    matmuls = 128 * (2 * 2 * (784 * 30 + 30 * 10) + 2 * 30 * 10)
    flops = bench.analyse_gradient(plan)["grad_flops"]
    assert matmuls <= flops <= 1.1 * matmuls


# ------------------------------------------------------------------------------ outputs


def test_format_table_has_a_line_per_row(sweep):
    rows, _ = sweep
    lines = bench.format_table(rows).splitlines()
    assert "examples/s" in lines[0] and "man/auto" in lines[0]
    body = lines[2:2 + len(rows)]
    assert len(body) == len(rows) and all("784,10,10" in line for line in body)
    assert len({len(line) for line in lines[:2 + len(rows)]}) == 1  # fixed width
    assert "10/10" in bench.format_table(rows)  # steps used / requested


def test_write_outputs_writes_csv_json_and_png(sweep, tmp_path):
    rows, _ = sweep
    figures_before = len(plt.get_fignums())
    paths = bench.write_outputs(rows, tmp_path / "out", SWEEP)
    assert set(paths) == {"csv", "json", "png"}

    with open(paths["csv"], newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == bench.ROW_KEYS
        table = list(reader)
    assert len(table) == len(rows)
    assert [float(r["step_time_median_s"]) for r in table] == pytest.approx([r["step_time_median_s"] for r in rows])
    assert {r["grad"] for r in table} == {"manual", "autodiff"}

    payload = json.loads(paths["json"].read_text())
    assert len(payload["rows"]) == len(rows)
    assert payload["rows"][0]["network"] == "784,10,10"
    assert payload["environment"]["jax_version"] == rows[0]["jax_version"]
    assert payload["config"]["bench_repeats"] == SWEEP.bench_repeats and payload["environment"]["cpu"]

    png = paths["png"].read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 1000
    assert len(plt.get_fignums()) == figures_before  # the figure was closed


def test_csv_writes_missing_comparisons_as_empty(sweep, tmp_path):
    rows, _ = sweep
    lonely = bench.fill_comparisons([dict(rows[0])])  # no autodiff partner; is its own K=1 row
    paths = bench.write_outputs(lonely, tmp_path)
    with open(paths["csv"], newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["manual_over_autodiff"] == ""
    assert row["speedup_vs_one_model"] == "1.0"


def test_environment_describes_the_machine():
    env = bench.report.environment()
    assert env["backend"] == "cpu" and env["device_kind"] and env["cpu"]
    assert env["cpu_count"] >= 1 and env["devices"] and env["versions"]["jax"]


# ------------------------------------------------------------------------------ sweeps and devices


def test_sweeps_make_k_models_three_ways():
    config = sweep_config(bench_num_seeds=(1, 4), bench_sweeps=("seeds", "shared_seeds", "learning_rates"))
    groups = bench.groups(config)
    # K = 1 is one group whatever the sweeps; K = 4 is one per sweep.
    assert sorted({(g.num_models, g.sweep) for g in groups}) == [(1, "seeds"), (4, "learning_rates"), (4, "seeds"),
                                                               (4, "shared_seeds")]
    assert bench.num_rows(config) == len(groups) * 2
    lrs = bench.row_config(config, bench.Group("784,10,10", 10, 4, 1, "learning_rates"), "manual", N_IMAGES)
    assert lrs.num_seeds == 1 and len(set(lrs.sweep_learning_rates)) == 4 and lrs.num_models == 4
    assert min(lrs.sweep_learning_rates) == pytest.approx(0.01 / 4)
    assert max(lrs.sweep_learning_rates) == pytest.approx(0.04)
    shared = bench.row_config(config, bench.Group("784,10,10", 10, 4, 1, "shared_seeds"), "manual", N_IMAGES)
    assert shared.num_seeds == 4 and shared.shared_data_order


def test_a_shared_batch_makes_the_first_layer_one_wide_matmul(data):
    """16 learning rates of 784-30-10 at batch 10: X (10 x 784) times all 16 W1 (784 x 16*30) is
    one product, and so is the weight gradient X^T dZ (784 x 16*30)."""
    config = Config(layer_sizes=(784, 30, 10), optimizer="sgd", batch_size=10, steps=2, num_devices=1,
                    sweep_learning_rates=tuple(0.01 * (i + 1) for i in range(16)))
    plan = train.Plan.create(config, data)
    assert plan.shared_data
    state = plan.init_state()
    images, labels = train.device_splits(data)["train"]
    hlo = train.compile_chunk(plan, state, images, labels, plan.permutation(0)).as_text()
    dots = (re.findall(r"= (f32\[[\d,]+\])\S* dot\(", hlo)
            + re.findall(r"= (f32\[[\d,]+\])\S* fusion\([^)]*\), kind=kCustom", hlo))
    assert "f32[10,480]" in dots and "f32[784,480]" in dots, dots
    unshared = train.Plan.create(dataclasses.replace(config, sweep_learning_rates=(), num_seeds=16), data)
    assert not unshared.shared_data


def test_allreduce_bytes_reads_every_all_reduce_of_the_hlo():
    hlo = """
  %all-reduce.1 = f32[784,30]{1,0} all-reduce(f32[784,30]{1,0} %x), channel_id=1, replica_groups={{0,1}}, to_apply=%add
  %ar = (f32[30]{0}, f32[30,10]{1,0}, f32[]) all-reduce(%a, %b, %c), channel_id=2, to_apply=%add
  %start = bf16[8]{0} all-reduce-start(bf16[8]{0} %y), to_apply=%add
  %not = f32[5]{0} add(f32[5]{0} %p, f32[5]{0} %q)
"""
    assert bench.allreduce_bytes(hlo) == 4 * (784 * 30 + 30 + 300 + 1) + 2 * 8
