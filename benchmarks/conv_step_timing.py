"""Time 100 SGD steps inside one jitted lax.fori_loop: hand-derived backprop vs jax.grad.

    .venv/bin/python benchmarks/conv_step_timing.py [--batch_sizes=10,128] [--layers=...]

Nielsen's two-conv network (chapter 6) on random 28x28 uint8 images, a new batch each step;
prints ms per step (the best of --repeats timed calls, compilation excluded). For reference,
PyTorch on this machine's CPU: 3.05 ms at batch 10 and 22.8 ms at batch 128. The machine is
shared: compare manual with autodiff within one run (they are timed in turns), not across runs.
"""

import argparse
import time

import jax
import jax.numpy as jnp

from digits import backprop, model

NIELSEN = "conv5x5:20,maxpool2,conv5x5:40,maxpool2,dense:100,dense:10"


def make_loop(spec, value_and_grad, steps: int, batch_size: int, learning_rate: float = 0.03):
    """A jitted (params, images uint8 (steps*B, 28, 28), labels) -> params after `steps` SGD steps,
    step i on examples [i*B, (i+1)*B): a new batch each step, scaled inside the loop, as in training
    (a fixed batch would let XLA hoist the first layer's work out of the loop)."""
    def step(i, carry):
        params, images, labels = carry
        start = i * batch_size
        x = model.inputs(jax.lax.dynamic_slice_in_dim(images, start, batch_size), spec)
        _, grads = value_and_grad(params, (x, jax.lax.dynamic_slice_in_dim(labels, start, batch_size)), spec)
        params = jax.tree.map(lambda p, g: p - learning_rate * g, params, grads)
        return params, images, labels

    return jax.jit(lambda params, images, labels: jax.lax.fori_loop(0, steps, step, (params, images, labels))[0])


def time_ms_per_step(loops: dict, args, steps: int, repeats: int) -> dict:
    """The best of `repeats` timed calls of each loop, taken in turns so that load from other
    processes on the machine falls on all of them alike; compilation excluded."""
    for loop in loops.values():
        jax.block_until_ready(loop(*args))  # compile and warm up
    best = dict.fromkeys(loops, float("inf"))
    for _ in range(repeats):
        for name, loop in loops.items():
            start = time.perf_counter()
            jax.block_until_ready(loop(*args))
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: 1000 * seconds / steps for name, seconds in best.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default=NIELSEN)
    parser.add_argument("--batch_sizes", default="10,128")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    spec = model.spec_from_text(args.layers, (28, 28, 1), activation="relu", init="he")
    params = model.init(jax.random.PRNGKey(0), spec)
    print(f"{args.layers} on {jax.devices()[0].platform}, jax {jax.__version__}")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        n = args.steps * batch
        images = jax.random.randint(jax.random.PRNGKey(1), (n, 28, 28), 0, 256).astype(jnp.uint8)
        labels = jax.random.randint(jax.random.PRNGKey(2), (n,), 0, 10)
        loops = {name: make_loop(spec, fn, args.steps, batch) for name, fn in
                 (("manual", backprop.value_and_grad), ("autodiff", backprop.autodiff_value_and_grad))}
        for name, ms in time_ms_per_step(loops, (params, images, labels), args.steps, args.repeats).items():
            print(f"batch {batch:4d}  {name:8s}  {ms:7.2f} ms/step", flush=True)


if __name__ == "__main__":
    main()
