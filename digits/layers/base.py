"""What every layer kind shares: the `Layer` defaults, the registry of kinds by token name, the
`--layers` grammar, and the import of users' layer modules.

A layer kind is one frozen dataclass registered under its token name; everything else about it
(its token's arguments, shape inference, init, forward, the hand-derived backward) comes from
the class. Its methods, each with a default here:

    output_shape(in_shape)                  per-example shapes, no batch axis (default: identity)
    init(key, in_shape, dtype)              -> params dict (default: {}, no params)
    forward(params, x, key=None)            -> (y, cache): the output and what backward needs
    backward(params, cache, dy, need_dx)    -> (grads like params, dx or None)

and, for kinds with model state (batch-norm statistics), `init_state`, `next_state`,
`infer_forward` and `backward_infer`; `predict(params, state, x)`, evaluation's output alone,
for a kind whose output costs less without its cache (max-pool). A kind whose training forward is random sets
`uses_key = True` and draws from `key`. A kind with arguments declares them as dataclass
fields; the token `name:a:b` fills them
in order, converted by their annotated types (`leaky_relu:0.2` for a field `alpha: float`).
Built-in kinds may take more from the model spec in `init` (keyword arguments named in
`SPEC_INIT_ARGUMENTS`); a user kind that takes only `(key, in_shape, dtype)` gets only those.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import inspect
import pathlib
import re
import sys
import typing
from typing import ClassVar

from jax import lax

# Keyword arguments a built-in `init` may declare, filled from the model spec by `model.init`.
SPEC_INIT_ARGUMENTS = ("bias_key", "init", "init_scale")

_REGISTRY: dict[str, type] = {}


def fail(token: str, message: str):
    raise ValueError(f"{token}: {message}")


def required(method):
    """Marks a method every registered kind must define itself: `register` refuses a class that
    inherits this placeholder (so it is never called)."""
    method.required = True
    return method


@dataclasses.dataclass(frozen=True)
class Layer:
    """The defaults of a layer kind. Subclass it as a frozen dataclass and `register` it."""

    name: ClassVar[str] = ""  # the token name, set by `register`
    activated: ClassVar[bool] = False  # the implicit --activation follows it (dense, conv, res)
    is_activation: ClassVar[bool] = False  # naming one in a stack turns the implicit activation off
    needs_image: ClassVar[bool] = False  # its input must be (H, W, C)
    token_usage: ClassVar[str] = ""  # the token's form for --help, when not derived from the fields
    stateful: ClassVar[bool] = False  # keeps model state (init_state / next_state / infer_forward)
    uses_key: ClassVar[bool] = False  # its training forward draws from `key` (dropout)

    # --- the token --------------------------------------------------------------------------

    @classmethod
    def matches(cls, head: str) -> bool:
        """Whether a token's head (the text before its first ':') names this kind."""
        return head == cls.name

    @classmethod
    def from_token(cls, token: str) -> Layer:
        """`name:a:b` -> cls(a, b), each converted by its field's annotated type."""
        args = token.split(":")[1:]
        fields = dataclasses.fields(cls)
        if len(args) > len(fields):
            fail(token, f"takes at most {len(fields)} argument(s) ({cls.usage()})")
        hints = typing.get_type_hints(cls)
        values = []
        for f, text in zip(fields, args, strict=False):  # trailing fields keep their defaults
            kind = hints[f.name]
            try:
                values.append(kind(text) if kind in (int, float, str) else text)
            except ValueError:
                fail(token, f"{f.name} must be {'an integer' if kind is int else 'a number'}, got {text!r}")
        try:
            return cls(*values)
        except TypeError as e:  # a required field without its argument
            fail(token, f"{' '.join(str(e).split())} ({cls.usage()})")

    @classmethod
    def usage(cls) -> str:
        """The token's form for --help and errors, e.g. `leaky_relu[:alpha]`."""
        if cls.token_usage:
            return cls.token_usage
        parts = [cls.name]
        for f in dataclasses.fields(cls):
            optional = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            parts.append(f"[:{f.name}]" if optional else f":{f.name}")
        return "".join(parts)

    @property
    def text(self) -> str:
        """The canonical token; `parse_stack` reads it back to an equal layer."""
        values = [getattr(self, f.name) for f in dataclasses.fields(self)]
        defaults = [f.default for f in dataclasses.fields(self)]
        while values and values[-1] == defaults[len(values) - 1]:  # trailing defaults are implied
            values.pop()
        return ":".join([self.name] + [repr(v) if isinstance(v, float) else str(v) for v in values])

    # --- the computation ------------------------------------------------------------------

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        return in_shape

    def init(self, key, in_shape: tuple[int, ...], dtype) -> dict:
        return {}

    @required
    def forward(self, params, x, key=None):
        """x: (B, *in_shape) -> (y (B, *out_shape), cache: what backward needs). Every kind's own."""

    @required
    def backward(self, params, cache, dy, need_dx: bool = True):
        """dy like y -> (grads like params, dx like x, or None without need_dx). Every kind's own."""

    def init_state(self, in_shape: tuple[int, ...], dtype) -> dict:
        """Model state that is not trained (e.g. running statistics); {} for most kinds."""
        return {}

    def next_state(self, state: dict, cache) -> dict:
        """The state after a training step, from the training forward pass's cache."""
        return state

    def infer_forward(self, params, state: dict, x):
        """Evaluation mode (no dropout, running statistics) -> (y, cache for backward_infer)."""
        return self.forward(params, x)

    def predict(self, params, state: dict, x):
        """Evaluation mode's output alone, `infer_forward`'s y, for evaluation and prediction,
        which differentiate nothing. A kind overrides it where y costs less without the cache
        (max-pool: no routing mask); its values must equal infer_forward's exactly."""
        return self.infer_forward(params, state, x)[0]

    def backward_infer(self, params, state: dict, cache, dy, need_dx: bool = True):
        """The backward pass of `infer_forward` (input gradients of a trained model: saliency)."""
        return self.backward(params, cache, dy, need_dx)

    def effective_text(self) -> str:
        """The token with implicit activations written in (blocks override it)."""
        return self.text

    def names_activation(self) -> bool:
        """Whether this layer is (blocks: holds) an activation layer, which turns the implicit one off."""
        return self.is_activation


def register(name: str):
    """Class decorator: registers a layer kind under its token name.

    Raises ValueError for a name already taken (by another class), a name that is not a word, or a
    class that is not a `Layer` or does not define every `required` method (`forward` and
    `backward`; an activation's `derivative`).
    """
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"layer name {name!r} must be lower-case letters, digits and _ (starting with a letter)")

    def decorate(cls):
        if not (isinstance(cls, type) and issubclass(cls, Layer)):
            raise ValueError(f"{name}: {cls!r} is not a subclass of digits.layers.Layer")
        missing = [m for m in dir(cls) if getattr(getattr(cls, m, None), "required", False) is True]
        if missing:
            raise ValueError(f"{name}: class {cls.__name__} lacks {' and '.join(missing)}")
        old = _REGISTRY.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"layer {name!r} is registered twice ({old.__module__}.{old.__qualname__} and "
                             f"{cls.__module__}.{cls.__qualname__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def registered() -> dict[str, type]:
    """Token name -> layer class, built-in and imported kinds alike."""
    return dict(_REGISTRY)


def usage() -> str:
    """Every registered token's form, for --help and error messages."""
    return ", ".join(cls.usage() for cls in _REGISTRY.values())


# --- the grammar ----------------------------------------------------------------------------------


def split_top_level(text: str) -> list[str]:
    """Splits on commas outside parentheses; ValueError on unbalanced parentheses."""
    tokens, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            raise ValueError(f"unbalanced ')' in {text!r}")
        if char == "," and depth == 0:
            tokens.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '(' in {text!r}")
    return tokens + [text[start:]]


def parse_layer(token: str) -> Layer:
    """One token of a `--layers` string -> a layer; ValueError naming the token if it is bad."""
    token = "".join(token.split())
    if m := re.fullmatch(r"([a-z][a-z0-9_]*)\((.*)\)", token):
        cls = _REGISTRY.get(m[1])
        if cls is None or not hasattr(cls, "from_children"):
            fail(token, f"{m[1]}(...) is not a block ({usage()})")
        if not m[2].strip():
            fail(token, "an empty block")
        return cls.from_children(token, parse_stack(m[2]))
    head = token.split(":")[0]
    for cls in _REGISTRY.values():
        if cls.matches(head):
            return cls.from_token(token)
    raise ValueError(f"unknown layer {token!r} (expected {usage()})")


def parse_stack(text: str) -> tuple:
    """"conv5x5:20,maxpool2,dense:10" -> (Conv(5, 5, 20), MaxPool(2), Dense(10))."""
    return tuple(parse_layer(token) for token in split_top_level(text))


def stack_text(layers) -> str:
    return ",".join(layer.text for layer in layers)


# --- users' modules -------------------------------------------------------------------------------


@functools.cache
def _import_one(module: str) -> None:
    path = pathlib.Path(module).expanduser()
    if module.endswith(".py") or path.is_file():
        if not path.is_file():
            raise ValueError(f"layer_modules: {module}: no such file")
        name = f"digits_user_layers.{path.resolve().stem}_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(name, path)
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[name] = loaded
        spec.loader.exec_module(loaded)
    else:
        importlib.import_module(module)


def import_modules(modules) -> None:
    """Imports layer modules (importable names or .py paths) once each, so their `register`ed
    kinds are usable in `--layers`. ValueError in one line naming the module and the problem."""
    for module in modules:
        try:
            _import_one(module)
        except ValueError as e:
            message = str(e)
            raise ValueError(message if message.startswith("layer_modules:") else
                             f"layer_modules: {module}: {message}") from None
        except Exception as e:  # noqa: BLE001 - anything a user's module raises is reported, in one line
            raise ValueError(f"layer_modules: cannot import {module}: {type(e).__name__}: "
                             f"{' '.join(str(e).split())}") from None


# --- data parallelism inside layers ---------------------------------------------------------------

_DATA_AXIS: list = []  # [(axis name, shards)] while tracing a data-parallel step


@contextlib.contextmanager
def data_axis(axis: str, shards: int):
    """While tracing under `jax.shard_map` with the batch split over `axis`: layers whose
    forward pass needs statistics of the whole batch (batch norm) all-reduce them over it."""
    _DATA_AXIS.append((axis, shards))
    try:
        yield
    finally:
        _DATA_AXIS.pop()


def batch_sum(value, axes: tuple[int, ...]):
    """value summed over `axes` of this device's slice and, in a data-parallel step, over every
    device's slice (the all-reduce, written out). Returns (sum, number of summed entries)."""
    count = 1
    for axis in axes:
        count *= value.shape[axis]
    total = value.sum(axis=axes)
    if _DATA_AXIS:
        axis, shards = _DATA_AXIS[-1]
        total, count = lax.psum(total, axis), count * shards
    return total, count


def init_accepts(layer) -> frozenset:
    """The SPEC_INIT_ARGUMENTS that `layer.init` declares."""
    names = inspect.signature(layer.init).parameters
    return frozenset(n for n in SPEC_INIT_ARGUMENTS if n in names)
