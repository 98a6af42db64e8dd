"""Layer kinds: for each, `init`, `forward` and the hand-derived `backward`, side by side.

A layer is a frozen dataclass (hashable, so a model spec holding a stack of them can be a static
`jax.jit` argument). Every kind has the same four methods:

    output_shape(in_shape)                  per-example shapes, no batch axis
    init(w_key, b_key, in_shape, ...)       -> params dict ({} for pool and dropout)
    forward(params, x, key)                 -> (y, cache): the output and what backward needs
    backward(params, cache, dy, need_dx)    -> (grads like params, dx or None)

Images are NHWC; per-example shapes are (H, W, C) for images and (N,) for vectors. The hidden
activation is not part of a layer: the model applies it after every conv and dense layer but the
last, and backprop multiplies by its derivative.

Tokens of a `--layers` string (comma-separated):

    dense:N              N units; params {"w": (n_in, N), "b": (N,)}, y = x @ w + b. A dense layer
                         after a conv or pool flattens its (H, W, C) input to H*W*C.
    convKHxKW:F          F filters of KH x KW, stride 1, `valid` padding; params
                         {"w": (KH, KW, C_in, F), "b": (F,)}. Extensions, in any order:
                         `:sS` for stride S and `:same` (or `:valid`) for the padding, e.g.
                         `conv3x3:8:s2:same`. `same` pads as TensorFlow and XLA do: the output is
                         ceil(H / S), the padding split evenly with the odd pixel at the end.
    maxpoolP, avgpoolP   P x P windows, stride P; a remainder that P does not divide is dropped.
    dropout:R            inverted dropout: keep ~ Bernoulli(1 - R), y = x * keep / (1 - R);
                         active only when the forward pass is given a key.

Max-pool routes each window's gradient to its first maximum in row-major window order, and the
forward pass computes the maximum as exactly that element, so `jax.grad` of the forward and the
hand-derived backward agree even on ties (e.g. all-zero windows after a ReLU).

The backward functions use no autodiff: `tests/test_backprop.py` reads their source to check.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from jax import lax


def _fail(token: str, message: str):
    raise ValueError(f"{token}: {message}")


def _init_weight(key, shape, fan_in: int, init: str, scale: float, dtype) -> jax.Array:
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


def _init_bias(key, n: int, init: str, scale: float, dtype) -> jax.Array:
    if init == "uniform":
        return jax.random.uniform(key, (n,), dtype, -scale, scale)
    if init in ("normal", "scaled_normal"):  # Nielsen draws biases from N(0, 1) in both
        return jax.random.normal(key, (n,), dtype)
    return jnp.zeros((n,), dtype)


@dataclasses.dataclass(frozen=True)
class Dense:
    """dense:N. x: (B, n_in) or (B, H, W, C), flattened -> y: (B, N)."""

    units: int
    has_params = True
    activated = True  # the hidden activation follows it (unless it is the last layer)

    @property
    def text(self) -> str:
        return f"dense:{self.units}"

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (self.units,)

    def init(self, w_key, b_key, in_shape, init: str, scale: float, dtype) -> dict:
        n_in = math.prod(in_shape)
        return {"w": _init_weight(w_key, (n_in, self.units), n_in, init, scale, dtype),
                "b": _init_bias(b_key, self.units, init, scale, dtype)}

    def forward(self, params, x, key=None):
        """x: (B, ...) -> (y (B, N), cache = x)."""
        flat = x if x.ndim == 2 else x.reshape(x.shape[0], -1)
        return flat @ params["w"] + params["b"], x

    def backward(self, params, x, dy, need_dx: bool = True):
        """dy: (B, N) -> ({"w": A_prev^T dZ, "b": sum dZ}, dA_prev = dZ W^T shaped like x)."""
        flat = x if x.ndim == 2 else x.reshape(x.shape[0], -1)
        grads = {"w": flat.T @ dy, "b": jnp.sum(dy, axis=0)}
        return grads, (dy @ params["w"].T).reshape(x.shape) if need_dx else None


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


@dataclasses.dataclass(frozen=True)
class Conv:
    """convKHxKW:F[:sS][:same]. x: (B, H, W, C_in) -> y: (B, H', W', F), NHWC, weights HWIO."""

    kh: int
    kw: int
    filters: int
    stride: int = 1
    padding: str = "valid"
    has_params = True
    activated = True

    @property
    def text(self) -> str:
        stride = f":s{self.stride}" if self.stride != 1 else ""
        padding = ":same" if self.padding == "same" else ""
        return f"conv{self.kh}x{self.kw}:{self.filters}{stride}{padding}"

    def pads(self, in_shape) -> tuple[tuple[int, int], tuple[int, int]]:
        """((top, bottom), (left, right)) zero padding of the input."""
        if self.padding == "valid":
            return (0, 0), (0, 0)
        return (_same_padding(in_shape[0], self.kh, self.stride), _same_padding(in_shape[1], self.kw, self.stride))

    def output_shape(self, in_shape):
        (top, bottom), (left, right) = self.pads(in_shape)
        h, w = in_shape[0] + top + bottom, in_shape[1] + left + right
        if self.kh > h or self.kw > w:
            _fail(self.text, f"kernel {self.kh}x{self.kw} is larger than its {in_shape[0]}x{in_shape[1]} input")
        return ((h - self.kh) // self.stride + 1, (w - self.kw) // self.stride + 1, self.filters)

    def init(self, w_key, b_key, in_shape, init: str, scale: float, dtype) -> dict:
        shape = (self.kh, self.kw, in_shape[-1], self.filters)
        return {"w": _init_weight(w_key, shape, self.kh * self.kw * in_shape[-1], init, scale, dtype),
                "b": _init_bias(b_key, self.filters, init, scale, dtype)}

    def forward(self, params, x, key=None):
        """x: (B, H, W, C_in) -> (y (B, H', W', F), cache = x).

        Written as im2col: the KH*KW shifted (strided) views of the padded input side by side on
        the channel axis, (B, H', W', KH*KW*C_in), times w as (KH*KW*C_in, F). The same sum as
        lax.conv; chosen because jax.grad turns it into dots and pads, which stay fast inside
        compiled loops, whereas jax.grad of lax.conv makes convolutions in layouts that XLA:CPU
        canonicalises only outside loops (~20x slower inside the training chunk).
        """
        (top, bottom), (left, right) = self.pads(x.shape[1:])
        padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0))) if top + bottom + left + right else x
        s, (h_out, w_out, _) = self.stride, self.output_shape(x.shape[1:])
        views = [padded[:, i:i + (h_out - 1) * s + 1:s, j:j + (w_out - 1) * s + 1:s, :]
                 for i in range(self.kh) for j in range(self.kw)]
        patches = jnp.concatenate(views, axis=-1) if len(views) > 1 else views[0]
        return patches @ params["w"].reshape(-1, self.filters) + params["b"], (x.shape, patches)

    def backward(self, params, cache, dy, need_dx: bool = True):
        """dy: (B, H', W', F) -> ({"w": (KH, KW, C_in, F), "b": (F,)}, dx (B, H, W, C_in)).

        With x_pad the padded input and s the stride, y[o] = sum_k x_pad[o*s + k] w[k] + b, so
            dW[k] = sum_{b, o} x_pad[b, o*s + k] dy[b, o]   a conv of x with dy dilated by s,
                                                            batch as the contracted feature axis;
            dx[p] = sum_k dy_dilated[p + pad - k] w[k]      a full conv of dy dilated by s with
                                                            the flipped kernel, in/out swapped.
        The forward's patches hold exactly the x_pad[b, o*s + k] of the first sum, so dW is
        computed as that sum over them: one (KH*KW*C_in, B*H'*W') x (B*H'*W', F) matmul, which is
        what jax.grad of the im2col forward does too (a convolution with the batch contracted ran
        14% slower here, see the README). The input gradient is the convolution above. Operands
        are transposed explicitly so that it reads and writes standard layouts (XLA on CPU
        otherwise picks slow layouts for convolutions inside compiled loops).
        """
        s, w = self.stride, params["w"]
        x_shape, patches = cache
        (top, bottom), (left, right) = self.pads(x_shape[1:])
        dy_rows = dy.reshape(-1, self.filters)
        dw = (patches.reshape(dy_rows.shape[0], -1).T @ dy_rows).reshape(w.shape)
        grads = {"w": dw, "b": jnp.sum(dy, axis=(0, 1, 2))}
        if not need_dx:
            return grads, None
        h, width = x_shape[1], x_shape[2]
        pad_h = (self.kh - 1 - top, h - 1 + top - (dy.shape[1] - 1) * s)
        pad_w = (self.kw - 1 - left, width - 1 + left - (dy.shape[2] - 1) * s)
        flipped = jnp.transpose(w[::-1, ::-1], (0, 1, 3, 2))  # (KH, KW, F, C_in)
        dx = lax.conv_general_dilated(dy, flipped, (1, 1), (pad_h, pad_w), lhs_dilation=(s, s),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return grads, dx


class _NoParams:
    """What pool and dropout layers share: no params, and no activation after them."""

    has_params = False
    activated = False

    def init(self, w_key, b_key, in_shape, init: str, scale: float, dtype) -> dict:
        return {}


@dataclasses.dataclass(frozen=True)
class Pool(_NoParams):
    """maxpoolP / avgpoolP. x: (B, H, W, C) -> y: (B, H // P, W // P, C)."""

    kind: str  # "max" or "avg"
    size: int

    @property
    def text(self) -> str:
        return f"{self.kind}pool{self.size}"

    def output_shape(self, in_shape):
        if self.size > in_shape[0] or self.size > in_shape[1]:
            _fail(self.text, f"window {self.size}x{self.size} is larger than its {in_shape[0]}x{in_shape[1]} input")
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
        # jax.grad routes dy through the sum to that one element, as backward does.
        order = (jnp.arange(p)[:, None, None] * p + jnp.arange(p)[None, None, :])[:, :, :, None]
        is_max = windows == jnp.max(windows, axis=(2, 4), keepdims=True)
        first = jnp.min(jnp.where(is_max, order, p * p), axis=(2, 4), keepdims=True)
        routed = order == first  # (B, H', P, W', P, C)
        return jnp.sum(jnp.where(routed, windows, 0), axis=(2, 4)), (x.shape, routed)

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


@dataclasses.dataclass(frozen=True)
class Dropout(_NoParams):
    """dropout:R. x: any shape -> y of the same shape; the identity without a key."""

    rate: float

    @property
    def text(self) -> str:
        return f"dropout:{self.rate!r}"

    def output_shape(self, in_shape):
        return in_shape

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


LAYER_KINDS = (Dense, Conv, Pool, Dropout)
_USAGE = "expected dense:N, convKxK:F[:sS][:same], maxpoolP, avgpoolP or dropout:R"
_CONV = re.compile(r"conv(\d+)x(\d+):(\d+)((?::[a-z0-9]+)*)")


def parse_layer(token: str):
    """One token of a `--layers` string -> a layer; ValueError naming the token if it is bad."""
    token = token.strip()
    if m := re.fullmatch(r"dense:(\d+)", token):
        if int(m[1]) < 1:
            _fail(token, "units must be >= 1")
        return Dense(int(m[1]))
    if m := _CONV.fullmatch(token):
        kh, kw, filters, options = int(m[1]), int(m[2]), int(m[3]), m[4].split(":")[1:]
        if min(kh, kw) < 1 or filters < 1:
            _fail(token, "kernel sizes and filters must be >= 1")
        strides = [int(o[1:]) for o in options if re.fullmatch(r"s\d+", o)]
        paddings = [o for o in options if o in ("same", "valid")]
        if len(strides) + len(paddings) != len(options) or len(strides) > 1 or len(paddings) > 1:
            _fail(token, "options are :sS (stride) and :same or :valid (padding), each at most once")
        if strides and strides[0] < 1:
            _fail(token, "stride must be >= 1")
        return Conv(kh, kw, filters, strides[0] if strides else 1, paddings[0] if paddings else "valid")
    if m := re.fullmatch(r"(max|avg)pool(\d+)", token):
        if int(m[2]) < 1:
            _fail(token, "pool size must be >= 1")
        return Pool(m[1], int(m[2]))
    if m := re.fullmatch(r"dropout:([0-9.eE+-]+)", token):
        try:
            rate = float(m[1])
        except ValueError:
            rate = math.nan
        if not 0 <= rate < 1:
            _fail(token, "rate must be in [0, 1)")
        return Dropout(rate)
    raise ValueError(f"unknown layer {token!r} ({_USAGE})")
