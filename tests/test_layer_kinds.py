"""The layer registry and the kinds modern nets are made of: activations, batch norm, layer norm,
global average pooling and residual blocks. Each hand-derived backward agrees with jax.grad and
with finite differences (float64, random upstream cotangents, awkward shapes); mutated backward
passes FAIL; batch-norm statistics are model state (trained, checkpointed, vmapped, evaluated);
every layer is also a `jax.custom_vjp` function."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from digits import backprop, checkpoint, data, gradcheck, layers, model, train
from digits.config import Config
from test_layers import _relative_error, float64  # noqa: F401 (the module's float64 fixture)


def _random_params(layer, shape, rng):
    shapes = jax.eval_shape(lambda key: layer.init(key, shape, jnp.float64), jax.random.PRNGKey(0))
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape)), shapes)


@jax.jit(static_argnums=0)
def _layer_vs_vjp(layer, params, x, dy):
    """(manual grads, manual dx) and (autodiff grads, autodiff dx) for the cotangent dy."""
    _, cache = layer.forward(params, x)
    _, vjp = jax.vjp(lambda p, a: layer.forward(p, a)[0], params, x)
    return layer.backward(params, cache, dy), vjp(dy)


# (name, token, per-example input shape, batch)
KINDS = [
    ("relu", "relu", (3, 5, 2), 2),
    ("leaky_relu", "leaky_relu:0.2", (7,), 3),
    ("sigmoid", "sigmoid", (4, 3, 1), 2),
    ("tanh", "tanh", (6,), 1),
    ("gelu", "gelu", (5, 2, 3), 2),
    ("batchnorm_dense_batch2", "batchnorm", (5,), 2),
    ("batchnorm_dense_batch1", "batchnorm:0.5", (4,), 1),
    ("batchnorm_conv_batch1_one_channel_non_square", "batchnorm", (3, 5, 1), 1),
    ("batchnorm_conv_batch2", "batchnorm", (4, 3, 3), 2),
    ("layernorm_vector", "layernorm", (6,), 3),
    ("layernorm_image_batch1", "layernorm", (3, 4, 2), 1),
    ("gap_non_square", "gap", (3, 5, 2), 2),
    ("res_identity", "res(conv3x3:2:same,tanh,conv3x3:2:same)", (5, 4, 2), 2),
    ("res_projection_stride2_odd", "res(conv3x3:3:s2:same,batchnorm,relu,conv3x3:3:same)", (7, 5, 1), 2),
    ("res_nested_with_dense_body", "res(dense:6,tanh,res(dense:6,gelu),dense:6)", (6,), 3),
]


@pytest.mark.parametrize("token,shape,batch", [k[1:] for k in KINDS], ids=[k[0] for k in KINDS])
def test_each_kind_backward_matches_vjp_with_random_cotangents(token, shape, batch):
    layer = model.ModelSpec(layers.parse_stack(token + ",dense:2"), shape, activation="tanh").layers[0]
    rng = np.random.default_rng(0)
    params = _random_params(layer, shape, rng)
    x = jnp.asarray(rng.normal(size=(batch,) + shape))
    y_shape = (batch,) + layer.output_shape(shape)
    dy = jnp.asarray(rng.normal(size=y_shape))
    (grads, dx), (auto_grads, auto_dx) = _layer_vs_vjp(layer, params, x, dy)
    chex.assert_trees_all_equal_shapes_and_dtypes((grads, dx), (auto_grads, auto_dx))
    assert _relative_error((grads, dx), (auto_grads, auto_dx)) <= 1e-10
    assert float(jnp.max(jnp.abs(dx))) > 0 or token.startswith("batchnorm") and batch == 1 and len(shape) == 1


def test_batchnorm_input_gradient_is_zero_for_a_constant_cotangent():
    """Why the checks use random cotangents: with dy = 1 batch norm's dx vanishes identically."""
    layer, x = layers.BatchNorm(), jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)))
    params = {"gamma": jnp.ones(3), "beta": jnp.zeros(3)}
    _, dx = layer.backward(params, layer.forward(params, x)[1], jnp.ones((4, 3)))
    assert float(jnp.max(jnp.abs(dx))) < 1e-12


# Whole models with the new kinds, checked by gradcheck against jax.grad and finite differences.
STACKS = [
    ("bn_conv_res_gap", "conv3x3:4:same,batchnorm,relu,res(conv3x3:4:same,batchnorm,relu,conv3x3:4:same,batchnorm),"
     "relu,res(conv3x3:6:s2:same,batchnorm,relu,conv3x3:6:same),relu,gap,dense:3", (9, 7, 1), 4),
    ("layernorm_leaky_mlp", "dense:8,layernorm,leaky_relu:0.1,dense:8,gelu,dense:3", (6,), 3),
    ("implicit_activation_in_res_blocks", "conv3x3:3:same,res(conv3x3:3:same,conv3x3:3:same),avgpool2,dense:3",
     (6, 6, 2), 2),
    ("bn_dense_batch2", "dense:5,batchnorm,sigmoid,dense:3", (4,), 2),
]


@pytest.mark.parametrize("text,shape,batch", [s[1:] for s in STACKS], ids=[s[0] for s in STACKS])
def test_stacks_pass_the_gradient_check(text, shape, batch):
    spec = model.spec_from_text(text, shape, activation="tanh", init="glorot", l2=1e-3)
    rng = np.random.default_rng(0)
    params = model.init(jax.random.PRNGKey(0), spec, jnp.float64)
    params = jax.tree.map(lambda p: p + 0.1 * jnp.asarray(rng.normal(size=p.shape)), params)  # gamma, beta off 1, 0
    batch_ = (jnp.asarray(rng.uniform(0, 1, (batch,) + spec.input_shape)), jnp.arange(batch) % spec.num_classes)
    reports, manual, auto = gradcheck.check_with_gradients(params, batch_, spec, jax.random.PRNGKey(1),
                                                           coords_per_leaf=4)
    assert gradcheck.verdict(reports), gradcheck.format_reports(reports)
    # over the whole tree (a conv bias before batch norm has an exactly-zero gradient: its own
    # relative error compares two roundings of zero)
    assert _relative_error(manual, auto) <= 1e-10


def test_effective_stack_writes_the_implicit_activation_in():
    spec = model.spec_from_text("conv3x3:4:same,res(conv3x3:4:same,conv3x3:4:same),maxpool2,dense:10", (8, 8))
    assert spec.effective_text == ("conv3x3:4:same,relu,res(conv3x3:4:same,relu,conv3x3:4:same),relu,maxpool2,"
                                   "dense:10")
    named = model.spec_from_text("conv3x3:4,batchnorm,gelu,dense:10", (8, 8), activation="tanh")
    assert named.effective_text == "conv3x3:4,batchnorm,gelu,dense:10"  # an activation layer: none implicit


@pytest.mark.parametrize("text,fragment", [
    ("res(conv3x3:4:same,dense:3", "unbalanced"),
    ("res(conv3x3:4:same)),dense:3", "unbalanced"),
    ("res(),dense:3", "res(): an empty block"),
    ("res,dense:3", "res: a residual block is written res(<layers>)"),
    ("relu(dense:3),dense:3", "relu(dense:3): relu(...) is not a block"),
    ("res(conv3x3:4),dense:3", "res(conv3x3:4): the body maps 8x8 to 6x6"),
    ("leaky_relu:x,dense:3", "leaky_relu:x: alpha must be a number"),
    ("batchnorm:1.5,dense:3", "batchnorm:1.5: momentum must be in [0, 1)"),
    ("gap,dense:3", "gap: needs an image input"),
    ("dense:4,relu", "relu: the last layer must be dense:N"),
])
def test_bad_stacks_are_one_line_errors_naming_the_token(text, fragment):
    with pytest.raises(ValueError) as error:
        model.spec_from_text(text, (8, 8) if "gap" not in text else (8,))
    assert fragment in str(error.value) and "\n" not in str(error.value), str(error.value)


# --- mutations: deliberately wrong backward passes must FAIL ---------------------------------------


@dataclasses.dataclass(frozen=True)
class BatchNormNoMeanTerm(layers.BatchNorm):
    def backward(self, params, cache, dy, need_dx=True):
        xhat, inv_std, _, _, n = cache
        grads, _ = super().backward(params, cache, dy, False)
        return grads, params["gamma"] * inv_std / n * (n * dy - xhat * jnp.sum(dy * xhat, axis=0))


@dataclasses.dataclass(frozen=True)
class BatchNormNoVarianceTerm(layers.BatchNorm):
    def backward(self, params, cache, dy, need_dx=True):
        xhat, inv_std, _, _, n = cache
        grads, _ = super().backward(params, cache, dy, False)
        return grads, params["gamma"] * inv_std / n * (n * dy - jnp.sum(dy, axis=0))


@dataclasses.dataclass(frozen=True)
class BatchNormUnbiasedVariance(layers.BatchNorm):
    """The backward of a forward that divided by N - 1: the variance term scaled by N / (N - 1)."""

    def backward(self, params, cache, dy, need_dx=True):
        xhat, inv_std, _, _, n = cache
        grads, _ = super().backward(params, cache, dy, False)
        return grads, params["gamma"] * inv_std / n * (n * dy - jnp.sum(dy, axis=0)
                                                       - xhat * jnp.sum(dy * xhat, axis=0) * n / (n - 1))


@dataclasses.dataclass(frozen=True)
class LayerNormWrongAxis(layers.LayerNorm):
    """Sums over the batch instead of each example's features."""

    def backward(self, params, cache, dy, need_dx=True):
        xhat, inv_std = cache
        grads, _ = super().backward(params, cache, dy, False)
        dxhat, n = dy * params["gamma"], dy.shape[0]
        return grads, inv_std / n * (n * dxhat - jnp.sum(dxhat, axis=0) - xhat * jnp.sum(dxhat * xhat, axis=0))


@dataclasses.dataclass(frozen=True)
class ResidualNoFanIn(layers.Residual):
    """Forgets the shortcut's gradient at the block's input."""

    def backward(self, params, cache, dy, need_dx=True, state=None):
        from digits.layers import stack

        grads = {}
        grads["body"], dx = stack.backward(self.body, self.activation, params["body"], cache[0], dy, need_dx)
        return grads, dx


@dataclasses.dataclass(frozen=True)
class LeakyReluWrongSide(layers.LeakyRelu):
    def derivative(self, z):
        return jnp.where(z > 0, self.alpha, 1).astype(z.dtype)


MUTANTS = {
    "batchnorm_without_mean_term": (BatchNormNoMeanTerm(), layers.BatchNorm()),
    "batchnorm_without_variance_term": (BatchNormNoVarianceTerm(), layers.BatchNorm()),
    "batchnorm_unbiased_variance": (BatchNormUnbiasedVariance(), layers.BatchNorm()),
    "layernorm_wrong_axis": (LayerNormWrongAxis(), layers.LayerNorm()),
    "residual_fan_in_dropped": (ResidualNoFanIn((layers.Dense(5), layers.Tanh(), layers.Dense(5))),
                                layers.Residual((layers.Dense(5), layers.Tanh(), layers.Dense(5)))),
    "leaky_relu_slope_on_the_wrong_side": (LeakyReluWrongSide(0.2), layers.LeakyRelu(0.2)),
}


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("mutation", sorted(MUTANTS))
def test_mutated_backward_fails_and_the_real_one_passes(mutation, dtype):
    for layer, should_pass in ((MUTANTS[mutation][1], True), (MUTANTS[mutation][0], False)):
        spec = model.ModelSpec((layers.Dense(5), layer, layers.Dense(5), layers.Tanh(), layers.Dense(3)), (4,),
                               init="glorot")
        rng = np.random.default_rng(0)
        params = jax.tree.map(lambda p, rng=rng: (p + 0.3 * rng.normal(size=p.shape)).astype(dtype),
                              model.init(jax.random.PRNGKey(0), spec, dtype))
        batch = (jnp.asarray(rng.normal(size=(6, 4)), dtype), jnp.arange(6) % 3)
        reports = gradcheck.check(params, batch, spec, jax.random.PRNGKey(1), coords_per_leaf=6)
        assert gradcheck.verdict(reports) == should_pass, (mutation, should_pass, gradcheck.format_reports(reports))


# --- every layer as a custom_vjp function -----------------------------------------------------------


@pytest.mark.parametrize("token,shape", [("conv3x3:2:s2:same", (5, 6, 2)), ("batchnorm", (4, 3, 2)),
                                         ("layernorm", (5,)), ("maxpool2", (4, 5, 1)), ("gelu", (3,)),
                                         ("res(conv3x3:3:same,relu,conv3x3:3:same)", (4, 4, 2))])
def test_every_layer_is_a_custom_vjp_function_that_check_grads_accepts(token, shape):
    layer = model.ModelSpec(layers.parse_stack(token + ",dense:2"), shape).layers[0]
    rng = np.random.default_rng(0)
    params = _random_params(layer, shape, rng)
    x = jnp.asarray(rng.normal(size=(3,) + shape))
    fn = layers.as_function(layer)
    check_grads(fn, (params, x), order=1, modes=["rev"])
    # and it is the hand-derived backward that jax.grad runs: a wrong one is caught
    wrong = layers.as_function(LeakyReluWrongSide(0.2))
    with pytest.raises(AssertionError):
        check_grads(wrong, ({}, x), order=1, modes=["rev"])


# --- batch-norm statistics are model state ---------------------------------------------------------

BN = dict(layers="conv3x3:4:same,batchnorm:0.8,relu,res(conv3x3:4:same,batchnorm,relu,conv3x3:4:same),maxpool2,"
                 "dense:10", init="he", optimizer="adam", learning_rate=0.01, l2=1e-3, batch_size=20, epochs=2,
          steps_per_call=7)


@pytest.fixture(scope="module")
def tiny(mnist_splits):
    cut = lambda split, n: data.Split(split.images[:n], split.labels[:n])  # noqa: E731
    return dataclasses.replace(mnist_splits, train=cut(mnist_splits.train, 200),
                               validation=cut(mnist_splits.validation, 100), test=cut(mnist_splits.test, 100))


def _fit(config, dataset, state=None, hooks=()):
    plan = train.Plan.create(config, dataset)
    return plan, train.fit(plan, plan.init_state() if state is None else state, train.device_splits(dataset), hooks)


def test_running_statistics_follow_the_momentum_rule():
    layer = layers.BatchNorm(momentum=0.8)
    x = jnp.asarray(np.random.default_rng(2).normal(3.0, 2.0, size=(5, 2, 2, 3)))
    params = layer.init(None, (2, 2, 3), jnp.float64)
    state = layer.next_state(layer.init_state((2, 2, 3), jnp.float64), layer.forward(params, x)[1])
    flat = np.asarray(x).reshape(-1, 3)
    np.testing.assert_allclose(state["mean"], 0.2 * flat.mean(0), rtol=1e-12)
    np.testing.assert_allclose(state["var"], 0.8 + 0.2 * flat.var(0, ddof=1), rtol=1e-12)
    y, _ = layer.infer_forward(params, state, x)  # evaluation: the running statistics, not the batch's
    np.testing.assert_allclose(y, (x - state["mean"]) / np.sqrt(state["var"] + layer.eps), rtol=1e-12)


def test_batchnorm_trains_checkpoints_and_resumes_exactly(tiny, tmp_path):
    from test_train import Recorder

    config = Config(**BN)
    plan, uninterrupted = _fit(config, tiny)
    state = uninterrupted.state
    moved = jax.tree.leaves(state.model_state)
    assert len(moved) == 4 and all(float(jnp.max(jnp.abs(m - s))) > 1e-3 for m, s in
                                   zip(moved, jax.tree.leaves(model.init_state(plan.spec)), strict=True))
    # the optimizer never sees the state: Adam's moments cover exactly the params' leaves
    assert jax.tree.structure(state.opt_state[0].mu) == jax.tree.structure(state.params)
    with pytest.raises(Recorder.Stop):
        _fit(config, tiny, hooks=[Recorder(stop_at=14, directory=tmp_path)])  # mid-epoch
    restored, _ = checkpoint.restore(tmp_path, plan.init_state())
    _, resumed = _fit(config, tiny, state=restored)
    chex.assert_trees_all_equal(resumed.state, uninterrupted.state)
    # evaluation uses the running statistics: the same params with the fresh state give other outputs
    x = model.inputs(jnp.asarray(tiny.test.images[:8]), plan.spec)
    assert not np.allclose(model.apply(state.params, x, plan.spec, state.model_state),
                           model.apply(state.params, x, plan.spec, model.init_state(plan.spec)))
    with pytest.raises(ValueError, match="keeps state"):
        model.apply(state.params, x, plan.spec)


def test_vmapped_batchnorm_seeds_equal_separate_runs_and_audit_passes(tiny):
    # (momentum, not Adam: Adam scales the rounding noise of a conv bias before batch norm, whose
    # gradient is exactly zero, up to full-size steps, which then differ between programs)
    config = Config(**dict(BN, epochs=1, optimizer="momentum", learning_rate=0.05), num_seeds=2, grad="both",
                    audit_every=3)
    _, stacked = _fit(config, tiny)
    _, alone = _fit(dataclasses.replace(config, num_seeds=1, seed=1), tiny)
    lane = lambda tree: jax.tree.map(lambda x: x[1], tree)  # noqa: E731
    chex.assert_trees_all_close(lane((stacked.state.params, stacked.state.model_state)),
                                (alone.state.params, alone.state.model_state), atol=1e-5, rtol=1e-4)
    assert stacked.audit["count"] > 0 and stacked.audit["passed"], stacked.audit


def test_input_gradient_in_evaluation_mode_matches_jax_grad(tiny):
    spec = model.spec_from_text(BN["layers"], (28, 28), init="he")
    params = model.init(jax.random.PRNGKey(0), spec, jnp.float64)
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda s: s + jnp.abs(jnp.asarray(rng.normal(size=s.shape))),
                         model.init_state(spec, jnp.float64))
    x = model.inputs(jnp.asarray(tiny.test.images[:2]), spec, jnp.float64)
    dz = jnp.asarray(rng.normal(size=(2, 10)))
    manual = backprop.input_gradient(params, x, spec, dz, state)
    auto = jax.grad(lambda a: jnp.sum(model.logits(params, a, spec, state=state) * dz))(x)
    assert _relative_error(manual, auto) <= 1e-10
