"""maxpoolP, avgpoolP (P x P windows, stride P) and gap (global average pooling)."""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

import jax.numpy as jnp
from jax import lax

from digits.layers import base


@dataclasses.dataclass(frozen=True)
class Pool(base.Layer):
    """maxpoolP / avgpoolP. x: (B, H, W, C) -> y: (B, H // P, W // P, C)."""

    size: int
    kind: ClassVar[str] = ""  # "max" or "avg"
    needs_image = True

    def __post_init__(self):
        if self.size < 1:
            base.fail(self.text, "pool size must be >= 1")

    @classmethod
    def matches(cls, head: str) -> bool:
        return re.fullmatch(rf"{cls.name}\d+", head) is not None

    @classmethod
    def usage(cls) -> str:
        return f"{cls.name}P"

    @classmethod
    def from_token(cls, token: str) -> Pool:
        m = re.fullmatch(rf"{cls.name}(\d+)", token)
        if m is None:
            base.fail(token, f"expected {cls.usage()}")
        return cls(int(m[1]))

    @property
    def text(self) -> str:
        return f"{self.kind}pool{self.size}"

    def output_shape(self, in_shape):
        if self.size > in_shape[0] or self.size > in_shape[1]:
            base.fail(self.text, f"window {self.size}x{self.size} is larger than its {in_shape[0]}x{in_shape[1]} input")
        return (in_shape[0] // self.size, in_shape[1] // self.size, in_shape[2])

    def _windows(self, x):
        """(B, H, W, C) -> (B, H//P, P, W//P, P, C), the remainder dropped; a reshape, no copy."""
        p, (b, h, w, c) = self.size, x.shape
        return x[:, :h // p * p, :w // p * p, :].reshape(b, h // p, p, w // p, p, c)

    def forward(self, params, x, key=None):
        """x: (B, H, W, C) -> (y, cache): the input shape, plus the first-max mask for max-pool."""
        p, windows = self.size, self._windows(x)
        if self.kind == "avg":
            return jnp.sum(windows, axis=(2, 4)) / (p * p), (x.shape, None)
        # The first maximum in row-major window order; the comparisons carry no gradient, so
        # jax.grad routes dy through the sum to that one element, as backward does. A NaN is the
        # window's maximum (as jnp.max and `predict` have it), so a diverging net shows NaN here
        # too rather than a 0 from a window where nothing compares equal.
        order = (jnp.arange(p)[:, None, None] * p + jnp.arange(p)[None, None, :])[:, :, :, None]
        is_max = (windows == jnp.max(windows, axis=(2, 4), keepdims=True)) | jnp.isnan(windows)
        first = jnp.min(jnp.where(is_max, order, p * p), axis=(2, 4), keepdims=True)
        routed = order == first  # (B, H', P, W', P, C)
        return jnp.sum(jnp.where(routed, windows, 0), axis=(2, 4)), (x.shape, routed)

    def predict(self, params, state, x):
        """The forward's y without its routing mask: each window's maximum, which is exactly
        the routed element (for avg-pool, the forward). 1.4-1.7x faster evaluation for the
        speedrun net; differentiated, reduce_window would route ties its own way, not first. A
        window with a NaN gives NaN, as the forward does."""
        if self.kind == "avg":
            return self.forward(params, x)[0]
        window = (1, self.size, self.size, 1)  # VALID with stride P: the remainder dropped, as in _windows
        return lax.reduce_window(x, jnp.array(-jnp.inf, x.dtype), lax.max, window, window, "VALID")

    def backward(self, params, cache, dy, need_dx: bool = True):
        """dy: (B, H', W', C) -> ({}, dx (B, H, W, C)); the dropped remainder gets zero."""
        if not need_dx:
            return {}, None
        (b, h, w, c), routed = cache
        p, spread = self.size, dy[:, :, None, :, None, :]
        if self.kind == "avg":  # each input of the window contributed 1 / P^2 of the mean
            windows = jnp.broadcast_to(spread / (p * p), (b, h // p, p, w // p, p, c))
        else:  # all of dy goes to the routed maximum
            windows = jnp.where(routed, spread, 0).astype(dy.dtype)
        dx = windows.reshape(b, h // p * p, w // p * p, c)
        return {}, jnp.pad(dx, ((0, 0), (0, h - h // p * p), (0, w - w // p * p), (0, 0)))


@base.register("maxpool")
@dataclasses.dataclass(frozen=True)
class MaxPool(Pool):
    """maxpoolP: each window's first maximum (row-major), which is also where backward routes dy."""

    kind = "max"


@base.register("avgpool")
@dataclasses.dataclass(frozen=True)
class AvgPool(Pool):
    """avgpoolP: each window's mean."""

    kind = "avg"


@base.register("gap")
@dataclasses.dataclass(frozen=True)
class GlobalAvgPool(base.Layer):
    """gap: global average pooling, x: (B, H, W, C) -> y: (B, C), the mean over H and W."""

    needs_image = True

    def output_shape(self, in_shape):
        return (in_shape[-1],)

    def forward(self, params, x, key=None):
        """x: (B, H, W, C) -> (y (B, C), cache = the input shape)."""
        return jnp.mean(x, axis=(1, 2)), x.shape

    def backward(self, params, shape, dy, need_dx: bool = True):
        """dy: (B, C) -> ({}, dx (B, H, W, C) = dy / (H W) at every pixel)."""
        if not need_dx:
            return {}, None
        return {}, jnp.broadcast_to((dy / (shape[1] * shape[2]))[:, None, None, :], shape)
