"""batchnorm[:momentum] and layernorm, learned scale gamma and shift beta, compact backward passes.

Both normalise x to xhat = (x - mu) / sqrt(var + eps) and output y = gamma xhat + beta, with
gamma, beta per channel (the last axis). With N the entries each mu and var average over, the
backward pass is the one-formula form (CS231n's `batchnorm_backward_alt`):

    dgamma = sum(dy xhat),   dbeta = sum(dy)
    dx     = gamma / (N sqrt(var + eps)) * (N dy - sum(dy) - xhat sum(dy xhat))

the sums running over the same N entries as mu and var. For batch norm those are the batch (and,
after a conv, every pixel): in a data-parallel step the per-device sums of the forward pass and
the two sums of this formula are all-reduced over the data axis (`base.batch_sum`, a `lax.psum`),
so the statistics are the global batch's.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from jax import lax

from digits.layers import base


def _scale_shift(in_shape, dtype) -> dict:
    return {"gamma": jnp.ones(in_shape[-1:], dtype), "beta": jnp.zeros(in_shape[-1:], dtype)}


@base.register("batchnorm")
@dataclasses.dataclass(frozen=True)
class BatchNorm(base.Layer):
    """batchnorm[:momentum]: per unit after dense, per channel over batch and pixels after conv.

    Training normalises by the batch's mean and biased variance and updates the running
    statistics, mean_r <- m mean_r + (1 - m) mean and var_r <- m var_r + (1 - m) var N / (N - 1)
    (the unbiased variance, as PyTorch keeps it), momentum m = 0.9 by default; evaluation
    normalises by the running statistics. They are model state (`init_state`), never trained.
    """

    momentum: float = 0.9
    eps: float = 1e-5
    stateful = True

    def __post_init__(self):
        if not 0 <= self.momentum < 1:  # False for NaN
            base.fail(self.text, "momentum must be in [0, 1)")
        if not (math.isfinite(self.eps) and self.eps > 0):
            base.fail(self.text, "eps must be > 0")

    def init(self, key, in_shape, dtype) -> dict:
        return _scale_shift(in_shape, dtype)

    def init_state(self, in_shape, dtype) -> dict:
        return {"mean": jnp.zeros(in_shape[-1:], dtype), "var": jnp.ones(in_shape[-1:], dtype)}

    def forward(self, params, x, key=None):
        """x: (B, ..., C) -> (y, cache = (xhat, 1 / sqrt(var + eps), mean, var, N)), batch statistics."""
        axes = tuple(range(x.ndim - 1))
        total, n = base.batch_sum(x, axes)
        mean = total / n
        squares, _ = base.batch_sum(jnp.square(x - mean), axes)
        var = squares / n
        inv_std = lax.rsqrt(var + self.eps)
        xhat = (x - mean) * inv_std
        return params["gamma"] * xhat + params["beta"], (xhat, inv_std, mean, var, n)

    def backward(self, params, cache, dy, need_dx: bool = True):
        """dy: like x -> ({"gamma", "beta"}, dx), the compact formula of the module docstring."""
        xhat, inv_std, _, _, n = cache
        axes = tuple(range(dy.ndim - 1))
        sum_dy, sum_dy_xhat = jnp.sum(dy, axis=axes), jnp.sum(dy * xhat, axis=axes)
        grads = {"gamma": sum_dy_xhat, "beta": sum_dy}
        if not need_dx:
            return grads, None
        # The global batch's two sums: this device's, all-reduced in a data-parallel step.
        all_dy, _ = base.batch_sum(sum_dy, ())
        all_dy_xhat, _ = base.batch_sum(sum_dy_xhat, ())
        return grads, params["gamma"] * inv_std / n * (n * dy - all_dy - xhat * all_dy_xhat)

    def next_state(self, state, cache):
        _, _, mean, var, n = cache
        m = self.momentum
        return {"mean": m * state["mean"] + (1 - m) * mean,
                "var": m * state["var"] + (1 - m) * var * (n / max(n - 1, 1))}

    def infer_forward(self, params, state, x):
        """Evaluation: the running statistics, a fixed affine map per channel."""
        inv_std = lax.rsqrt(state["var"] + self.eps)
        xhat = (x - state["mean"]) * inv_std
        return params["gamma"] * xhat + params["beta"], (xhat, inv_std)

    def backward_infer(self, params, state, cache, dy, need_dx: bool = True):
        xhat, inv_std = cache
        axes = tuple(range(dy.ndim - 1))
        grads = {"gamma": jnp.sum(dy * xhat, axis=axes), "beta": jnp.sum(dy, axis=axes)}
        return grads, (dy * params["gamma"] * inv_std if need_dx else None)


@base.register("layernorm")
@dataclasses.dataclass(frozen=True)
class LayerNorm(base.Layer):
    """layernorm: each example normalised over all its features (for images H, W and C); gamma and
    beta per channel. The same in training and evaluation (no state)."""

    eps: float = 1e-5

    def __post_init__(self):
        if not (math.isfinite(self.eps) and self.eps > 0):
            base.fail(self.text, "eps must be > 0")

    def init(self, key, in_shape, dtype) -> dict:
        return _scale_shift(in_shape, dtype)

    def forward(self, params, x, key=None):
        """x: (B, ...) -> (y, cache = (xhat, 1 / sqrt(var + eps))), statistics per example."""
        axes = tuple(range(1, x.ndim))
        mean = jnp.mean(x, axis=axes, keepdims=True)
        inv_std = lax.rsqrt(jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True) + self.eps)
        xhat = (x - mean) * inv_std
        return params["gamma"] * xhat + params["beta"], (xhat, inv_std)

    def backward(self, params, cache, dy, need_dx: bool = True):
        """The compact formula with dxhat = dy gamma for dy, the sums over each example's features."""
        xhat, inv_std = cache
        channel_axes = tuple(range(dy.ndim - 1))
        grads = {"gamma": jnp.sum(dy * xhat, axis=channel_axes), "beta": jnp.sum(dy, axis=channel_axes)}
        if not need_dx:
            return grads, None
        axes = tuple(range(1, dy.ndim))
        n = math.prod(dy.shape[1:])
        dxhat = dy * params["gamma"]
        sum_dxhat = jnp.sum(dxhat, axis=axes, keepdims=True)
        sum_dxhat_xhat = jnp.sum(dxhat * xhat, axis=axes, keepdims=True)
        return grads, inv_std / n * (n * dxhat - sum_dxhat - xhat * sum_dxhat_xhat)
