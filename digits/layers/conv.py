"""convKHxKW:F[:sS][:same]: 2-D convolution, NHWC, written as im2col."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
from jax import lax

from digits.layers import base, dense

_CONV = re.compile(r"conv(\d+)x(\d+):(\d+)((?::[a-z0-9]+)*)")


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


@base.register("conv")
@dataclasses.dataclass(frozen=True)
class Conv(base.Layer):
    """convKHxKW:F[:sS][:same]. x: (B, H, W, C_in) -> y: (B, H', W', F), NHWC, weights HWIO."""

    kh: int
    kw: int
    filters: int
    stride: int = 1
    padding: str = "valid"
    token_usage = "convKHxKW:F[:sS][:same]"
    activated = True
    needs_image = True

    @classmethod
    def matches(cls, head: str) -> bool:
        return re.fullmatch(r"conv\d+x\d+", head) is not None

    @classmethod
    def from_token(cls, token: str) -> Conv:
        m = _CONV.fullmatch(token)
        if m is None:
            base.fail(token, f"expected {cls.usage()}")
        kh, kw, filters, options = int(m[1]), int(m[2]), int(m[3]), m[4].split(":")[1:]
        if min(kh, kw) < 1 or filters < 1:
            base.fail(token, "kernel sizes and filters must be >= 1")
        strides = [int(o[1:]) for o in options if re.fullmatch(r"s\d+", o)]
        paddings = [o for o in options if o in ("same", "valid")]
        if len(strides) + len(paddings) != len(options) or len(strides) > 1 or len(paddings) > 1:
            base.fail(token, "options are :sS (stride) and :same or :valid (padding), each at most once")
        if strides and strides[0] < 1:
            base.fail(token, "stride must be >= 1")
        return Conv(kh, kw, filters, strides[0] if strides else 1, paddings[0] if paddings else "valid")

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
            base.fail(self.text, f"kernel {self.kh}x{self.kw} is larger than its {in_shape[0]}x{in_shape[1]} input")
        return ((h - self.kh) // self.stride + 1, (w - self.kw) // self.stride + 1, self.filters)

    def init(self, key, in_shape, dtype, bias_key=None, init="he", init_scale=0.5) -> dict:
        shape = (self.kh, self.kw, in_shape[-1], self.filters)
        bias_key = jax.random.fold_in(key, 1) if bias_key is None else bias_key
        return {"w": dense.init_weight(key, shape, self.kh * self.kw * in_shape[-1], init, init_scale, dtype),
                "b": dense.init_bias(bias_key, self.filters, init, init_scale, dtype)}

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
        14% slower here, see docs/performance.md). The input gradient is the convolution above. Operands
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
