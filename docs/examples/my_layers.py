# my_layers.py
import dataclasses

import jax.numpy as jnp

from digits import layers


@layers.register("gain")
@dataclasses.dataclass(frozen=True)
class Gain(layers.Layer):
    """gain: y = x * g, one learned g per channel (the last axis)."""

    def init(self, key, in_shape, dtype):
        return {"g": jnp.ones(in_shape[-1:], dtype)}

    def forward(self, params, x, key=None):
        return x * params["g"], x  # (y, what backward needs)

    def backward(self, params, x, dy, need_dx=True):
        grads = {"g": jnp.sum(dy * x, axis=tuple(range(x.ndim - 1)))}
        return grads, (dy * params["g"] if need_dx else None)
