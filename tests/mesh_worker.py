"""Runs in a subprocess with 8 fake CPU devices (JAX must be configured before its first
operation, which a pytest process has long passed): trains the same runs on different meshes
and prints one JSON object of measured differences for tests/test_parallel.py to judge.

    python tests/mesh_worker.py SCENARIO
"""

from __future__ import annotations

import dataclasses
import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402

from digits import data, parallel, train  # noqa: E402
from digits.config import Config  # noqa: E402

DENSE = dict(layer_sizes=(784, 16, 10), init="glorot", optimizer="sgd", learning_rate=0.1, batch_size=16, steps=100,
             eval_every=50)
CONV = dict(layers="conv3x3:4,maxpool2,dense:10", init="he", optimizer="momentum", learning_rate=0.05, batch_size=8,
            steps=20, eval_every=10)
# Batch norm's statistics come from the global batch: the forward's sums and the backward's two
# sums are all-reduced over the data axis, so D devices must equal one.
BATCHNORM = dict(CONV, learning_rate=0.01,
                 layers="conv3x3:4:same,batchnorm,relu,res(conv3x3:4:same,batchnorm,relu,conv3x3:4:same),maxpool2,dense:10")


def synthetic(n: int = 512, seed: int = 0) -> data.Dataset:
    """Random 28x28 uint8 images with labels that depend on them (so gradients are not noise)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n + 64, 28, 28), dtype=np.uint8)
    labels = (images[:, 10:18, 10:18].mean(axis=(1, 2)).astype(np.int64) * 10 // 256).astype(np.int32)
    split = lambda a, b: data.Split(images[a:b], labels[a:b])  # noqa: E731
    return data.Dataset("synthetic", "test", split(0, n), split(n, n + 32), validation=split(n + 32, n + 64))


def train_on(config: Config, dataset: data.Dataset, devices: int, with_state: bool = False):
    """Final params (host numpy; with_state: (params, model state)) and the plan's layout after
    training on `devices` devices."""
    plan = train.Plan.create(config, dataset, jax.devices()[:devices])
    result = train.fit(plan, plan.init_state(), train.device_splits(dataset, plan.layout))
    found = (result.state.params, result.state.model_state) if with_state else result.state.params
    return jax.tree.map(np.asarray, found), plan.layout


def max_difference(a, b) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def largest(tree) -> float:
    return max(float(np.max(np.abs(x))) for x in jax.tree.leaves(tree))


def gradient_on(grad: str, dataset: data.Dataset, devices: int):
    """(loss, grads) of one batch of 16, its slices' gradients all-reduced over `devices`."""
    import jax.numpy as jnp

    from digits import model

    plan = train.Plan.create(Config(**DENSE, grad=grad, num_devices=devices), dataset, jax.devices()[:devices])
    params = model.init(jax.random.PRNGKey(0), plan.spec, plan.dtype)
    batch = (model.inputs(jnp.asarray(dataset.train.images[:16]), plan.spec), jnp.asarray(dataset.train.labels[:16]))
    return jax.tree.map(np.asarray, jax.jit(train.plan_value_and_grad(plan))(params, batch, None))


def data_parallel() -> dict:
    """D in {1, 2, 4, 8} data-parallel, manual and autodiff; a conv net and full batch too."""
    dataset, out = synthetic(), {}
    for grad in ("manual", "autodiff"):
        reference = gradient_on(grad, dataset, 1)
        out[f"gradient_{grad}_scale"] = largest(reference)
        out[f"gradient_{grad}_D4"] = max_difference(gradient_on(grad, dataset, 4), reference)
    for grad in ("manual", "autodiff"):
        config = Config(**DENSE, grad=grad, num_devices=1)
        reference, _ = train_on(config, dataset, 1)
        out[f"scale_{grad}"] = largest(reference)
        for d in (2, 4, 8):
            params, layout = train_on(Config(**DENSE, grad=grad, num_devices=d), dataset, 8)
            out[f"dense_{grad}_D{d}"] = {"diff": max_difference(params, reference),
                                         "mesh": [layout.model_size, layout.data_size]}
    conv_reference, _ = train_on(Config(**CONV, num_devices=1), dataset, 1)
    params, layout = train_on(Config(**CONV, num_devices=4), dataset, 8)
    out["conv_D4"] = {"diff": max_difference(params, conv_reference), "mesh": [layout.model_size, layout.data_size]}
    for grad in ("manual", "autodiff"):
        bn_reference, _ = train_on(Config(**BATCHNORM, grad=grad, num_devices=1), dataset, 1, with_state=True)
        found, layout = train_on(Config(**BATCHNORM, grad=grad, num_devices=4), dataset, 8, with_state=True)
        out[f"batchnorm_{grad}_D4"] = {"diff": max_difference(found, bn_reference), "scale": largest(bn_reference[1]),
                                       "mesh": [layout.model_size, layout.data_size]}
    full = dict(DENSE, optimizer="gd", batch_size=0, steps=20)
    full_reference, _ = train_on(Config(**full, num_devices=1), dataset, 1)
    params, layout = train_on(Config(**full, num_devices=8), dataset, 8)
    out["full_batch_D8"] = {"diff": max_difference(params, full_reference),
                            "mesh": [layout.model_size, layout.data_size]}
    return out


def models() -> dict:
    """K = 8 seeds on 8 devices vs the unsharded vmapped run; a shared-data sweep on 2 x 4."""
    dataset, out = synthetic(), {}
    seeds = Config(**DENSE, num_seeds=8)
    reference, _ = train_on(dataclasses.replace(seeds, num_devices=1), dataset, 1)
    params, layout = train_on(seeds, dataset, 8)
    out["seeds_K8_D8"] = {"diff": max_difference(params, reference), "mesh": [layout.model_size, layout.data_size]}
    bn_seeds = Config(**BATCHNORM, num_seeds=2)
    reference, _ = train_on(dataclasses.replace(bn_seeds, num_devices=1), dataset, 1, with_state=True)
    found, layout = train_on(bn_seeds, dataset, 8, with_state=True)
    out["batchnorm_K2_D8"] = {"diff": max_difference(found, reference), "mesh": [layout.model_size, layout.data_size]}
    sweep = Config(**DENSE, num_seeds=2, shared_data_order=True, sweep_learning_rates=(0.05, 0.1))
    reference, _ = train_on(dataclasses.replace(sweep, num_devices=1), dataset, 1)
    params, layout = train_on(sweep, dataset, 8)
    out["shared_K4_D8"] = {"diff": max_difference(params, reference), "mesh": [layout.model_size, layout.data_size]}
    # Shared data: seeds differ only in their initialisation, so lane 0 and 1 of one learning
    # rate see the same batches; run alone, seed 1 would see another order.
    out["shared_first_layers_differ"] = bool(np.any(reference[0]["w"][0] != reference[0]["w"][1]))
    # Many short chunks, each with collectives: the loop waits on each chunk, so XLA:CPU never
    # has dozens of collective-carrying calls queued (which deadlocks).
    params, layout = train_on(Config(**DENSE, steps_per_call=1, num_devices=8), dataset, 8)
    one_device = train_on(Config(**DENSE, num_devices=1), dataset, 1)[0]
    out["one_step_chunks_D8"] = {"diff": max_difference(params, one_device),
                                 "mesh": [layout.model_size, layout.data_size]}
    return out


def errors() -> dict:
    """The one-line messages of impossible meshes."""
    out = {}
    cases = {"too_many": (1, 16, 9), "batch_not_divisible": (1, 10, 4), "more_devices_than_examples": (1, 2, 8)}
    for name, args in cases.items():
        try:
            parallel.choose_layout(*args)
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    out["auto_batch_10_on_8"] = parallel.choose_layout(1, 10).to_dict()
    out["auto_K4_on_8"] = parallel.choose_layout(4, 10).to_dict()
    return out


if __name__ == "__main__":
    print(json.dumps({"data_parallel": data_parallel, "models": models, "errors": errors}[sys.argv[1]]()))
