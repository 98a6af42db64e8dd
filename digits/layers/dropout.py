"""dropout:R, inverted dropout: keep ~ Bernoulli(1 - R), y = x * keep / (1 - R), only in training."""

from __future__ import annotations

import dataclasses

import jax

from digits.layers import base


@base.register("dropout")
@dataclasses.dataclass(frozen=True)
class Dropout(base.Layer):
    """dropout:R. x: any shape -> y of the same shape; the identity without a key."""

    rate: float
    token_usage = "dropout:R"
    uses_key = True

    def __post_init__(self):
        if not 0 <= self.rate < 1:  # False for NaN
            base.fail(self.text, "rate must be in [0, 1)")

    def forward(self, params, x, key=None):
        """x -> (x * keep / (1 - R), cache = keep / (1 - R)); (x, None) when off."""
        if key is None or self.rate == 0:
            return x, None
        scale = jax.random.bernoulli(key, 1 - self.rate, x.shape).astype(x.dtype) / (1 - self.rate)
        return x * scale, scale

    def backward(self, params, scale, dy, need_dx: bool = True):
        """dy -> ({}, dy * keep / (1 - R)): the forward's own mask."""
        if not need_dx:
            return {}, None
        return {}, dy if scale is None else dy * scale
