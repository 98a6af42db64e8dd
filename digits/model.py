"""A model: a stack of layers (`digits.layers`) as a pure function of a parameter pytree, plus
model state for the kinds that keep some (batch-norm running statistics).

Params are a list with one dict per layer: `{"w": (n_in, n_out), "b": (n_out,)}` for dense
(batch-major, `z = a_prev @ w + b`), `{"w": (kh, kw, c_in, c_out), "b": (c_out,)}` for conv
(NHWC images), `{"gamma", "beta"}` for normalization, `{"body": [...], "proj": {...}}` for a
residual block, `{}` for pool, dropout and activations. Model state has the same list shape
(`{"mean", "var"}` for batch norm, `{}` elsewhere). The hidden activation (`activation`) follows
every conv and dense layer but the last, unless the stack names activation layers itself; the
last layer gives the output pre-activations (logits). The spec is hashable, so it can be a
static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from digits import layers as layers_lib
from digits.layers import stack

HIDDEN_ACTIVATIONS = ("relu", "sigmoid", "tanh", "leaky_relu", "gelu")
OUTPUT_ACTIVATIONS = ("softmax", "sigmoid")
COSTS = ("cross_entropy", "quadratic")
INITIALIZERS = ("uniform", "normal", "scaled_normal", "glorot", "he")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def parse_layers(text: str) -> tuple:
    """"conv5x5:20,maxpool2,dense:10" -> (Conv(5, 5, 20), MaxPool(2), Dense(10))."""
    return layers_lib.parse_stack(text)


def layers_text(layers) -> str:
    """The canonical `--layers` string of a stack; `parse_layers` reads it back."""
    return layers_lib.stack_text(layers)


def _input_shape(layers, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Images (H, W) become (H, W, 1) for a stack with image layers, and are flattened otherwise."""
    if any(layer.needs_image for layer in layers):
        return shape + (1,) if len(shape) == 2 else shape
    return (math.prod(shape),)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The architecture and objective of a model.

    layers: the stack (layer objects, or a `--layers` string); input_shape: one example, no batch
    axis ((784,) for an MLP, (28, 28, 1) for a conv stack); activation: the implicit hidden
    nonlinearity (ignored when the stack names activation layers); output: the output
    nonlinearity; cost: per-example cost; l2: coefficient of the penalty 0.5 * l2 * sum(w**2)
    over every weight named "w" (dense, conv, projections; never biases or normalization scales);
    label_smoothing: s, training targets (1 - s) one_hot + s / C (`losses.targets`).
    """

    layers: tuple
    input_shape: tuple[int, ...]
    activation: str = "relu"
    output: str = "softmax"
    cost: str = "cross_entropy"
    init: str = "uniform"
    init_scale: float = 0.5
    l2: float = 0.0
    label_smoothing: float = 0.0

    def __post_init__(self):
        stack_ = parse_layers(self.layers) if isinstance(self.layers, str) else tuple(self.layers)
        _check(len(stack_) >= 1, "layers must not be empty")
        for layer in stack_:
            _check(isinstance(layer, layers_lib.Layer), f"not a layer: {layer!r}")
        _check(self.activation in HIDDEN_ACTIVATIONS, f"unknown activation {self.activation!r}")
        implicit = self.implicit_activation_for(stack_)
        stack_ = tuple(layer.with_activation(implicit) if hasattr(layer, "with_activation") else layer
                       for layer in stack_)
        object.__setattr__(self, "layers", stack_)
        shape = tuple(int(n) for n in self.input_shape)
        _check(len(shape) in (1, 2, 3) and min(shape) >= 1, f"bad input_shape {self.input_shape}")
        object.__setattr__(self, "input_shape", _input_shape(stack_, shape))
        _check(self.output in OUTPUT_ACTIVATIONS, f"unknown output {self.output!r}")
        _check(self.cost in COSTS, f"unknown cost {self.cost!r}")
        _check(self.init in INITIALIZERS, f"unknown init {self.init!r}")
        _check(math.isfinite(self.init_scale), f"init_scale must be finite, got {self.init_scale}")
        _check(math.isfinite(self.l2) and self.l2 >= 0, f"l2 must be >= 0 and finite, got {self.l2}")
        _check(0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        out = self.shapes[-1]  # walks the stack: raises on a kernel or window larger than its input
        # The logits come from a learned layer (dense, or a user kind the activation would follow).
        _check(len(out) == 1 and stack_[-1].activated,
               f"{stack_[-1].text}: the last layer must be dense:N, N logits (one per class)")

    def implicit_activation_for(self, layers) -> layers_lib.Layer | None:
        """The --activation layer, or None when the stack names activation layers itself."""
        if any(layer.names_activation() for layer in layers):
            return None
        return layers_lib.implicit(self.activation)

    @property
    def implicit_activation(self) -> layers_lib.Layer | None:
        return self.implicit_activation_for(self.layers)

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        """Each layer's output shape for one example."""
        return stack.output_shapes(self.layers, self.input_shape)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_classes(self) -> int:
        return self.shapes[-1][0]

    @property
    def has_dropout(self) -> bool:
        """Whether training needs a key (dropout; evaluation never drops)."""
        return any(layer.uses_key for layer in self.layers)

    @property
    def stateful(self) -> bool:
        """Whether the model keeps state besides its params (batch-norm statistics)."""
        return any(layer.stateful for layer in self.layers)

    @property
    def is_mlp(self) -> bool:
        return all(layer.name == "dense" for layer in self.layers)

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        """(n_in, hidden..., n_out) of an all-dense stack."""
        _check(self.is_mlp, f"layer_sizes is defined only for all-dense stacks, not {layers_text(self.layers)}")
        return self.input_shape + tuple(layer.units for layer in self.layers)

    @property
    def effective_text(self) -> str:
        """The stack with its implicit activations written in, e.g. conv5x5:20,relu,maxpool2,dense:10."""
        return stack.effective_text(self.layers, self.implicit_activation)

    def activated(self, index: int) -> bool:
        """Whether the implicit activation follows layer `index`."""
        return stack.implicit_flags(self.layers, self.implicit_activation)[index]


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
    return stack.init(spec.layers, spec.input_shape, key, dtype, {"init": spec.init, "init_scale": spec.init_scale})


def init_state(spec: ModelSpec, dtype=jnp.float32) -> list[dict[str, jax.Array]]:
    """The model state of a fresh model: one dict per layer, {} for layers without state."""
    return stack.init_state(spec.layers, spec.input_shape, dtype)


def activate(z: jax.Array, name: str) -> jax.Array:
    """The output nonlinearity by name (softmax over the last axis, or sigmoid)."""
    if name == "softmax":
        return jax.nn.softmax(z, axis=-1)
    if name == "sigmoid":
        return jax.nn.sigmoid(z)
    raise ValueError(f"unknown output activation {name!r}")


class Forward(NamedTuple):
    """What the backward pass needs: caches[l] = (layer l's cache, its implicit activation's or
    None); logits the output z_L."""

    caches: list
    logits: jax.Array


def forward(params, x: jax.Array, spec: ModelSpec, dropout_key=None, state=None) -> Forward:
    """x: (B, *input_shape) -> Forward. Training mode without `state` (batch statistics; dropout
    iff dropout_key is given, layer l drawing from fold_in(dropout_key, l)); evaluation mode
    (running statistics, no dropout) with it."""
    z, caches = stack.forward(spec.layers, spec.implicit_activation, params, x, dropout_key, state)
    return Forward(caches, z)


def next_state(spec: ModelSpec, state, fwd: Forward):
    """The model state after a training step whose forward pass was `fwd`."""
    return stack.next_state(spec.layers, state, fwd.caches)


def logits(params, x: jax.Array, spec: ModelSpec, dropout_key=None, state=None) -> jax.Array:
    """x: (B, *input_shape) -> output pre-activations (B, num_classes); argmax is the prediction."""
    return forward(params, x, spec, dropout_key, state).logits


def predict_logits(params, x: jax.Array, spec: ModelSpec, state=None) -> jax.Array:
    """`logits` in evaluation mode, computed by each layer's `predict` (no caches, so cheaper;
    equal values): what evaluation and prediction use. Not for differentiating (`logits` is)."""
    return stack.predict(spec.layers, spec.implicit_activation, params, x, eval_state(spec, state))


def eval_state(spec: ModelSpec, state):
    """The state evaluation uses: the given one, or for a model without state its empty one
    (`init_state`: no arrays, but the structure that residual blocks walk)."""
    if state is None:
        _check(not spec.stateful, "this model keeps state (batch-norm statistics): pass it to evaluate the model")
        return init_state(spec)
    return state


def apply(params, x: jax.Array, spec: ModelSpec, state=None) -> jax.Array:
    """x: (B, *input_shape) -> output activations (B, num_classes), evaluation mode (no dropout,
    running statistics: `state` is required for a model that keeps state)."""
    return activate(logits(params, x, spec, state=eval_state(spec, state)), spec.output)


def inputs(images: jax.Array, spec: ModelSpec, dtype=jnp.float32) -> jax.Array:
    """uint8 (B, H, W), (B, H*W) or (B, H, W, C) -> float (B, *spec.input_shape) in [0, 1].
    Runs inside compiled steps."""
    return images.reshape((images.shape[0],) + spec.input_shape).astype(dtype) / 255.0
