"""Every layer kind's hand-derived backward agrees with jax.grad of its forward, alone and in
stacks with awkward shapes; parsing of `--layers` strings and its one-line errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from digits import backprop, layers, model


@pytest.fixture(autouse=True, scope="module")
def float64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def _relative_error(manual, auto):
    diff = jax.tree.map(lambda m, a: m - a, manual, auto)

    def sq(t):
        return sum(float(jnp.sum(leaf.astype(jnp.float64) ** 2)) for leaf in jax.tree.leaves(t))

    return (sq(diff) / sq(auto)) ** 0.5


def _problem(text, input_shape, batch=3, activation="tanh", output="softmax", cost="cross_entropy", l2=1e-3):
    """Params and inputs drawn with numpy: eager jax.random would compile once per new shape."""
    spec = model.spec_from_text(text, input_shape, activation, output, cost, init="glorot", l2=l2)
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda key: model.init(key, spec, jnp.float64), jax.random.PRNGKey(0))
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) / np.sqrt(s.shape[0] if s.ndim == 2 else
                                                                                    np.prod(s.shape[:-1]))), shapes)
    x = jnp.asarray(rng.uniform(-0.3, 0.7, (batch,) + spec.input_shape))
    labels = jnp.asarray(rng.integers(0, spec.num_classes, batch))
    return spec, params, (x, labels)


@jax.jit(static_argnums=0)
def _layer_vs_vjp(layer, params, x, key=None):
    """(manual grads, manual dx) and (autodiff grads, autodiff dx) for a random dy."""
    y, cache = layer.forward(params, x, key)
    dy = jax.random.normal(jax.random.PRNGKey(7), y.shape, y.dtype)
    manual = layer.backward(params, cache, dy)
    _, vjp = jax.vjp(lambda p, a: layer.forward(p, a, key)[0], params, x)
    return manual, vjp(dy)


# Each layer alone: (name, layer, per-example input shape, batch).
SINGLE_LAYERS = [
    ("dense_flattens_images", layers.Dense(3), (5, 4, 2), 2),
    ("conv_non_square_batch1", layers.Conv(3, 5, 2), (8, 9, 1), 1),
    ("conv_stride2_remainder", layers.Conv(3, 3, 2, stride=2), (8, 7, 3), 3),
    ("conv_same_stride2", layers.Conv(3, 3, 2, stride=2, padding="same"), (7, 8, 2), 2),
    ("conv_same_even_kernel_larger_than_input", layers.Conv(4, 2, 3, padding="same"), (3, 5, 2), 2),
    ("conv_1x1_one_filter", layers.Conv(1, 1, 1), (4, 4, 3), 2),
    ("maxpool2_odd", layers.MaxPool(2), (7, 7, 2), 2),
    ("maxpool3_batch1", layers.MaxPool(3), (6, 8, 1), 1),
    ("avgpool3_odd", layers.AvgPool(3), (7, 7, 2), 2),
    ("dropout", layers.Dropout(0.4), (5, 3, 2), 2),
]


@pytest.mark.parametrize("layer,shape,batch", [case[1:] for case in SINGLE_LAYERS],
                         ids=[case[0] for case in SINGLE_LAYERS])
def test_each_layer_backward_matches_vjp(layer, shape, batch):
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda key: layer.init(key, shape, jnp.float64), jax.random.PRNGKey(0))
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape)), shapes)
    x = jnp.asarray(rng.normal(size=(batch,) + shape))
    (grads, dx), (auto_grads, auto_dx) = _layer_vs_vjp(layer, params, x, jax.random.PRNGKey(5))
    chex.assert_shape(dx, x.shape)
    chex.assert_trees_all_equal_shapes_and_dtypes((grads, dx), (auto_grads, auto_dx))
    assert _relative_error((grads, dx), (auto_grads, auto_dx)) <= 1e-10


def test_input_layer_skips_dx():
    layer, x, dy = layers.Conv(3, 3, 2), jnp.ones((2, 5, 5, 1)), jnp.ones((2, 3, 3, 2))
    params = {"w": jnp.ones((3, 3, 1, 2)), "b": jnp.ones(2)}
    grads, dx = jax.eval_shape(lambda p: layer.backward(p, layer.forward(p, x)[1], dy, need_dx=False), params)
    assert dx is None
    chex.assert_trees_all_equal_shapes_and_dtypes(grads, params)


def test_conv_forward_matches_lax_conv():
    """The im2col forward computes what lax.conv computes, strides and `same` padding included,
    in training and in evaluation mode (the same forward, the same cache)."""
    for layer in (layers.Conv(3, 2, 4, stride=2, padding="same"), layers.Conv(4, 4, 3, stride=3)):
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.normal(size=(2, 9, 8, 3)))
        params = {"w": jnp.asarray(rng.normal(size=(layer.kh, layer.kw, 3, layer.filters))),
                  "b": jnp.asarray(rng.normal(size=layer.filters))}
        expected = jax.lax.conv_general_dilated(x, params["w"], (layer.stride,) * 2, layer.padding.upper(),
                                                dimension_numbers=("NHWC", "HWIO", "NHWC")) + params["b"]
        y, cache = jax.jit(layer.forward)(params, x)
        chex.assert_trees_all_close(y, expected, rtol=1e-12)
        y_infer, cache_infer = jax.jit(layer.infer_forward)(params, {}, x)
        chex.assert_trees_all_close(y_infer, expected, rtol=1e-12)
        chex.assert_trees_all_equal(cache_infer, cache)


@jax.jit(static_argnums=2)
def _both(params, batch, spec, key):
    """Manual and automatic (loss, grads), compiled together: one compilation per case."""
    return backprop.value_and_grad(params, batch, spec, key), backprop.autodiff_value_and_grad(params, batch, spec, key)


STACKS = [
    dict(testcase_name="nielsen_small", text="conv3x3:4,maxpool2,conv3x3:3,maxpool2,dense:6,dense:5", shape=(12, 12),
         activation="relu"),
    dict(testcase_name="strided_same_avgpool_quadratic", text="conv3x3:3:s2:same,avgpool3,dense:4", shape=(7, 7, 2),
         activation="sigmoid", output="softmax", cost="quadratic"),
    dict(testcase_name="one_filter_odd_pools_sigmoid_out", text="conv2x2:1:same,maxpool2,conv3x5:2:s3:same,dense:3",
         shape=(7, 7, 1), output="sigmoid"),
    dict(testcase_name="dropout_everywhere", text="conv4x4:2:s3,dropout:0.3,dense:6,dropout:0.5,dense:3",
         shape=(10, 11, 2)),
    dict(testcase_name="mlp_with_dropout_batch1", text="dense:5,dropout:0.5,dense:4", shape=(4, 4), batch=1,
         output="sigmoid", cost="quadratic"),
]


class StacksFloat64(parameterized.TestCase):
    """float64: manual and jax.grad agree to 1e-10 relative error on whole stacks."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.x64 = jax.config.read("jax_enable_x64")
        jax.config.update("jax_enable_x64", True)

    @classmethod
    def tearDownClass(cls):
        jax.config.update("jax_enable_x64", cls.x64)
        super().tearDownClass()

    def _check(self, spec, params, batch, key, manual_fn=None):
        if manual_fn:
            (manual_loss, manual), (auto_loss, auto) = manual_fn(params, batch, key), _both(params, batch, spec, key)[1]
        else:
            (manual_loss, manual), (auto_loss, auto) = _both(params, batch, spec, key)
        chex.assert_trees_all_equal_structs(manual, auto)
        chex.assert_trees_all_equal_shapes_and_dtypes(manual, auto)
        self.assertLessEqual(abs(float(manual_loss - auto_loss)), 1e-12 * max(1.0, abs(float(auto_loss))))
        self.assertLessEqual(_relative_error(manual, auto), 1e-10)

    @chex.variants(with_jit=True, without_jit=True)
    def test_small_stack_with_dropout(self):
        spec, params, batch = _problem("conv3x3:2,dropout:0.5,maxpool2,dense:3", (6, 6), activation="relu")
        manual = self.variant(lambda p, b, k: backprop.value_and_grad(p, b, spec, k))
        self._check(spec, params, batch, jax.random.PRNGKey(9), manual)

    @parameterized.named_parameters(*STACKS)
    def test_stack(self, text, shape, batch=3, activation="tanh", output="softmax", cost="cross_entropy"):
        spec, params, batch = _problem(text, shape, batch, activation, output, cost)
        self._check(spec, params, batch, jax.random.PRNGKey(9))


def test_maxpool_ties_route_to_the_first_maximum_exactly():
    """All-zero windows (as after a ReLU): the gradient goes to the window's first element in
    row-major order, by hand and under jax.grad alike."""
    pool = layers.MaxPool(2)
    x = np.zeros((2, 5, 4, 3))
    x[0, 1, 1, 0], x[1, 3, 3, 2] = 1.0, -1.0  # a strict maximum; a tie of zeros above a -1
    expected = np.zeros_like(x)
    expected[:, 0:4:2, 0:4:2, :] = 1.0  # the first element of every window (the 5th row is dropped)
    expected[0, 0, 0, 0], expected[0, 1, 1, 0] = 0.0, 1.0  # ... except where a strict maximum wins

    @jax.jit
    def manual_and_vjp(x):
        y, cache = pool.forward({}, x)
        dy = jnp.ones_like(y)
        return pool.backward({}, cache, dy)[1], jax.vjp(lambda a: pool.forward({}, a)[0], x)[1](dy)[0]

    dx, auto_dx = manual_and_vjp(jnp.asarray(x))
    np.testing.assert_array_equal(dx, expected)
    np.testing.assert_array_equal(auto_dx, expected)


def test_maxpool_ties_in_a_relu_stack_match_exactly():
    spec, params, (x, labels) = _problem("conv3x3:2,maxpool2,dense:3", (8, 8, 1), activation="relu", l2=0.0)
    params[0]["b"] = params[0]["b"] - 10.0  # every ReLU output, so every pool window, is zero
    assert not np.any(model.forward(params, x, spec).caches[0][1])  # the ReLU outputs
    (_, manual), (_, auto) = _both(params, (x, labels), spec, None)
    np.testing.assert_array_equal(manual[0]["w"], auto[0]["w"])  # both zero: nothing gets through
    assert _relative_error(manual[2]["b"], auto[2]["b"]) <= 1e-12


@pytest.mark.parametrize("text, shape", [
    ("conv3x3:3,maxpool2,conv2x2:4,maxpool3,dense:5", (17, 15, 1)),  # remainders dropped; ReLU ties of zeros
    ("conv3x3:4:same,batchnorm,relu,res(conv3x3:4:same,batchnorm,relu,conv3x3:6:same),maxpool2,dropout:0.5,dense:3",
     (8, 8, 2)),  # running statistics, a projected shortcut, dropout
    ("conv2x2:2,avgpool3,gap,dense:4", (7, 8, 1)),
    ("conv3x3:3:same,res(conv3x3:3:same,conv3x3:3:same),maxpool2,dense:4", (6, 6, 1)),  # a block, no state
])
def test_predict_gives_exactly_the_evaluation_forward(text, shape):
    """Evaluation runs each layer's `predict` (max-pool without its routing mask): the same
    logits, bit for bit, as the evaluation-mode forward that saliency differentiates, each
    compiled on its own as evaluation compiles it."""
    spec, params, (x, _) = _problem(text, shape, batch=6, activation="relu")
    rng = np.random.default_rng(1)
    state = jax.tree.map(lambda s: jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype), model.init_state(spec))
    state = state if spec.stateful else None  # (a model without state is evaluated with None)
    forward = jax.jit(lambda p, x: model.logits(p, x, spec, state=model.eval_state(spec, state)))(params, x)
    predict = jax.jit(lambda p, x: model.predict_logits(p, x, spec, state))(params, x)
    assert np.ptp(np.asarray(forward)) > 0
    np.testing.assert_array_equal(predict, forward)


def test_a_nan_is_the_maximum_of_its_window_in_training_and_evaluation():
    """A diverging net shows NaN after a max-pool in both passes (not a 0 from the window)."""
    pool = layers.MaxPool(2)
    x = jnp.asarray(np.array([1.0, np.nan, 3.0, 2.0, 5.0, 4.0, 0.0, -1.0]).reshape(1, 2, 4, 1))
    y, _ = jax.jit(pool.forward)({}, x)
    np.testing.assert_array_equal(y.reshape(-1), [np.nan, 3.0])  # windows {1, nan, 5, 4} and {3, 2, 0, -1}
    np.testing.assert_array_equal(jax.jit(pool.predict)({}, {}, x), y)


def test_avgpool_remainder_gets_no_gradient():
    pool = layers.AvgPool(3)
    x = jnp.ones((1, 7, 8, 1))
    y, cache = pool.forward({}, x)
    _, dx = pool.backward({}, cache, jnp.ones_like(y))
    np.testing.assert_array_equal(dx[0, :6, :6, 0], jnp.full((6, 6), 1 / 9))
    assert not np.any(dx[0, 6:]) and not np.any(dx[0, :, 6:])


class TestDropout:
    def test_same_key_same_mask_in_both_paths(self):
        spec, params, batch = _problem("dense:8,dropout:0.5,dense:3", (6,))
        key = jax.random.PRNGKey(3)
        (manual_loss, manual), (auto_loss, auto) = _both(params, batch, spec, key)
        assert float(manual_loss) == pytest.approx(float(auto_loss), rel=1e-12)
        assert _relative_error(manual, auto) <= 1e-10
        other_loss = _both(params, batch, spec, jax.random.PRNGKey(4))[0][0]
        assert float(other_loss) != float(manual_loss)

    def test_off_without_key_and_identity_at_rate_zero(self):
        spec, params, (x, _) = _problem("dense:8,dropout:0.5,dense:3", (6,))
        plain, _, _ = _problem("dense:8,dense:3", (6,))
        no_dropout = model.logits([params[0], params[2]], x, plain)
        np.testing.assert_array_equal(model.logits(params, x, spec), no_dropout)
        np.testing.assert_array_equal(model.apply(params, x, spec), model.apply([params[0], params[2]], x, plain))
        rate_zero, _, _ = _problem("dense:8,dropout:0.0,dense:3", (6,))
        np.testing.assert_array_equal(model.logits(params, x, rate_zero, jax.random.PRNGKey(1)), no_dropout)

    def test_inverted_scaling_keeps_the_mean(self):
        layer, x = layers.Dropout(0.3), jnp.ones((100, 100))
        y, _ = layer.forward({}, x, jax.random.PRNGKey(0))
        assert abs(float(y.mean()) - 1) < 0.03
        assert abs(float((y == 0).mean()) - 0.3) < 0.03
        np.testing.assert_allclose(np.unique(np.asarray(y)), [0, 1 / 0.7])

    def test_layers_draw_different_masks(self):
        spec, params, (x, _) = _problem("dropout:0.5,dropout:0.5,dense:2", (50,))
        forward = model.forward(params, x, spec, jax.random.PRNGKey(0))
        (first, _), (second, _) = forward.caches[0], forward.caches[1]
        assert not np.array_equal(first, second)


def test_parse_and_text_round_trip():
    text = "conv5x5:20,maxpool2,conv3x5:8:s2:same,avgpool3,dropout:0.25,dense:100,dense:10"
    stack = model.parse_layers(text)
    assert stack[2] == layers.Conv(3, 5, 8, stride=2, padding="same")
    assert model.layers_text(stack) == text
    reordered = model.parse_layers("conv3x3:8:same:s2, maxpool2 ,dense:3")
    assert reordered == model.parse_layers("conv3x3:8:s2:same,maxpool2,dense:3")
    assert model.layers_text(model.parse_layers("conv3x3:4:s1:valid,dense:2")) == "conv3x3:4,dense:2"


def test_spec_shapes_and_properties():
    spec = model.spec_from_text("conv5x5:20,maxpool2,conv5x5:40,maxpool2,dense:100,dense:10", (28, 28))
    assert spec.input_shape == (28, 28, 1)
    assert spec.shapes == ((24, 24, 20), (12, 12, 20), (8, 8, 40), (4, 4, 40), (100,), (10,))
    assert spec.num_classes == 10 and not spec.is_mlp
    with pytest.raises(ValueError, match="all-dense"):
        _ = spec.layer_sizes
    assert jax.jit(lambda x, s: x, static_argnums=1)(1.0, spec) == 1.0  # hashable, a static jit arg
    params = jax.eval_shape(lambda key: model.init(key, spec), jax.random.PRNGKey(0))
    chex.assert_shape([p["w"] for p in params if p], [(5, 5, 1, 20), (5, 5, 20, 40), (640, 100), (100, 10)])
    assert params[1] == {} and params[3] == {}
    mlp = model.spec_from_text("dense:30,dense:10", (28, 28))
    assert mlp.input_shape == (784,) and mlp.is_mlp and mlp.layer_sizes == (784, 30, 10)
    assert mlp == model.MLPSpec((784, 30, 10))


@pytest.mark.parametrize("text,shape,token", [
    ("dense:10,pool2,dense:3", (8, 8), "pool2"),
    ("dense:0", (8,), "dense:0"),
    ("dense:ten", (8,), "dense:ten"),
    ("conv3x3:0,dense:2", (8, 8), "conv3x3:0"),
    ("conv0x3:2,dense:2", (8, 8), "conv0x3:2"),
    ("conv3x3:2:s0,dense:2", (8, 8), "conv3x3:2:s0"),
    ("conv3x3:2:full,dense:2", (8, 8), "conv3x3:2:full"),
    ("maxpool0,dense:2", (8, 8), "maxpool0"),
    ("dropout:1,dense:2", (8,), "dropout:1"),
    ("dropout:-0.1,dense:2", (8,), "dropout:-0.1"),
    ("dense:4,,dense:2", (8,), "''"),
    ("conv5x5:20,dense:2", (3, 3), "conv5x5:20: kernel 5x5 is larger than its 3x3 input"),
    ("conv3x3:2,maxpool4,dense:2", (5, 5), "maxpool4"),
    ("conv3x3:2,maxpool2", (8, 8), "maxpool2"),
    ("dense:4,dropout:0.5", (8,), "dropout:0.5"),
    ("dense:4,conv3x3:2,dense:2", (8, 8), "conv3x3:2"),
    ("conv3x3:2,dense:2", (64,), "conv3x3:2"),
])
def test_bad_layers_name_the_token(text, shape, token):
    with pytest.raises(ValueError) as error:
        model.spec_from_text(text, shape)
    message = str(error.value)
    assert token in message and "\n" not in message, message
