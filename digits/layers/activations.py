"""Activation layers: relu, leaky_relu:A, sigmoid, tanh, gelu, each with its derivative by hand.

The same classes serve as the implicit `--activation` (after every conv and dense layer but the
last, in stacks that name no activation layer). Each caches what its derivative is cheapest to
write in: the output a = f(z) for relu, sigmoid and tanh, the input z for leaky_relu and gelu.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from digits.layers import base


class _Activation(base.Layer):
    """Elementwise, no params: forward caches what `derivative` needs; dz = da * f'(z)."""

    is_activation = True

    @base.required
    def derivative(self, cached):
        """f'(z), from what `forward` cached (each activation defines it beside its forward)."""

    def backward(self, params, cached, dy, need_dx: bool = True):
        """dy -> ({}, dy * f'(z)), f'(z) from what forward cached."""
        if not need_dx:
            return {}, None
        return {}, dy * self.derivative(cached)


@base.register("relu")
@dataclasses.dataclass(frozen=True)
class Relu(_Activation):
    """relu: a = z if z > 0 else 0; f'(z) = 1 if a > 0 else 0 (so relu'(0) = 0)."""

    def forward(self, params, x, key=None):
        # where, not maximum: jax.grad of maximum gives 1/2 at z == 0, which is common in conv nets
        # (zero biases on black background); backprop and jax.grad both use relu'(0) = 0.
        a = jnp.where(x > 0, x, 0)
        return a, a

    def derivative(self, a):
        return (a > 0).astype(a.dtype)


@base.register("leaky_relu")
@dataclasses.dataclass(frozen=True)
class LeakyRelu(_Activation):
    """leaky_relu:A: a = z if z > 0 else A z; f'(z) = 1 if z > 0 else A (A = 0.01 by default)."""

    alpha: float = 0.01

    def __post_init__(self):
        if not math.isfinite(self.alpha):
            base.fail(self.text, "alpha must be a finite number")

    def forward(self, params, x, key=None):
        return jnp.where(x > 0, x, self.alpha * x), x

    def derivative(self, z):
        return jnp.where(z > 0, 1, self.alpha).astype(z.dtype)


@base.register("sigmoid")
@dataclasses.dataclass(frozen=True)
class Sigmoid(_Activation):
    """sigmoid: a = 1 / (1 + e^-z); f'(z) = a (1 - a)."""

    def forward(self, params, x, key=None):
        a = jax.nn.sigmoid(x)
        return a, a

    def derivative(self, a):
        return a * (1 - a)


@base.register("tanh")
@dataclasses.dataclass(frozen=True)
class Tanh(_Activation):
    """tanh: a = tanh z; f'(z) = 1 - a^2."""

    def forward(self, params, x, key=None):
        a = jnp.tanh(x)
        return a, a

    def derivative(self, a):
        return 1 - a * a


@base.register("gelu")
@dataclasses.dataclass(frozen=True)
class Gelu(_Activation):
    """gelu, the exact form (not the tanh approximation): a = z Phi(z), Phi the standard normal
    CDF; f'(z) = Phi(z) + z phi(z), phi = e^(-z^2/2) / sqrt(2 pi) its density."""

    def forward(self, params, x, key=None):
        return x * _normal_cdf(x), x

    def derivative(self, z):
        return _normal_cdf(z) + z * jnp.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _normal_cdf(z):
    return 0.5 * (1 + lax.erf(z / math.sqrt(2)))


def implicit(name: str) -> base.Layer:
    """The layer of `--activation=name` (its default arguments)."""
    cls = base.registered().get(name)
    if cls is None or not cls.is_activation:
        raise ValueError(f"unknown activation {name!r}")
    return cls()
