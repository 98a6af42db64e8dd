"""Evaluation time of 10,000 validation images by memory budget (the batch size it gives), for
the nets of docs/training.md ("Smaller batches on CPU"): best of 3 runs, the budgets interleaved
so that a busy machine slows them alike.

    python benchmarks/eval_batches.py              # the four nets of the table
    python benchmarks/eval_batches.py "conv3x3:8,maxpool2,dense:10"
    python benchmarks/eval_batches.py --models=3   # 3 models vmapped, as --num_seeds=3 evaluates them
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp

from digits import experiment, model, train
from digits.config import Config

NETS = (
    "conv5x5:24,maxpool2,conv3x3:32,maxpool2,dense:256,dense:10",
    "conv5x5:32,maxpool2,conv3x3:64,maxpool2,dense:256,dense:10",
    "conv3x3:32:same,batchnorm,relu,res(conv3x3:32:same,batchnorm,relu,conv3x3:32:same),maxpool2,dense:10",
    "dense:800,dense:800,dense:10",
)
BUDGETS_MIB = (4, 8, 16, 64)


def seconds_by_budget(layers: str, models: int = 1, repeats: int = 3) -> dict[int, tuple[int, float]]:
    """{budget in MiB: (batch size, best seconds to evaluate the 10,000 validation images)}, for
    `models` models vmapped (copies of one: the time does not depend on the values)."""
    config = Config(layers=layers, init="he", optimizer="sgd", batch_size=128, epochs=1)
    dataset = experiment.load_dataset(config)
    plan = experiment.make_plan(config, dataset)
    state = plan.init_state()
    images, labels = jnp.asarray(dataset.validation.images), jnp.asarray(dataset.validation.labels)
    params, model_state = state.params, model.eval_state(plan.spec, state.model_state if plan.spec.stateful else None)
    batches = {mib: train.eval_batch_size(plan.spec, plan.dtype, models, mib * 2**20) for mib in BUDGETS_MIB}

    def evaluate(batch: int):
        fn = train.make_evaluate(plan.spec, plan.dtype, batch)
        return jax.jit(fn if models == 1 else jax.vmap(fn, in_axes=(0, None, None, 0)))

    if models > 1:
        params, model_state = jax.tree.map(lambda a: jnp.stack([a] * models), (params, model_state))
    compiled = {b: evaluate(b) for b in set(batches.values())}
    for fn in compiled.values():  # compile, and warm up
        jax.block_until_ready(fn(params, images, labels, model_state))
    best = {b: float("inf") for b in compiled}
    for _ in range(repeats):
        for b, fn in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(params, images, labels, model_state))
            best[b] = min(best[b], time.perf_counter() - start)
    return {mib: (b, best[b]) for mib, b in batches.items()}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("nets", nargs="*", help="--layers stacks (default: the four of the table)")
    parser.add_argument("--models", type=int, default=1, help="models vmapped, as --num_seeds evaluates them")
    args = parser.parse_args(argv)
    for layers in args.nets or NETS:
        found = seconds_by_budget(layers, args.models)
        print(layers + ": " + ", ".join(f"{mib} MiB {s:.2f} s ({b})" for mib, (b, s) in found.items()), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
