"""Layer kinds: for each, `init`, `forward` and the hand-derived `backward`, side by side.

A layer kind is one class registered under its token name (`register`); the built-in families
live one a module (dense, conv, pool, dropout, activations, normalization, residual) and users'
modules (`--layer_modules`) add kinds the same way. See `base` for the contract and the grammar,
`stack` for the walks over a stack that the model and residual blocks share.

The backward functions use no autodiff: `tests/test_backprop.py` reads their source to check.
"""

from digits.layers.activations import Gelu, LeakyRelu, Relu, Sigmoid, Tanh, implicit
from digits.layers.base import (
    Layer,
    batch_sum,
    data_axis,
    import_modules,
    parse_layer,
    parse_stack,
    register,
    registered,
    split_top_level,
    stack_text,
    usage,
)
from digits.layers.conv import Conv
from digits.layers.dense import Dense
from digits.layers.dropout import Dropout
from digits.layers.normalization import BatchNorm, LayerNorm
from digits.layers.pool import AvgPool, GlobalAvgPool, MaxPool, Pool
from digits.layers.residual import Residual
from digits.layers.vjp import as_function

__all__ = ["Layer", "register", "registered", "parse_layer", "parse_stack", "split_top_level", "stack_text", "usage",
           "import_modules", "data_axis", "batch_sum", "as_function", "implicit", "Dense", "Conv", "Pool", "MaxPool",
           "AvgPool", "GlobalAvgPool", "Dropout", "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Gelu", "BatchNorm",
           "LayerNorm", "Residual"]
