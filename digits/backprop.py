"""Hand-derived gradients: backpropagation written out as the equations.

For a batch of B examples, with a_0 = x, z_l = layer_l(a_{l-1}) and a_l = f(z_l) after conv and
dense layers (a_l = z_l after pool and dropout, and for the last layer, whose z_L are the logits):

    dZ_L     = dC/dz_L                      (A - Y for cross-entropy with a matched output)
    dense    dW_l = A_{l-1}^T dZ_l + l2 W_l,  db_l = sum_over_batch(dZ_l),  dA_{l-1} = dZ_l W_l^T
    conv     dW_l = A_{l-1} (*) dZ_l + l2 W_l (a conv over the batch, dZ_l dilated by the stride),
             db_l = sum_over_batch_and_pixels(dZ_l),
             dA_{l-1} = dZ_l (*) flip(W_l)^T  (a full conv of the dilated dZ_l)
    maxpool  dA_{l-1} = dZ_l at each window's first maximum (row-major), 0 elsewhere
    avgpool  dA_{l-1} = dZ_l / P^2 over each window, 0 on the dropped remainder
    dropout  dA_{l-1} = dZ_l * keep / (1 - R), with the forward pass's mask
    norm     dA_{l-1} = gamma / (N sigma) (N dZ_l - sum dZ_l - xhat sum(dZ_l xhat))  (batch / layer)
    res      dA_{l-1} = dA_body + dA_shortcut  (the two paths meet again at the input)
    dZ_{l-1} = dA_{l-1} * f'(z_{l-1})       (an activation, implicit or a layer of its own)

Each layer's equations live beside its forward pass in `digits.layers`; the reverse walk over
the stack is `digits.layers.stack.backward`, which residual blocks reuse for their bodies. No `jax.grad`,
`jax.vjp` or `jax.jvp` on this path: `tests/test_backprop.py` checks the result against
`autodiff_value_and_grad`, the reference kept here beside it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from digits import layers, losses, model
from digits.layers import stack


def output_delta(z: jax.Array, y: jax.Array, spec: model.ModelSpec) -> jax.Array:
    """dC/dz_L for one example per row (not yet divided by B). z, y: (B, C) -> (B, C); y are the
    targets, one-hot or label-smoothed (`losses.targets`)."""
    a = model.activate(z, spec.output)
    if spec.cost == "cross_entropy":
        # Softmax + categorical CE: dC/dz = A sum(Y) - Y, which is A - Y for targets that sum to 1
        # (one-hot and smoothed alike). Sigmoid + binary CE: A - Y per unit, for any Y in [0, 1].
        return a - y
    g = a - y  # dC/da for the quadratic cost 0.5 ||a - y||^2 (any targets)
    if spec.output == "sigmoid":
        return g * a * (1 - a)
    # Softmax Jacobian J = diag(a) - a a^T, applied row by row: J^T g = a * (g - <g, a>).
    return a * (g - jnp.sum(g * a, axis=-1, keepdims=True))


def value_and_grad(params, batch: tuple[jax.Array, jax.Array], spec: model.ModelSpec, dropout_key=None, state=None):
    """Same contract as `autodiff_value_and_grad(params, batch, spec, dropout_key, state)`.

    params: one dict per layer; batch: (x (B, *input_shape) float, labels (B,) int).
    Returns (scalar loss, grads with the tree structure, shapes and dtypes of params); with the
    model `state`, ((loss, the state after this step), grads), as jax.value_and_grad(has_aux=True).
    """
    x, labels = batch
    fwd = model.forward(params, x, spec, dropout_key)
    z = fwd.logits
    y = losses.targets(labels, spec, z.dtype)
    loss = losses.cost_from_logits(z, y, spec)
    if spec.l2:
        loss = loss + losses.l2_penalty(params, spec.l2)

    delta = output_delta(z, y, spec) / x.shape[0]  # the batch mean's 1/B enters once, here
    # The input layer needs no dX: skipping it is work autodiff also skips.
    grads, _ = stack.backward(spec.layers, spec.implicit_activation, params, fwd.caches, delta, need_dx=False)
    if spec.l2:
        grads = losses.add_l2_gradient(grads, params, spec.l2)
    return (loss, grads) if state is None else ((loss, model.next_state(spec, state, fwd)), grads)


def autodiff_value_and_grad(params, batch, spec: model.ModelSpec, dropout_key=None, state=None):
    """The reference gradient: `jax.value_and_grad` of `losses.loss` (with the state as aux)."""
    return jax.value_and_grad(losses.loss, has_aux=state is not None)(params, batch, spec, dropout_key, state)


def all_reduce_mean(loss, grads, axis: str, shards: int):
    """The last step of data-parallel backpropagation, run inside `jax.shard_map`.

    Each of the `shards` devices along mesh axis `axis` holds the loss and gradients of its
    slice of the batch (means over the slice). The batch mean is the mean of the slices' means,
    so every dW and db (and the loss) is summed across the devices — the all-reduce, the one
    communication of a training step besides batch norm's statistics — and divided by the shard
    count. The L2 term, which every slice adds whole, survives the division once.
    """
    mean = lambda value: jax.lax.psum(value, axis) / shards  # noqa: E731
    return mean(loss), jax.tree.map(mean, grads)


def data_parallel(value_and_grad, axis: str, shards: int):
    """value_and_grad over a batch slice, followed by the all-reduce: the global batch's
    (loss, grads) on every device of `axis`. For `value_and_grad` or `autodiff_value_and_grad`.
    Layers that need the whole batch's statistics (batch norm) all-reduce them themselves
    (`layers.data_axis`); the model state they return is then the same on every device."""

    def sharded_value_and_grad(params, batch, spec: model.ModelSpec, dropout_key=None, state=None):
        # Replicated parameters would make jax.grad sum across devices by itself (the transpose
        # of the implicit broadcast); marked as varying like the batch, they give this slice's
        # own gradient on both paths, and the one all-reduce is the explicit one below.
        params = jax.lax.pcast(params, axis, to="varying")
        with layers.data_axis(axis, shards):
            value, grads = value_and_grad(params, batch, spec, dropout_key, state)
        if state is None:
            return all_reduce_mean(value, grads, axis, shards)
        (loss, new_state), grads = value, grads
        loss, grads = all_reduce_mean(loss, grads, axis, shards)
        return (loss, new_state), grads

    return sharded_value_and_grad


def input_gradient(params, x: jax.Array, spec: model.ModelSpec, dlogits: jax.Array, state=None) -> jax.Array:
    """The hand-derived dC/dx for a given cotangent of the logits, in evaluation mode.

    x: (B, *input_shape); dlogits: (B, num_classes), dC/dz_L; state: the model state (required
    for models that keep one). Returns dx shaped like x: the same reverse walk as
    `value_and_grad`, with the input layer's dX computed too (training skips it). Saliency maps
    use it: dlogits = d p_c / d z for the predicted class c.
    """
    state = model.eval_state(spec, state)
    fwd = model.forward(params, x, spec, state=state)
    _, dx = stack.backward(spec.layers, spec.implicit_activation, params, fwd.caches, dlogits, need_dx=True,
                           state=state)
    return dx
