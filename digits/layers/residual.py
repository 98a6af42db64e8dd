"""res(<layers>): a residual block, y = body(x) + shortcut(x).

The shortcut is the identity when the body keeps the shape; when the body changes it (a stride,
another channel count), a 1x1 convolution with the matching stride projects x, and its params
belong to the block: {"body": [one dict per body layer], "proj": {"w", "b"}}. Inside the body the
implicit activation follows every activated kind but the body's last; after the sum it follows
the block (unless the block is the network's last layer), as in He et al.'s ResNets.
"""

from __future__ import annotations

import dataclasses

import jax

from digits.layers import base, stack
from digits.layers.conv import Conv


@base.register("res")
@dataclasses.dataclass(frozen=True)
class Residual(base.Layer):
    """res(<layers>): x -> body(x) + x, or + proj(x) (a 1x1 conv) when the shapes differ."""

    body: tuple
    activation: base.Layer | None = None  # the implicit activation inside the body (set by the model)
    token_usage = "res(<layers>)"
    activated = True

    @classmethod
    def from_children(cls, token: str, body: tuple) -> Residual:
        return cls(tuple(body))

    @classmethod
    def from_token(cls, token: str):
        base.fail(token, "a residual block is written res(<layers>), e.g. res(conv3x3:8:same,relu,conv3x3:8:same)")

    @classmethod
    def matches(cls, head: str) -> bool:
        return head == "res"

    @property
    def text(self) -> str:
        return f"res({base.stack_text(self.body)})"

    def effective_text(self) -> str:
        return f"res({stack.effective_text(self.body, self.activation)})"

    @property
    def stateful(self) -> bool:
        return any(layer.stateful for layer in self.body)

    @property
    def uses_key(self) -> bool:
        return any(layer.uses_key for layer in self.body)

    @property
    def needs_image(self) -> bool:
        return any(layer.needs_image for layer in self.body)

    def names_activation(self) -> bool:
        return any(layer.names_activation() for layer in self.body)

    def with_activation(self, activation) -> Residual:
        """This block with the model's implicit activation, nested blocks included."""
        body = tuple(layer.with_activation(activation) if isinstance(layer, Residual) else layer for layer in self.body)
        return dataclasses.replace(self, body=body, activation=activation)

    def projection(self, in_shape) -> Conv | None:
        """The 1x1 conv of the shortcut, or None when the body keeps the shape."""
        out_shape = stack.output_shapes(self.body, in_shape)[-1]
        if tuple(out_shape) == tuple(in_shape):
            return None
        if len(in_shape) != 3 or len(out_shape) != 3:
            base.fail(self.text, f"the body maps {in_shape} to {out_shape}; only images (H, W, C) can be projected")
        for stride in range(1, max(in_shape[0], in_shape[1]) + 1):
            if ((in_shape[0] - 1) // stride + 1, (in_shape[1] - 1) // stride + 1) == tuple(out_shape[:2]):
                return Conv(1, 1, out_shape[2], stride)
        base.fail(self.text, f"the body maps {in_shape[0]}x{in_shape[1]} to {out_shape[0]}x{out_shape[1]}, which no "
                             "strided 1x1 shortcut matches (use :same padding inside residual blocks)")

    def output_shape(self, in_shape):
        self.projection(in_shape)  # raises if no shortcut fits
        return stack.output_shapes(self.body, in_shape)[-1]

    def init(self, key, in_shape, dtype, init="he", init_scale=0.5) -> dict:
        options = {"init": init, "init_scale": init_scale}
        body_key, proj_key, proj_bias_key = jax.random.split(key, 3)
        params = {"body": stack.init(self.body, in_shape, body_key, dtype, options)}
        proj = self.projection(in_shape)
        if proj is not None:
            params["proj"] = proj.init(proj_key, in_shape, dtype, proj_bias_key, init, init_scale)
        return params

    def init_state(self, in_shape, dtype) -> dict:
        return {"body": stack.init_state(self.body, in_shape, dtype)}

    def next_state(self, state, cache):
        body_caches, _ = cache
        return {"body": stack.next_state(self.body, state["body"], body_caches)}

    def _shortcut(self, params, x, predict: bool = False):
        """(x or its projection, the projection's cache); with `predict`, the projection's
        `predict` output and no cache."""
        proj = self.projection(x.shape[1:])
        if proj is None:
            return x, None
        return (proj.predict(params["proj"], {}, x), None) if predict else proj.forward(params["proj"], x)

    def forward(self, params, x, key=None):
        """x -> (body(x) + shortcut(x), cache = (the body's caches, the projection's))."""
        y, body_caches = stack.forward(self.body, self.activation, params["body"], x, key)
        shortcut, proj_cache = self._shortcut(params, x)
        return y + shortcut, (body_caches, proj_cache)

    def infer_forward(self, params, state, x):
        y, body_caches = stack.forward(self.body, self.activation, params["body"], x, state=state["body"])
        shortcut, proj_cache = self._shortcut(params, x)
        return y + shortcut, (body_caches, proj_cache)

    def predict(self, params, state, x):
        shortcut, _ = self._shortcut(params, x, predict=True)
        return stack.predict(self.body, self.activation, params["body"], x, state["body"]) + shortcut

    def backward(self, params, cache, dy, need_dx: bool = True, state=None):
        """dy -> (grads, dx). The sum sends dy unchanged down both paths; at the input the two
        gradients meet again and add up (the fan-in): dx = dx_body + dx_shortcut."""
        body_caches, proj_cache = cache
        grads = {}
        grads["body"], dx_body = stack.backward(self.body, self.activation, params["body"], body_caches, dy, need_dx,
                                                None if state is None else state["body"])
        if "proj" in params:
            grads["proj"], dx_shortcut = self.projection(_input_shape(proj_cache)).backward(
                params["proj"], proj_cache, dy, need_dx)
        else:
            dx_shortcut = dy
        return grads, (dx_body + dx_shortcut if need_dx else None)

    def backward_infer(self, params, state, cache, dy, need_dx: bool = True):
        return self.backward(params, cache, dy, need_dx, state)


def _input_shape(conv_cache) -> tuple[int, ...]:
    """The per-example input shape a conv's cache recorded."""
    x_shape, _ = conv_cache
    return tuple(x_shape[1:])
