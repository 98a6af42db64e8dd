"""Any registered layer as a `jax.custom_vjp` function, built from its forward and backward.

`as_function(layer)(params, x)` computes `layer.forward(params, x, key)[0]`; differentiated by
`jax.grad` or `jax.vjp`, it runs the layer's hand-derived backward instead of JAX's own rule, so
a hand-derived layer can sit inside any JAX program (and `jax.test_util.check_grads(...,
modes=["rev"])` checks it against finite differences).
"""

from __future__ import annotations

import jax


def _is_array(leaf) -> bool:
    return isinstance(leaf, jax.Array) or hasattr(leaf, "dtype") and hasattr(leaf, "shape")


def as_function(layer, key=None):
    """(params, x) -> y, with the layer's backward as its VJP (training mode; key: dropout)."""
    static = {}  # the cache's non-array parts (shapes, counts), kept out of the residuals

    @jax.custom_vjp
    def apply(params, x):
        return layer.forward(params, x, key)[0]

    def forward(params, x):
        y, cache = layer.forward(params, x, key)
        leaves, static["tree"] = jax.tree.flatten(cache)
        static["constants"] = [None if _is_array(leaf) else leaf for leaf in leaves]
        return y, (params, [leaf for leaf in leaves if _is_array(leaf)])

    def backward(residuals, dy):
        params, arrays = residuals
        arrays = iter(arrays)
        leaves = [next(arrays) if constant is None else constant for constant in static["constants"]]
        grads, dx = layer.backward(params, jax.tree.unflatten(static["tree"], leaves), dy, True)
        return grads, dx

    apply.defvjp(forward, backward)
    return apply
