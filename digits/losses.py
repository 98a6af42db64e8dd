"""Costs (per example, averaged over the batch) and the L2 penalty.

All costs are computed from the output pre-activations z_L for numerical stability, so the
manual backward pass and `jax.grad` see exactly the same loss value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from digits import model


def one_hot(labels: jax.Array, num_classes: int, dtype) -> jax.Array:
    """labels: int (B,) -> (B, num_classes)."""
    return jax.nn.one_hot(labels, num_classes, dtype=dtype)


def targets(labels: jax.Array, spec: model.ModelSpec, dtype) -> jax.Array:
    """The training targets: labels int (B,) -> (1 - s) one_hot + s / C, (B, C), with s the spec's
    label smoothing. Each row still sums to 1, which the output delta A - Y relies on."""
    y = one_hot(labels, spec.num_classes, dtype)
    s = spec.label_smoothing
    return (1 - s) * y + s / spec.num_classes if s else y


def cost_from_logits(z: jax.Array, y: jax.Array, spec: model.ModelSpec) -> jax.Array:
    """Mean cost over the batch. z: (B, C) output pre-activations, y: (B, C) targets (one-hot, or
    smoothed by `targets`)."""
    if spec.cost == "quadratic":  # Nielsen's network.py: 0.5 * ||a - y||^2
        per_example = 0.5 * jnp.sum((model.activate(z, spec.output) - y) ** 2, axis=-1)
    elif spec.output == "softmax":  # -sum y log softmax(z)
        per_example = -jnp.sum(y * jax.nn.log_softmax(z, axis=-1), axis=-1)
    else:  # sigmoid outputs: -sum [y log a + (1 - y) log(1 - a)] = sum softplus(z) - y z
        per_example = jnp.sum(jax.nn.softplus(z) - y * z, axis=-1)
    return jnp.mean(per_example)


def is_weight(path) -> bool:
    """Whether a params leaf is a weight "w" (dense, conv, a shortcut's projection): L2 covers
    those, never biases or normalization scales, as in Nielsen's network2."""
    return bool(path) and getattr(path[-1], "key", None) == "w"


def l2_penalty(params, l2: float) -> jax.Array:
    """0.5 * l2 * sum of squared weights "w" of every layer, nested blocks included."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return 0.5 * l2 * sum(jnp.sum(leaf ** 2) for path, leaf in leaves if is_weight(path))


def add_l2_gradient(grads, params, l2: float):
    """grads + l2 * w on every weight leaf (the gradient of `l2_penalty`)."""
    return jax.tree_util.tree_map_with_path(lambda path, g, p: g + l2 * p if is_weight(path) else g, grads, params)


def loss(params, batch: tuple[jax.Array, jax.Array], spec: model.ModelSpec, dropout_key=None, state=None):
    """batch: (x float (B, *input_shape), labels int (B,)) -> scalar loss; the function jax.grad
    sees (`backprop.autodiff_value_and_grad`). Training mode: batch statistics, dropout iff
    dropout_key is given. With the model `state`, returns (loss, the state after this step)."""
    x, labels = batch
    fwd = model.forward(params, x, spec, dropout_key)
    value = cost_from_logits(fwd.logits, targets(labels, spec, fwd.logits.dtype), spec)
    if spec.l2:
        value = value + l2_penalty(params, spec.l2)
    return value if state is None else (value, model.next_state(spec, state, fwd))
