"""dense:N, and the weight initialisers it shares with conv."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from digits.layers import base


def init_weight(key, shape, fan_in: int, init: str, scale: float, dtype) -> jax.Array:
    """fan_in = n_in for dense, kh * kw * c_in for conv (as jax.nn.initializers compute it)."""
    if init == "uniform":  # the seed network: U(-scale, scale)
        return jax.random.uniform(key, shape, dtype, -scale, scale)
    if init == "normal":  # Nielsen's network.py: N(0, 1)
        return jax.random.normal(key, shape, dtype)
    if init == "scaled_normal":  # Nielsen's network2.py: N(0, 1/fan_in)
        return jax.random.normal(key, shape, dtype) / math.sqrt(fan_in)
    if init == "glorot":
        return jax.nn.initializers.glorot_uniform()(key, shape, dtype)
    return jax.nn.initializers.he_normal()(key, shape, dtype)


def init_bias(key, n: int, init: str, scale: float, dtype) -> jax.Array:
    if init == "uniform":
        return jax.random.uniform(key, (n,), dtype, -scale, scale)
    if init in ("normal", "scaled_normal"):  # Nielsen draws biases from N(0, 1) in both
        return jax.random.normal(key, (n,), dtype)
    return jnp.zeros((n,), dtype)


@base.register("dense")
@dataclasses.dataclass(frozen=True)
class Dense(base.Layer):
    """dense:N. x: (B, n_in) or (B, H, W, C), flattened -> y: (B, N); params {"w": (n_in, N), "b": (N,)}."""

    units: int
    token_usage = "dense:N"
    activated = True  # the hidden activation follows it (unless it is the last layer)

    def __post_init__(self):
        if self.units < 1:
            base.fail(self.text, "units must be >= 1")

    def output_shape(self, in_shape):
        return (self.units,)

    def init(self, key, in_shape, dtype, bias_key=None, init="he", init_scale=0.5) -> dict:
        n_in = math.prod(in_shape)
        bias_key = jax.random.fold_in(key, 1) if bias_key is None else bias_key
        return {"w": init_weight(key, (n_in, self.units), n_in, init, init_scale, dtype),
                "b": init_bias(bias_key, self.units, init, init_scale, dtype)}

    def forward(self, params, x, key=None):
        """x: (B, ...) -> (y (B, N), cache = x)."""
        flat = x if x.ndim == 2 else x.reshape(x.shape[0], -1)
        return flat @ params["w"] + params["b"], x

    def backward(self, params, x, dy, need_dx: bool = True):
        """dy: (B, N) -> ({"w": A_prev^T dZ, "b": sum dZ}, dA_prev = dZ W^T shaped like x)."""
        flat = x if x.ndim == 2 else x.reshape(x.shape[0], -1)
        grads = {"w": flat.T @ dy, "b": jnp.sum(dy, axis=0)}
        return grads, (dy @ params["w"].T).reshape(x.shape) if need_dx else None
