"""A multilayer perceptron as a pure function of a parameter pytree.

Params are a list with one `{"w": (n_in, n_out), "b": (n_out,)}` per layer, batch-major:
`z = a_prev @ w + b`. The spec says everything else (activations, cost, initialiser) and is
hashable, so it can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

HIDDEN_ACTIVATIONS = ("relu", "sigmoid", "tanh")
OUTPUT_ACTIVATIONS = ("softmax", "sigmoid")
COSTS = ("cross_entropy", "quadratic")
INITIALIZERS = ("uniform", "normal", "scaled_normal", "glorot", "he")


@dataclasses.dataclass(frozen=True)
class MLPSpec:
    """The architecture and objective of an MLP.

    layer_sizes: (784, hidden..., 10); activation: hidden-layer nonlinearity; output: output
    nonlinearity; cost: per-example cost; l2: coefficient of the penalty 0.5 * l2 * sum(w**2).
    """

    layer_sizes: tuple[int, ...] = (784, 10, 10)
    activation: str = "relu"
    output: str = "softmax"
    cost: str = "cross_entropy"
    init: str = "uniform"
    init_scale: float = 0.5
    l2: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "layer_sizes", tuple(int(n) for n in self.layer_sizes))
        _check(len(self.layer_sizes) >= 2 and min(self.layer_sizes) >= 1, f"bad layer_sizes {self.layer_sizes}")
        _check(self.activation in HIDDEN_ACTIVATIONS, f"unknown activation {self.activation!r}")
        _check(self.output in OUTPUT_ACTIVATIONS, f"unknown output {self.output!r}")
        _check(self.cost in COSTS, f"unknown cost {self.cost!r}")
        _check(self.init in INITIALIZERS, f"unknown init {self.init!r}")
        _check(self.l2 >= 0, f"l2 must be >= 0, got {self.l2}")

    @property
    def num_layers(self) -> int:
        return len(self.layer_sizes) - 1


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _init_weight(key, n_in: int, n_out: int, spec: MLPSpec, dtype) -> jax.Array:
    shape = (n_in, n_out)
    if spec.init == "uniform":  # the seed network: U(-scale, scale)
        return jax.random.uniform(key, shape, dtype, -spec.init_scale, spec.init_scale)
    if spec.init == "normal":  # Nielsen's network.py: N(0, 1)
        return jax.random.normal(key, shape, dtype)
    if spec.init == "scaled_normal":  # Nielsen's network2.py: N(0, 1/n_in)
        return jax.random.normal(key, shape, dtype) / math.sqrt(n_in)
    if spec.init == "glorot":
        return jax.nn.initializers.glorot_uniform()(key, shape, dtype)
    return jax.nn.initializers.he_normal()(key, shape, dtype)


def _init_bias(key, n_out: int, spec: MLPSpec, dtype) -> jax.Array:
    if spec.init == "uniform":
        return jax.random.uniform(key, (n_out,), dtype, -spec.init_scale, spec.init_scale)
    if spec.init in ("normal", "scaled_normal"):  # Nielsen draws biases from N(0, 1) in both
        return jax.random.normal(key, (n_out,), dtype)
    return jnp.zeros((n_out,), dtype)


def init(key: jax.Array, spec: MLPSpec, dtype=jnp.float32) -> list[dict[str, jax.Array]]:
    """Returns params: [{"w": (n_in, n_out), "b": (n_out,)}] for each layer."""
    keys = jax.random.split(key, 2 * spec.num_layers)
    sizes = zip(spec.layer_sizes[:-1], spec.layer_sizes[1:])
    return [
        {"w": _init_weight(keys[2 * i], n_in, n_out, spec, dtype), "b": _init_bias(keys[2 * i + 1], n_out, spec, dtype)}
        for i, (n_in, n_out) in enumerate(sizes)
    ]


def activate(z: jax.Array, name: str) -> jax.Array:
    """Applies a nonlinearity by name; softmax runs over the last axis."""
    if name == "relu":
        return jnp.maximum(z, 0)
    if name == "sigmoid":
        return jax.nn.sigmoid(z)
    if name == "tanh":
        return jnp.tanh(z)
    if name == "softmax":
        return jax.nn.softmax(z, axis=-1)
    raise ValueError(f"unknown activation {name!r}")


def forward(params, x: jax.Array, spec: MLPSpec) -> tuple[list[jax.Array], jax.Array]:
    """x: (B, 784) -> (hidden activations [(B, n_l)], output pre-activations z_L (B, 10))."""
    hidden = []
    a = x
    for layer in params[:-1]:
        a = activate(a @ layer["w"] + layer["b"], spec.activation)
        hidden.append(a)
    return hidden, a @ params[-1]["w"] + params[-1]["b"]


def logits(params, x: jax.Array, spec: MLPSpec) -> jax.Array:
    """x: (B, 784) -> output pre-activations (B, 10); their argmax is the prediction."""
    return forward(params, x, spec)[1]


def apply(params, x: jax.Array, spec: MLPSpec) -> jax.Array:
    """x: (B, 784) -> output activations (B, 10): softmax probabilities or sigmoid outputs."""
    return activate(logits(params, x, spec), spec.output)


def scale_images(images: jax.Array, dtype=jnp.float32) -> jax.Array:
    """uint8 (B, H, W) or (B, H*W) -> float (B, H*W) in [0, 1]. Runs inside compiled steps."""
    return images.reshape(images.shape[0], -1).astype(dtype) / 255.0

