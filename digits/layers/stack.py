"""Walking a stack of layers: init, the forward pass, the hand-derived reverse walk, model state.

A stack is a tuple of layers plus the implicit activation (a layer, or None when the stack names
activation layers itself), which follows every layer whose kind is `activated` but the last.
The model (`digits.model`) walks its whole stack with these functions and a residual block
walks its body with the same ones, so the reverse walk is written once. With `state` (model
state, one dict per layer) a walk runs in evaluation mode (running statistics, no dropout);
without, in training mode (batch statistics; dropout iff a key is given).

No autodiff here: `tests/test_backprop.py` reads this source to check.
"""

from __future__ import annotations

import jax

from digits.layers import base


def implicit_flags(layers, activation) -> tuple[bool, ...]:
    """Whether the implicit activation follows each layer: every `activated` kind but the last."""
    return tuple(activation is not None and layer.activated and i < len(layers) - 1 for i, layer in enumerate(layers))


def output_shapes(layers, in_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Each layer's output shape for one example; ValueError naming the layer that does not fit."""
    shapes, shape = [], tuple(in_shape)
    for layer in layers:
        if layer.needs_image and len(shape) != 3:
            base.fail(layer.text, f"needs an image input (H, W, C), got {shape}")
        shape = tuple(layer.output_shape(shape))
        shapes.append(shape)
    return tuple(shapes)


def _init_layer(layer, key, bias_key, in_shape, dtype, options: dict) -> dict:
    """layer.init with the spec's options it declares (bias_key, init, init_scale)."""
    extra = {name: ({"bias_key": bias_key} | options)[name] for name in base.init_accepts(layer)}
    return layer.init(key, in_shape, dtype, **extra)


def init(layers, in_shape, key, dtype, options: dict) -> list[dict]:
    """Params, one dict per layer. The j-th layer with params gets keys[2j] (and, as bias_key,
    keys[2j + 1]) of split(key, 2 * (number of layers with params)): an MLP's init is that of the
    original all-dense network."""
    in_shapes = (tuple(in_shape),) + output_shapes(layers, in_shape)[:-1]
    probe = jax.random.PRNGKey(0)
    has_params = [bool(jax.tree.leaves(jax.eval_shape(
                      lambda k, layer=layer, shape=shape: _init_layer(layer, k, k, shape, dtype, options), probe)))
                  for layer, shape in zip(layers, in_shapes, strict=True)]
    keys = jax.random.split(key, 2 * sum(has_params))
    params, j = [], 0
    for layer, shape, has in zip(layers, in_shapes, has_params, strict=True):
        params.append(_init_layer(layer, keys[2 * j], keys[2 * j + 1], shape, dtype, options) if has else {})
        j += has
    return params


def init_state(layers, in_shape, dtype) -> list[dict]:
    """Model state, one dict per layer ({} for kinds without state)."""
    in_shapes = (tuple(in_shape),) + output_shapes(layers, in_shape)[:-1]
    return [layer.init_state(shape, dtype) for layer, shape in zip(layers, in_shapes, strict=True)]


def forward(layers, activation, params, x, key=None, state=None):
    """x: (B, *in_shape) -> (y, caches); caches[l] = (layer l's cache, its activation's or None).

    Training mode without `state` (layer l's dropout draws from fold_in(key, l)); evaluation mode
    with it."""
    caches, a = [], x
    for index, (layer, flag) in enumerate(zip(layers, implicit_flags(layers, activation), strict=True)):
        if state is None:
            a, cache = layer.forward(params[index], a, None if key is None else jax.random.fold_in(key, index))
        else:
            a, cache = layer.infer_forward(params[index], state[index], a)
        act_cache = None
        if flag:
            a, act_cache = activation.forward({}, a)
        caches.append((cache, act_cache))
    return a, caches


def predict(layers, activation, params, x, state):
    """`forward` in evaluation mode, the output alone: x (B, *in_shape) -> y, each layer's
    `predict` (no caches are made, so nothing here is meant to be differentiated)."""
    a = x
    for index, (layer, flag) in enumerate(zip(layers, implicit_flags(layers, activation), strict=True)):
        a = layer.predict(params[index], state[index], a)
        if flag:  # (as `forward` applies it)
            a = activation.forward({}, a)[0]
    return a


def backward(layers, activation, params, caches, dy, need_dx: bool, state=None):
    """The reverse walk: dy = dC/dy of the stack's output -> (grads like params, dx or None).

    At layer i: through its implicit activation, dZ_i = dA_i * f'(z_i); then its own backward,
    which gives its grads and dA_{i-1}. The input's dx is skipped unless `need_dx`.
    """
    grads = [None] * len(layers)
    for i in reversed(range(len(layers))):
        cache, act_cache = caches[i]
        if act_cache is not None:
            _, dy = activation.backward({}, act_cache, dy)
        if state is None:
            grads[i], dy = layers[i].backward(params[i], cache, dy, need_dx or i > 0)
        else:
            grads[i], dy = layers[i].backward_infer(params[i], state[i], cache, dy, need_dx or i > 0)
    return grads, dy


def next_state(layers, state, caches) -> list[dict]:
    """Model state after a training step, from the training forward pass's caches."""
    return [layer.next_state(s, cache) for layer, s, (cache, _) in zip(layers, state, caches, strict=True)]


def effective_text(layers, activation) -> str:
    """The stack with its implicit activations written in (what the run header prints)."""
    tokens = []
    for layer, flag in zip(layers, implicit_flags(layers, activation), strict=True):
        tokens.append(layer.effective_text())
        if flag:
            tokens.append(activation.text)
    return ",".join(tokens)
