"""Hand-derived gradients: backpropagation written out as the equations.

For a batch of B examples, with a_0 = x, z_l = a_{l-1} W_l + b_l and a_l = f(z_l):

    dZ_L     = dC/dz_L                      (A - Y for cross-entropy with a matched output)
    dW_l     = A_{l-1}^T dZ_l + l2 W_l
    db_l     = sum_over_batch(dZ_l)
    dZ_{l-1} = (dZ_l W_l^T) * f'(z_{l-1})

No `jax.grad`, `jax.vjp` or `jax.jvp` here: `tests/test_backprop.py` checks the result against them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from digits import losses, model


def activation_derivative(a: jax.Array, name: str) -> jax.Array:
    """f'(z) written in terms of a = f(z), which the forward pass already holds."""
    if name == "relu":
        return (a > 0).astype(a.dtype)
    if name == "sigmoid":
        return a * (1 - a)
    if name == "tanh":
        return 1 - a * a
    raise ValueError(f"unknown hidden activation {name!r}")


def output_delta(z: jax.Array, y: jax.Array, spec: model.MLPSpec) -> jax.Array:
    """dC/dz_L for one example per row (not yet divided by B). z, y: (B, C) -> (B, C)."""
    a = model.activate(z, spec.output)
    if spec.cost == "cross_entropy":
        # Softmax + categorical CE and sigmoid + binary CE both collapse to A - Y.
        return a - y
    g = a - y  # dC/da for the quadratic cost 0.5 ||a - y||^2
    if spec.output == "sigmoid":
        return g * a * (1 - a)
    # Softmax Jacobian J = diag(a) - a a^T, applied row by row: J^T g = a * (g - <g, a>).
    return a * (g - jnp.sum(g * a, axis=-1, keepdims=True))


def value_and_grad(params, batch: tuple[jax.Array, jax.Array], spec: model.MLPSpec):
    """Same contract as `jax.value_and_grad(losses.loss)(params, batch, spec)`.

    params: [{"w": (n_in, n_out), "b": (n_out,)}]; batch: (x (B, 784) float, labels (B,) int).
    Returns (scalar loss, grads with the tree structure, shapes and dtypes of params).
    """
    x, labels = batch
    hidden, z = model.forward(params, x, spec)
    y = losses.one_hot(labels, spec.layer_sizes[-1], z.dtype)
    loss = losses.cost_from_logits(z, y, spec)
    if spec.l2:
        loss = loss + losses.l2_penalty(params, spec.l2)

    inputs = [x] + hidden  # a_{l-1} for every layer l
    delta = output_delta(z, y, spec) / x.shape[0]  # the batch mean's 1/B enters once, here
    grads = [None] * len(params)
    for l in reversed(range(len(params))):
        dw = inputs[l].T @ delta
        if spec.l2:
            dw = dw + spec.l2 * params[l]["w"]
        grads[l] = {"w": dw, "b": jnp.sum(delta, axis=0)}
        if l > 0:  # the input layer needs no dX: skipping it is work autodiff also skips
            delta = (delta @ params[l]["w"].T) * activation_derivative(hidden[l - 1], spec.activation)
    return loss, grads
