import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from digits import losses, model


@pytest.mark.parametrize("init", model.INITIALIZERS)
def test_init_shapes_and_statistics(init):
    spec = model.MLPSpec((784, 100, 10), init=init)
    params = model.init(jax.random.PRNGKey(0), spec)
    chex.assert_shape([params[0]["w"], params[0]["b"], params[1]["w"]], [(784, 100), (100,), (100, 10)])
    w = np.asarray(params[0]["w"])
    expected_std = {"uniform": 0.5 / 3 ** 0.5, "normal": 1.0, "scaled_normal": 784 ** -0.5,
                    "glorot": (2 / (784 + 100)) ** 0.5, "he": (2 / 784) ** 0.5}[init]
    assert abs(w.std() / expected_std - 1) < 0.05
    if init == "uniform":
        assert w.min() >= -0.5 and w.max() <= 0.5


def test_apply_outputs_probabilities_and_depth():
    spec = model.MLPSpec((784, 20, 20, 20, 10), activation="tanh")
    params = model.init(jax.random.PRNGKey(0), spec)
    probs = model.apply(params, jnp.ones((5, 784)) * 0.3, spec)
    chex.assert_shape(probs, (5, 10))
    chex.assert_trees_all_close(probs.sum(-1), jnp.ones(5), atol=1e-6)


def test_inputs_map_uint8_to_unit_interval_in_the_spec_shape():
    images = jnp.array([[[0, 255], [51, 102]]], jnp.uint8)
    mlp = model.MLPSpec((4, 3))
    chex.assert_trees_all_close(model.inputs(images, mlp), jnp.array([[0.0, 1.0, 0.2, 0.4]]), atol=1e-7)
    conv = model.spec_from_text("conv1x1:2,dense:3", (2, 2))
    expected = jnp.array([[[[0.0], [1.0]], [[0.2], [0.4]]]])
    chex.assert_trees_all_close(model.inputs(images, conv), expected, atol=1e-7)
    chex.assert_trees_all_close(model.inputs(images.reshape(1, 4), conv), expected, atol=1e-7)
    chex.assert_trees_all_close(model.inputs(images[..., None], conv), expected, atol=1e-7)
    assert model.inputs(images, conv, jnp.bfloat16).dtype == jnp.bfloat16


def test_mlp_init_is_the_original_formula():
    """keys = split(key, 2 * L); layer i draws w from keys[2i] and b from keys[2i + 1]."""
    key, spec = jax.random.PRNGKey(42), model.MLPSpec((784, 30, 10))
    keys = jax.random.split(key, 4)
    expected = [
        {"w": jax.random.uniform(keys[0], (784, 30), jnp.float32, -0.5, 0.5),
         "b": jax.random.uniform(keys[1], (30,), jnp.float32, -0.5, 0.5)},
        {"w": jax.random.uniform(keys[2], (30, 10), jnp.float32, -0.5, 0.5),
         "b": jax.random.uniform(keys[3], (10,), jnp.float32, -0.5, 0.5)},
    ]
    chex.assert_trees_all_equal(model.init(key, spec), expected)
    # Pool and dropout layers draw no keys: the dense layers of this stack init as above.
    spec2 = model.spec_from_text("dropout:0.5,dense:30,dropout:0.2,dense:10", (28, 28))
    params = model.init(key, spec2)
    chex.assert_trees_all_equal([params[1], params[3]], expected)
    assert params[0] == {} and params[2] == {}


def test_mlp_spec_is_a_model_spec_of_dense_layers():
    spec = model.MLPSpec((784, 30, 10), "tanh", l2=0.1)
    assert isinstance(spec, model.ModelSpec) and spec.is_mlp
    assert spec.layers == model.parse_layers("dense:30,dense:10") and spec.input_shape == (784,)
    assert spec.layer_sizes == (784, 30, 10) and spec.num_classes == 10 and spec.num_layers == 2
    assert spec.activation == "tanh" and spec.l2 == 0.1
    assert model.MLPSpec() == model.MLPSpec((784, 10, 10))


@pytest.mark.parametrize("init", ("scaled_normal", "glorot", "he"))
def test_conv_init_uses_the_receptive_field(init):
    spec = model.spec_from_text("conv5x5:64,dense:10", (5, 5, 8), init=init)
    params = jax.jit(model.init, static_argnums=1)(jax.random.PRNGKey(0), spec)
    chex.assert_shape([params[0]["w"], params[0]["b"], params[1]["w"]], [(5, 5, 8, 64), (64,), (64, 10)])
    fan_in, fan_out = 5 * 5 * 8, 5 * 5 * 64
    expected_std = {"uniform": 0.5 / 3 ** 0.5, "normal": 1.0, "scaled_normal": fan_in ** -0.5,
                    "glorot": (2 / (fan_in + fan_out)) ** 0.5, "he": (2 / fan_in) ** 0.5}[init]
    assert abs(np.asarray(params[0]["w"]).std() / expected_std - 1) < 0.05


def test_conv_stack_forward_shapes():
    spec = model.spec_from_text("conv3x3:4:same,maxpool2,conv3x3:2:s2,dropout:0.5,dense:5", (9, 9))
    params = jax.eval_shape(lambda key: model.init(key, spec), jax.random.PRNGKey(0))
    x = jnp.ones((2, 9, 9, 1))
    forward = jax.eval_shape(lambda p, x: model.forward(p, x, spec, jax.random.PRNGKey(0)), params, x)
    assert spec.shapes == ((9, 9, 4), (4, 4, 4), (1, 1, 2), (1, 1, 2), (5,))
    chex.assert_shape(forward.logits, (2, 5))
    chex.assert_shape(jax.eval_shape(lambda p, x: model.apply(p, x, spec), params, x), (2, 5))


@pytest.mark.parametrize("kwargs,message", [
    (dict(activation="swish"), "activation"), (dict(output="relu"), "output"), (dict(cost="hinge"), "cost"),
    (dict(init="zeros"), "init"), (dict(l2=-1.0), "l2"), (dict(l2=float("inf")), "l2"),
    (dict(layer_sizes=(784,)), "layer_sizes"), (dict(layer_sizes=(784, 0, 10)), "layer_sizes"),
])
def test_invalid_spec_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        model.MLPSpec(**{"layer_sizes": (784, 10), **kwargs})


@pytest.mark.parametrize("output,cost",
                         [("softmax", "cross_entropy"), ("sigmoid", "cross_entropy"), ("softmax", "quadratic")])
def test_costs_match_their_textbook_formulas(output, cost):
    z = jnp.array([[0.2, -1.0, 3.0], [1.0, 0.0, -2.0]])
    y = jax.nn.one_hot(jnp.array([2, 0]), 3)
    spec = model.MLPSpec((3, 3), output=output, cost=cost)
    a = model.activate(z, output)
    expected = {
        ("softmax", "cross_entropy"): -jnp.sum(y * jnp.log(a), -1),
        ("sigmoid", "cross_entropy"): -jnp.sum(y * jnp.log(a) + (1 - y) * jnp.log(1 - a), -1),
        ("softmax", "quadratic"): 0.5 * jnp.sum((a - y) ** 2, -1),
    }[(output, cost)].mean()
    chex.assert_trees_all_close(losses.cost_from_logits(z, y, spec), expected, rtol=1e-6)
