"""Training: the state, the jit-compiled multi-step update, and evaluation.

A run is a sequence of compiled chunks. Each chunk runs many update steps inside one XLA while
loop (`lax.fori_loop` with a traced trip count, so chunks of any length share one compilation),
gathering mini-batches on the device from a per-epoch permutation of uint8 images. Control
returns to Python only to log, evaluate and checkpoint.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from digits import backprop, losses, model
from digits.config import Config

TRAIN_ACCURACY_EXAMPLES = 10000  # train accuracy is measured on this fixed prefix, to bound its cost


class TrainState(NamedTuple):
    """params: the MLP pytree; step: int32 (); learning_rate: float (); data_key: uint32 (2,)."""

    params: list
    opt_state: optax.OptState
    step: jax.Array
    learning_rate: jax.Array
    data_key: jax.Array


class ChunkStats(NamedTuple):
    """What a chunk reports back: loss sum, first non-finite step (-1 if none), audit results."""

    loss_sum: jax.Array
    first_bad_step: jax.Array
    audit_count: jax.Array
    audit_max_rel_error: jax.Array
    audit_max_abs_error: jax.Array


def lr_multiplier(config: Config, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
    """The schedule's shape in [0, 1]; the base learning rate lives in the state (so it can be vmapped)."""
    if config.schedule == "constant":
        return optax.constant_schedule(1.0)
    if config.schedule == "cosine":
        return optax.cosine_decay_schedule(1.0, max(total_steps, 1))
    if config.schedule == "exponential":
        return optax.exponential_decay(1.0, config.decay_steps or steps_per_epoch, config.decay_rate)
    return optax.warmup_cosine_decay_schedule(0.0, 1.0, config.warmup_steps, max(total_steps, config.warmup_steps + 1))


def make_optimizer(config: Config, total_steps: int, steps_per_epoch: int) -> optax.GradientTransformation:
    """An optax transformation whose updates, times -learning_rate, are the optimizer's step.

    Equal to optax.sgd / optax.adam / optax.adamw with the same hyperparameters, with the
    learning rate pulled out so K models with K learning rates can share one vmapped program.
    """
    direction = {
        "gd": optax.identity,
        "sgd": optax.identity,
        "momentum": lambda: optax.trace(decay=config.momentum),
        "nesterov": lambda: optax.trace(decay=config.momentum, nesterov=True),
        "adam": optax.scale_by_adam,
        "adamw": lambda: optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(config.weight_decay)),
    }[config.optimizer]()
    return optax.chain(direction, optax.scale_by_schedule(lr_multiplier(config, total_steps, steps_per_epoch)))


def init_state(seed: int, learning_rate: float, spec: model.MLPSpec, tx: optax.GradientTransformation, dtype) -> TrainState:
    """A fresh state; init and data order both derive from `seed`."""
    init_key, data_key = jax.random.split(jax.random.PRNGKey(seed))
    params = model.init(init_key, spec, dtype)
    return TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), jnp.asarray(learning_rate, dtype), data_key)


def init_states(config: Config, spec: model.MLPSpec, tx, dtype) -> TrainState:
    """K = num_seeds x len(learning_rates) states stacked on a leading axis; lane i = (seed + s, lr)."""
    lanes = [init_state(config.seed + s, lr, spec, tx, dtype) for lr in config.learning_rates for s in range(config.num_seeds)]
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *lanes)


def init_run_state(config: Config, spec: model.MLPSpec, tx, dtype) -> TrainState:
    """One state, or K stacked ones when the config trains several models at once."""
    if config.num_models > 1:
        return init_states(config, spec, tx, dtype)
    return init_state(config.seed, config.learning_rate, spec, tx, dtype)


def permutations(state: TrainState, epoch: int, num_examples: int, vmapped: bool) -> jax.Array:
    """This epoch's data order: int32 (N,), or (K, N) for K stacked models."""
    if vmapped:
        return jax.vmap(epoch_permutation, in_axes=(0, None, None))(state.data_key, epoch, num_examples)
    return epoch_permutation(state.data_key, epoch, num_examples)


@functools.partial(jax.jit, static_argnums=(2,))
def epoch_permutation(data_key: jax.Array, epoch: jax.Array, num_examples: int) -> jax.Array:
    """The data order of one epoch: int32 (num_examples,), a pure function of (key, epoch)."""
    return jax.random.permutation(jax.random.fold_in(data_key, epoch), num_examples).astype(jnp.int32)


def grad_function(grad: str):
    """manual (and both, which trains on manual) -> backprop; autodiff -> jax.value_and_grad."""
    return losses.autodiff_value_and_grad if grad == "autodiff" else backprop.value_and_grad


def grad_disagreement(manual, auto) -> tuple[jax.Array, jax.Array]:
    """Relative error ||m - a|| / ||a|| over the whole tree, and the max absolute error."""
    diff = jax.tree.map(lambda m, a: m - a, manual, auto)
    scale = optax.tree.norm(auto)
    rel = optax.tree.norm(diff) / jnp.maximum(scale, jnp.finfo(scale.dtype).tiny)
    max_abs = jnp.max(jnp.stack([jnp.max(jnp.abs(d)) for d in jax.tree.leaves(diff)]))
    return rel, max_abs


def make_train_chunk(spec: model.MLPSpec, tx, grad: str, batch_size: int, steps_per_epoch: int,
                     full_batch: bool, audit_every: int, dtype):
    """Returns chunk(state, images, labels, perm, num_steps) -> (state, ChunkStats), not yet jitted.

    images: uint8 (N, 28, 28) on the device; labels: int32 (N,); perm: int32 (N,) this epoch's
    order (ignored for full batch); num_steps: int32 (), may be traced. A chunk must not cross an
    epoch boundary (the caller passes a new perm at each epoch).
    """
    value_and_grad = grad_function(grad)
    audit = grad == "both" and audit_every > 0

    def batch_at(state, images, labels, perm):
        """The step's batch: (x float (B, 784) in [0, 1], labels int32 (B,))."""
        if full_batch:
            return images, labels  # already scaled once per chunk, see below
        start = (state.step % steps_per_epoch) * batch_size
        idx = jax.lax.dynamic_slice_in_dim(perm, start, batch_size)
        return model.scale_images(images[idx], dtype), labels[idx]

    def audit_step(state, batch, grads, stats):
        def compare(_):
            return grad_disagreement(grads, losses.autodiff_value_and_grad(state.params, batch, spec)[1])

        due = state.step % audit_every == 0
        zero = jnp.zeros((), dtype)
        rel, max_abs = jax.lax.cond(due, compare, lambda _: (zero, zero), None)
        return stats._replace(
            audit_count=stats.audit_count + due,
            audit_max_rel_error=jnp.maximum(stats.audit_max_rel_error, rel),
            audit_max_abs_error=jnp.maximum(stats.audit_max_abs_error, max_abs),
        )

    def chunk(state, images, labels, perm, num_steps):
        def body(_, carry):
            state, stats = carry
            batch = batch_at(state, images, labels, perm)
            loss, grads = value_and_grad(state.params, batch, spec)
            if audit:
                stats = audit_step(state, batch, grads, stats)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = jax.tree.map(lambda p, u: p - state.learning_rate * u, state.params, updates)
            bad = (stats.first_bad_step < 0) & ~jnp.isfinite(loss)
            stats = stats._replace(
                loss_sum=stats.loss_sum + loss, first_bad_step=jnp.where(bad, state.step, stats.first_bad_step)
            )
            return TrainState(params, opt_state, state.step + 1, state.learning_rate, state.data_key), stats

        if full_batch:  # every step reads the whole set: convert it once per chunk, not per step
            images = model.scale_images(images, dtype)
        zero = jnp.zeros((), dtype)
        stats = ChunkStats(zero, jnp.asarray(-1, jnp.int32), jnp.zeros((), jnp.int32), zero, zero)
        return jax.lax.fori_loop(0, num_steps, body, (state, stats))

    return chunk


def compile_chunk(chunk_fn, state, images, labels, perm, vmapped: bool):
    """AOT-compiles a chunk (donating the state) so compile time is measured apart from step time."""
    fn = jax.vmap(chunk_fn, in_axes=(0, None, None, 0, None)) if vmapped else chunk_fn
    jitted = jax.jit(fn, donate_argnums=0)
    return jitted.lower(state, images, labels, perm, jnp.int32(1)).compile()


def make_evaluate(spec: model.MLPSpec, dtype, eval_batch: int = 10000):
    """Returns evaluate(params, images, labels) -> (mean cost, accuracy, predictions int32 (N,)).

    Runs in fixed-size padded chunks (one compilation for every split). Works on one model;
    `jax.vmap` it over stacked params for K models.
    """

    def chunk_outputs(params, images, labels):
        z = model.logits(params, model.scale_images(images, dtype), spec)
        y = losses.one_hot(labels, spec.layer_sizes[-1], z.dtype)
        per_example_cost = jax.vmap(lambda zi, yi: losses.cost_from_logits(zi[None], yi[None], spec))(z, y)
        return per_example_cost, jnp.argmax(z, axis=-1).astype(jnp.int32)

    def evaluate(params, images, labels):
        n = images.shape[0]
        size = min(eval_batch, n)
        pad = (-n) % size
        images = jnp.concatenate([images, jnp.zeros((pad,) + images.shape[1:], images.dtype)])
        labels = jnp.concatenate([labels, jnp.zeros((pad,), labels.dtype)])
        shape = (-1, size)
        costs, preds = jax.lax.map(
            lambda c: chunk_outputs(params, *c),
            (images.reshape(shape + images.shape[1:]), labels.reshape(shape)),
        )
        costs, preds = costs.reshape(-1)[:n], preds.reshape(-1)[:n]
        return jnp.mean(costs), jnp.mean(preds == labels[:n]), preds

    return evaluate


def steps_per_epoch(train_size: int, batch_size: int) -> int:
    """Full batch (0 or n) is one step per epoch; otherwise the remainder is dropped."""
    if not 0 <= batch_size <= train_size:
        raise ValueError(f"batch_size={batch_size} must be in [0, {train_size}] (0: full batch)")
    return 1 if batch_size in (0, train_size) else train_size // batch_size


def total_steps(config: Config, train_size: int) -> int:
    return config.epochs * steps_per_epoch(train_size, config.batch_size) if config.epochs else config.steps


def flops_per_example(layer_sizes) -> int:
    """Matmul FLOPs of forward + backward for one example (2 per multiply-add).

    Forward: each layer's x @ W. Backward: dW = A^T dZ for each layer and dA = dZ W^T for every
    layer but the first (no gradient w.r.t. the input is needed).
    """
    products = [n_in * n_out for n_in, n_out in zip(layer_sizes[:-1], layer_sizes[1:])]
    return 2 * (2 * sum(products) + sum(products[1:]))
