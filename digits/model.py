"""A model: a stack of layers (`digits.layers`) as a pure function of a parameter pytree.

Params are a list with one dict per layer: `{"w": (n_in, n_out), "b": (n_out,)}` for dense
(batch-major, `z = a_prev @ w + b`), `{"w": (kh, kw, c_in, c_out), "b": (c_out,)}` for conv
(NHWC images), `{}` for pool and dropout. The hidden activation follows every conv and dense layer
but the last, which is dense and gives the output pre-activations. The spec says everything else
(activations, cost, initialiser) and is hashable, so it can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from digits import layers as layers_lib

HIDDEN_ACTIVATIONS = ("relu", "sigmoid", "tanh")
OUTPUT_ACTIVATIONS = ("softmax", "sigmoid")
COSTS = ("cross_entropy", "quadratic")
INITIALIZERS = ("uniform", "normal", "scaled_normal", "glorot", "he")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def parse_layers(text: str) -> tuple:
    """"conv5x5:20,maxpool2,dense:10" -> (Conv(5, 5, 20), Pool("max", 2), Dense(10))."""
    return tuple(layers_lib.parse_layer(token) for token in text.split(","))


def layers_text(layers) -> str:
    """The canonical `--layers` string of a stack; `parse_layers` reads it back."""
    return ",".join(layer.text for layer in layers)


def _input_shape(layers, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Images (H, W) become (H, W, 1) for a stack with conv or pool, and are flattened otherwise."""
    if any(isinstance(layer, (layers_lib.Conv, layers_lib.Pool)) for layer in layers):
        return shape + (1,) if len(shape) == 2 else shape
    return (math.prod(shape),)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The architecture and objective of a model.

    layers: the stack (layer objects, or a `--layers` string); input_shape: one example, no batch
    axis ((784,) for an MLP, (28, 28, 1) for a conv stack); activation: the hidden nonlinearity;
    output: the output nonlinearity; cost: per-example cost; l2: coefficient of the penalty
    0.5 * l2 * sum(w**2) over every weight (never biases).
    """

    layers: tuple
    input_shape: tuple[int, ...]
    activation: str = "relu"
    output: str = "softmax"
    cost: str = "cross_entropy"
    init: str = "uniform"
    init_scale: float = 0.5
    l2: float = 0.0

    def __post_init__(self):
        stack = parse_layers(self.layers) if isinstance(self.layers, str) else tuple(self.layers)
        object.__setattr__(self, "layers", stack)
        _check(len(stack) >= 1, "layers must not be empty")
        for layer in stack:
            _check(isinstance(layer, layers_lib.LAYER_KINDS), f"not a layer: {layer!r}")
        _check(isinstance(stack[-1], layers_lib.Dense), f"{stack[-1].text}: the last layer must be dense:N")
        shape = tuple(int(n) for n in self.input_shape)
        _check(len(shape) in (1, 2, 3) and min(shape) >= 1, f"bad input_shape {self.input_shape}")
        object.__setattr__(self, "input_shape", _input_shape(stack, shape))
        _check(self.activation in HIDDEN_ACTIVATIONS, f"unknown activation {self.activation!r}")
        _check(self.output in OUTPUT_ACTIVATIONS, f"unknown output {self.output!r}")
        _check(self.cost in COSTS, f"unknown cost {self.cost!r}")
        _check(self.init in INITIALIZERS, f"unknown init {self.init!r}")
        _check(math.isfinite(self.init_scale), f"init_scale must be finite, got {self.init_scale}")
        _check(math.isfinite(self.l2) and self.l2 >= 0, f"l2 must be >= 0 and finite, got {self.l2}")
        self.shapes  # walks the stack: raises on a kernel or window larger than its input

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        """Each layer's output shape for one example."""
        shapes, shape = [], self.input_shape
        for layer in self.layers:
            _check(len(shape) == 3 or not isinstance(layer, (layers_lib.Conv, layers_lib.Pool)),
                   f"{layer.text}: needs an image input (H, W, C), got {shape}")
            shape = layer.output_shape(shape)
            shapes.append(shape)
        return tuple(shapes)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_classes(self) -> int:
        return self.layers[-1].units

    @property
    def has_dropout(self) -> bool:
        """Whether training needs a dropout key (evaluation never drops)."""
        return any(isinstance(layer, layers_lib.Dropout) for layer in self.layers)

    @property
    def is_mlp(self) -> bool:
        return all(isinstance(layer, layers_lib.Dense) for layer in self.layers)

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        """(n_in, hidden..., n_out) of an all-dense stack."""
        _check(self.is_mlp, f"layer_sizes is defined only for all-dense stacks, not {layers_text(self.layers)}")
        return self.input_shape + tuple(layer.units for layer in self.layers)

    def activated(self, index: int) -> bool:
        """Whether the hidden activation follows layer `index` (every conv and dense but the last)."""
        return self.layers[index].activated and index < len(self.layers) - 1


def MLPSpec(layer_sizes=(784, 10, 10), activation="relu", output="softmax", cost="cross_entropy",
            init="uniform", init_scale=0.5, l2=0.0) -> ModelSpec:
    """A multilayer perceptron (784, hidden..., 10): a ModelSpec of dense layers."""
    sizes = tuple(int(n) for n in layer_sizes)
    _check(len(sizes) >= 2 and min(sizes) >= 1, f"bad layer_sizes {sizes}")
    return ModelSpec(tuple(layers_lib.Dense(n) for n in sizes[1:]), sizes[:1], activation, output, cost, init,
                     init_scale, l2)


def spec_from_text(layers_text: str, input_shape, activation="relu", output="softmax", cost="cross_entropy",
                   init="uniform", init_scale=0.5, l2=0.0) -> ModelSpec:
    """A ModelSpec from a `--layers` string; input_shape (H, W), (H, W, C) or (N,) per example."""
    return ModelSpec(parse_layers(layers_text), tuple(input_shape), activation, output, cost, init, init_scale, l2)


def init(key: jax.Array, spec: ModelSpec, dtype=jnp.float32) -> list[dict[str, jax.Array]]:
    """Returns params, one dict per layer. The j-th layer with params draws w from keys[2j] and b
    from keys[2j + 1] of split(key, 2 * (number of layers with params)), so an MLP's init is that
    of the original all-dense network."""
    keys = jax.random.split(key, 2 * sum(layer.has_params for layer in spec.layers))
    params, j = [], 0
    for layer, in_shape in zip(spec.layers, (spec.input_shape,) + spec.shapes[:-1]):
        params.append(layer.init(keys[2 * j], keys[2 * j + 1], in_shape, spec.init, spec.init_scale, dtype)
                      if layer.has_params else {})
        j += layer.has_params
    return params


def activate(z: jax.Array, name: str) -> jax.Array:
    """Applies a nonlinearity by name; softmax runs over the last axis."""
    if name == "relu":
        # where, not maximum: jax.grad of maximum gives 1/2 at z == 0, which is common in conv nets
        # (zero biases on black background); backprop and jax.grad both use relu'(0) = 0.
        return jnp.where(z > 0, z, 0)
    if name == "sigmoid":
        return jax.nn.sigmoid(z)
    if name == "tanh":
        return jnp.tanh(z)
    if name == "softmax":
        return jax.nn.softmax(z, axis=-1)
    raise ValueError(f"unknown activation {name!r}")


class Forward(NamedTuple):
    """What the backward pass needs: inputs[l] is a_{l-1} (layer l's input, after the previous
    layer's activation), caches[l] what layer l's backward needs, logits the output z_L."""

    inputs: list
    caches: list
    logits: jax.Array


def forward(params, x: jax.Array, spec: ModelSpec, dropout_key=None) -> Forward:
    """x: (B, *input_shape) -> Forward. Dropout is active iff dropout_key is given; layer l draws
    its mask from fold_in(dropout_key, l)."""
    inputs, caches, a = [], [], x
    for index, (layer, layer_params) in enumerate(zip(spec.layers, params)):
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
        inputs.append(a)
        a, cache = layer.forward(layer_params, a, key)
        caches.append(cache)
        if spec.activated(index):
            a = activate(a, spec.activation)
    return Forward(inputs, caches, a)


def logits(params, x: jax.Array, spec: ModelSpec, dropout_key=None) -> jax.Array:
    """x: (B, *input_shape) -> output pre-activations (B, num_classes); argmax is the prediction."""
    return forward(params, x, spec, dropout_key).logits


def apply(params, x: jax.Array, spec: ModelSpec) -> jax.Array:
    """x: (B, *input_shape) -> output activations (B, num_classes), no dropout."""
    return activate(logits(params, x, spec), spec.output)


def inputs(images: jax.Array, spec: ModelSpec, dtype=jnp.float32) -> jax.Array:
    """uint8 (B, H, W), (B, H*W) or (B, H, W, C) -> float (B, *spec.input_shape) in [0, 1].
    Runs inside compiled steps."""
    return images.reshape((images.shape[0],) + spec.input_shape).astype(dtype) / 255.0
