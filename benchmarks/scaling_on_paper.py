"""Data parallelism on paper: for each network, the bytes one step all-reduces and the FLOPs it
computes, both read from the compiled programs, and from them a predicted step time on an
8-GPU node and an 8-chip TPU host, under the stated assumptions (ASSUMED below).

    python benchmarks/scaling_on_paper.py            # prints the README's markdown table

Model of one data-parallel step on D devices with a global batch of B examples:

    compute(B, D)   = max(FLOPs per example * B / D / flop_rate, step_floor)
    all-reduce(D)   = latency + 2 (D - 1) / D * bytes / bus_bandwidth      (ring all-reduce)
    step(B, D)      = compute(B, D) + all-reduce(D)                        (no overlap)

Data parallelism pays (step(B, D) < step(B, 1)) above the batch size where the compute saved,
compute(B, 1) - compute(B, D), exceeds the all-reduce; the table gives that batch size.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from digits import bench, data, train  # noqa: E402
from digits.config import Config  # noqa: E402

NETWORKS = ("784,30,10", "784,100,10", "784,800,800,10", "conv5x5:20,maxpool2,conv5x5:40,maxpool2,dense:100,dense:10",
            "conv5x5:20,maxpool2,conv5x5:40,maxpool2,dense:1000,dense:1000,dense:10")
DEVICES = 8
BATCH = 128  # FLOPs per example are read at this batch (they are linear in it)

# Assumptions (per device), float32. Step floors: the per-step cost of a tiny compiled step
# (kernel launches inside the on-device loop), which no amount of parallelism removes.
ASSUMED = {
    "8x H100 SXM (NVLink/NVSwitch)": dict(flop_rate=50e12, bus_bandwidth=350e9, latency=15e-6, step_floor=40e-6),
    "8-chip TPU v5e host (ICI)": dict(flop_rate=40e12, bus_bandwidth=90e9, latency=10e-6, step_floor=20e-6),
}


def measured(network: str) -> dict:
    """FLOPs per example and all-reduce bytes per step, from the compiled programs."""
    images = np.zeros((1024, 28, 28), np.uint8)
    labels = np.zeros((1024,), np.int32)
    dataset = data.Dataset("mnist", "zeros", data.Split(images, labels), data.Split(images[:8], labels[:8]))
    config = bench.network_config(Config(optimizer="sgd", batch_size=BATCH, num_devices=DEVICES), network)
    plan = train.Plan.create(config, dataset)
    analysis = bench.analyse_gradient(plan)
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(plan.init_state(placed=False).params))
    return {"params": params, "flops_per_example": analysis["grad_flops"] / BATCH,
            "allreduce_bytes": analysis["allreduce_bytes"]}


def predict(found: dict, machine: dict, batch: int, devices: int) -> float:
    compute = max(found["flops_per_example"] * batch / devices / machine["flop_rate"], machine["step_floor"])
    if devices == 1:
        return compute
    ring = 2 * (devices - 1) / devices * found["allreduce_bytes"] / machine["bus_bandwidth"]
    return compute + machine["latency"] + ring


def break_even_batch(found: dict, machine: dict, devices: int) -> int:
    """The smallest power-of-two batch at which D devices beat one."""
    batch = 1
    while predict(found, machine, batch, devices) >= predict(found, machine, batch, 1) and batch < 2**24:
        batch *= 2
    return batch


def table() -> str:
    lines = ["| network | params | all-reduce / step | FLOPs / example | machine | B=128: 1 dev | 8 dev | "
             "B=8192: 1 dev | 8 dev | DP pays from B = |", "|---" * 10 + "|"]
    for network in NETWORKS:
        found = measured(network)
        for name, machine in ASSUMED.items():
            times = [predict(found, machine, b, d) * 1e6 for b in (128, 8192) for d in (1, DEVICES)]
            lines.append(
                f"| {network} | {found['params']:,} | {found['allreduce_bytes'] / 1e6:.3g} MB | "
                f"{found['flops_per_example'] / 1e6:.3g} M | {name} | "
                + " | ".join(f"{t:,.0f} us" for t in times) + f" | {break_even_batch(found, machine, DEVICES):,} |")
    assumed = "; ".join(f"{name}: {m['flop_rate'] / 1e12:g} TFLOP/s float32 per device, all-reduce bus bandwidth "
                        f"{m['bus_bandwidth'] / 1e9:g} GB/s, latency {m['latency'] * 1e6:g} us, step floor "
                        f"{m['step_floor'] * 1e6:g} us" for name, m in ASSUMED.items())
    return "\n".join(lines) + f"\n\nAssumed: {assumed}."


if __name__ == "__main__":
    print(table())
