"""Hand-derived gradients agree with jax.grad for every activation x output x cost x depth."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from digits import backprop, losses, model

COMBINATIONS = [
    dict(testcase_name=f"{a}_{o}_{c}_{d}hidden", activation=a, output=o, cost=c, depth=d)
    for a, o, c, d in itertools.product(model.HIDDEN_ACTIVATIONS, model.OUTPUT_ACTIVATIONS, model.COSTS, (1, 3))
]


def _problem(depth, activation, output, cost, dtype, l2=0.0, batch=16, init="glorot"):
    spec = model.MLPSpec((784,) + (12,) * depth + (10,), activation, output, cost, init=init, l2=l2)
    params = model.init(jax.random.PRNGKey(depth), spec, dtype)
    x = jax.random.uniform(jax.random.PRNGKey(1), (batch, 784), dtype)
    labels = jax.random.randint(jax.random.PRNGKey(2), (batch,), 0, 10)
    return spec, params, (x, labels)


def _relative_error(manual, auto):
    diff = jax.tree.map(lambda m, a: m - a, manual, auto)

    def sq(t):
        return sum(float(jnp.sum(leaf.astype(jnp.float64) ** 2)) for leaf in jax.tree.leaves(t))

    return (sq(diff) / sq(auto)) ** 0.5


class BackpropVsAutodiffFloat64(parameterized.TestCase):
    """float64: manual and jax.grad agree to 1e-10 relative error, with and without jit."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        jax.config.update("jax_enable_x64", True)

    @classmethod
    def tearDownClass(cls):
        jax.config.update("jax_enable_x64", False)
        super().tearDownClass()

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*COMBINATIONS)
    def test_matches_jax_grad(self, activation, output, cost, depth):
        spec, params, batch = _problem(depth, activation, output, cost, jnp.float64, l2=1e-3)
        manual_fn = self.variant(lambda p, b: backprop.value_and_grad(p, b, spec))
        manual_loss, manual = manual_fn(params, batch)
        auto_loss, auto = jax.value_and_grad(losses.loss)(params, batch, spec)
        chex.assert_trees_all_equal_structs(manual, auto)
        chex.assert_trees_all_equal_shapes_and_dtypes(manual, auto)
        self.assertLessEqual(abs(float(manual_loss - auto_loss)), 1e-12 * max(1.0, abs(float(auto_loss))))
        self.assertLessEqual(_relative_error(manual, auto), 1e-10)


@pytest.mark.parametrize("activation", model.HIDDEN_ACTIVATIONS)
@pytest.mark.parametrize("output,cost",
                         [("softmax", "cross_entropy"), ("softmax", "quadratic"), ("sigmoid", "quadratic")])
def test_float32_matches_and_keeps_dtype(activation, output, cost):
    spec, params, batch = _problem(2, activation, output, cost, jnp.float32, l2=0.01, init="uniform")
    _, manual = backprop.value_and_grad(params, batch, spec)
    _, auto = jax.value_and_grad(losses.loss)(params, batch, spec)
    chex.assert_trees_all_equal_shapes_and_dtypes(manual, auto)
    chex.assert_trees_all_close(manual, auto, rtol=1e-4, atol=1e-6)


def test_output_delta_is_a_minus_y_for_softmax_cross_entropy():
    z = jnp.array([[1.0, 2.0, 0.5]])
    y = jnp.array([[0.0, 1.0, 0.0]])
    spec = model.MLPSpec((3, 3), output="softmax", cost="cross_entropy")
    chex.assert_trees_all_close(backprop.output_delta(z, y, spec), jax.nn.softmax(z) - y)


def test_l2_gradient_is_l2_times_w():
    spec, params, batch = _problem(1, "relu", "softmax", "cross_entropy", jnp.float32)
    _, plain = backprop.value_and_grad(params, batch, spec)
    spec_l2 = model.MLPSpec(spec.layer_sizes, spec.activation, spec.output, spec.cost, spec.init, l2=0.5)
    _, with_l2 = backprop.value_and_grad(params, batch, spec_l2)
    for layer, p, q in zip(params, plain, with_l2, strict=True):
        chex.assert_trees_all_close(q["w"] - p["w"], 0.5 * layer["w"], atol=1e-6)
        chex.assert_trees_all_close(q["b"], p["b"])


def test_conv_stack_float32_matches_and_keeps_dtype():
    spec = model.spec_from_text("conv3x3:3:same,maxpool2,conv3x3:2:s2,dropout:0.3,dense:10", (8, 8), init="he", l2=0.01)
    params = jax.jit(model.init, static_argnums=1)(jax.random.PRNGKey(0), spec)
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (6, 8, 8), np.uint8))
    batch = (model.inputs(images, spec), jnp.arange(6))
    both = jax.jit(lambda p, b, k: (backprop.value_and_grad(p, b, spec, k),
                                    backprop.autodiff_value_and_grad(p, b, spec, k)))
    (manual_loss, manual), (auto_loss, auto) = both(params, batch, jax.random.PRNGKey(2))
    chex.assert_trees_all_equal_shapes_and_dtypes(manual, auto)
    chex.assert_trees_all_equal_shapes_and_dtypes(manual, params)
    chex.assert_trees_all_close(manual_loss, auto_loss, rtol=1e-6)
    chex.assert_trees_all_close(manual, auto, rtol=1e-4, atol=1e-6)


def test_autodiff_value_and_grad_is_jax_grad_of_the_loss():
    spec, params, batch = _problem(1, "relu", "softmax", "cross_entropy", jnp.float32)
    chex.assert_trees_all_equal(backprop.autodiff_value_and_grad(params, batch, spec),
                                jax.value_and_grad(losses.loss)(params, batch, spec))


def test_manual_path_uses_no_autodiff():
    """The hand-derived functions (and every layer's backward) name no autodiff transformation."""
    import ast
    import importlib
    import inspect
    import pkgutil
    import textwrap

    from digits import layers
    from digits.layers import stack

    manual = [backprop.value_and_grad, backprop.output_delta, backprop.input_gradient, stack.forward, stack.backward]
    manual += [getattr(kind, method) for kind in layers.registered().values()
               for method in ("forward", "backward", "infer_forward", "backward_infer", "derivative", "next_state")
               if hasattr(kind, method)]
    transforms = {"grad", "vjp", "jvp", "value_and_grad", "linearize", "linear_transpose", "custom_vjp",
                  "custom_jvp", "autodiff_value_and_grad"}
    for function in manual:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
        body = tree.body[0].body  # not the function's own name
        nodes = [node for stmt in body for node in ast.walk(stmt)]
        attributes = {node.attr for node in nodes if isinstance(node, ast.Attribute)}  # jax.grad, losses.loss
        names = {node.id for node in nodes if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
        used = (attributes & (transforms | {"loss"})) | (names & transforms)
        assert not used, (function.__qualname__, used)
    modules = [importlib.import_module(f"digits.layers.{m.name}") for m in pkgutil.iter_modules(layers.__path__)]
    # (vjp offers a layer to JAX as a custom_vjp: that is its job, and it is not on the manual path)
    for module in [backprop] + [m for m in modules if m.__name__ != "digits.layers.vjp"]:
        tree = ast.parse(inspect.getsource(module))
        imported = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    for alias in node.names}
        assert not imported & transforms, (module.__name__, imported & transforms)
