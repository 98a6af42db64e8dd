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


def test_scale_images_maps_uint8_to_unit_interval():
    images = jnp.array([[[0, 255], [51, 102]]], jnp.uint8)
    chex.assert_trees_all_close(model.scale_images(images), jnp.array([[0.0, 1.0, 0.2, 0.4]]), atol=1e-7)


def test_invalid_spec_is_rejected():
    with pytest.raises(ValueError, match="activation"):
        model.MLPSpec((784, 10), activation="gelu")


@pytest.mark.parametrize("output,cost", [("softmax", "cross_entropy"), ("sigmoid", "cross_entropy"), ("softmax", "quadratic")])
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
