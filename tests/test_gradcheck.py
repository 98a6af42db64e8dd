import inspect
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from digits import gradcheck, losses, model


@pytest.fixture
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def _batch(key, batch_size, n_in, num_classes, dtype):
    x = jax.random.uniform(jax.random.PRNGKey(key), (batch_size, n_in), dtype)
    return x, jnp.arange(batch_size) % num_classes


@pytest.mark.parametrize("activation,output,cost", [
    ("relu", "softmax", "cross_entropy"), ("sigmoid", "sigmoid", "quadratic"), ("tanh", "softmax", "quadratic")])
def test_manual_agrees_with_finite_differences_in_float64(x64, activation, output, cost):
    spec = model.MLPSpec((784, 16, 10), activation, output, cost, init="glorot", l2=1e-3)
    params = model.init(jax.random.PRNGKey(0), spec, jnp.float64)
    batch = _batch(1, 8, 784, 10, jnp.float64)
    reports = gradcheck.against_finite_differences(params, batch, spec, jax.random.PRNGKey(2), coords_per_leaf=10)
    assert len(reports) == 4
    assert gradcheck.verdict(reports), gradcheck.format_reports(reports)
    assert all(r.relative_error < 1e-6 and r.cosine_similarity > 0.999999 for r in reports)


def test_manual_agrees_with_finite_differences_in_float32():
    spec = model.MLPSpec((784, 16, 10), "relu", "softmax", "cross_entropy")
    params = model.init(jax.random.PRNGKey(0), spec)
    batch = _batch(1, 64, 784, 10, jnp.float32)
    reports = gradcheck.against_finite_differences(params, batch, spec, jax.random.PRNGKey(2), coords_per_leaf=20)
    assert gradcheck.verdict(reports), gradcheck.format_reports(reports)
    h = gradcheck.finite_difference_step(jnp.float32)
    assert 1e-3 < h < 1e-2 and all(r.rtol == 16 * np.finfo(np.float32).eps for r in reports)


def test_verdict_fails_on_a_wrong_gradient():
    manual = np.array([1.0, 2.0, 3.0])
    max_abs, rel, cosine = gradcheck.compare_vectors(manual * 1.01, manual)
    report = gradcheck.LeafReport("w", "jax.grad", max_abs, rel, cosine, atol=1e-5, rtol=1e-5, worst_ratio=2.0)
    assert not report.passed and not gradcheck.verdict([report])
    table = gradcheck.format_reports([report])
    assert "FAIL" in table and "1.00e-05" in table  # the bound is printed
    nan = gradcheck.LeafReport("w", "jax.grad", *([float("nan")] * 3), atol=1e-5, rtol=1e-5, worst_ratio=float("nan"))
    assert not nan.passed


def test_compare_vectors_uses_the_symmetric_denominator():
    max_abs, rel, cosine = gradcheck.compare_vectors(np.array([0.0, 2.0]), np.array([0.0, 1.0]))
    assert max_abs == 1.0 and rel == pytest.approx(0.5) and cosine == pytest.approx(1.0)
    assert gradcheck.compare_vectors(np.zeros(3), np.zeros(3)) == (0.0, 0.0, 1.0)


def test_against_autodiff_reports_every_leaf_and_passes():
    spec = model.MLPSpec((784, 10, 10))
    params = model.init(jax.random.PRNGKey(0), spec)
    batch = _batch(1, 32, 784, 10, jnp.float32)
    reports = gradcheck.against_autodiff(params, batch, spec)
    assert [r.leaf for r in reports] == ["loss", "layer0.b", "layer0.w", "layer1.b", "layer1.w"]
    assert gradcheck.verdict(reports), gradcheck.format_reports(reports)
    eps = np.finfo(np.float32).eps
    w = reports[2]  # layer0.w: atol = 16 eps sqrt(n) max|g|
    assert w.rtol == 16 * eps and w.atol > 16 * eps * np.sqrt(7840) * 1e-6


def test_a_gradient_of_the_wrong_shape_fails():
    spec = model.MLPSpec((6, 4, 3))
    params = model.init(jax.random.PRNGKey(0), spec)
    batch = _batch(1, 5, 6, 3, jnp.float32)

    def broken(params, batch, spec):
        loss, grads = gradcheck._reference_value_and_grad(params, batch, spec)
        grads[0]["b"] = grads[0]["b"][:2]
        return loss, grads

    reports = gradcheck.check(params, batch, spec, jax.random.PRNGKey(2), 3, value_and_grad=broken)
    assert [r.leaf for r in reports if not r.passed] == ["layer0.b", "layer0.b"]


def test_tree_agreement_is_jittable_and_vmappable():
    eps = np.finfo(np.float32).eps
    # layer 0 has vanishing gradients, layer 1 large ones
    reference = [{"w": jnp.array([[1e-6, -2e-6], [3e-6, 5e-7]]), "b": jnp.array([1e-6, 0.0])}, {},
                 {"w": jnp.array([[1.0, -2.0], [3.0, 0.5]]), "b": jnp.array([0.1, 0.2])}]
    same = gradcheck.tree_agreement(reference, reference)
    assert [float(v) for v in same] == [0.0, 0.0, 0.0]
    # Rounding-sized differences pass, real ones do not; a layer is judged on its own scale, down to
    # 16 ulps of the model's largest gradient (3 here: 5.7e-6 in float32).
    nudged = jax.tree.map(lambda r: r * (1 + 4 * eps), reference)
    violation, rel, max_abs = jax.jit(gradcheck.tree_agreement)(nudged, reference)
    assert violation <= 1 and rel < 1e-6 and max_abs > 0
    wrong_bias = [{"w": reference[0]["w"], "b": jnp.array([1e-6 + 1e-4, 0.0])}, {}, reference[2]]
    violation, rel, max_abs = gradcheck.tree_agreement(wrong_bias, reference)
    assert violation > 1 and rel < 1e-4  # a tree-wide relative error would not see it
    assert float(max_abs) == pytest.approx(1e-4, rel=1e-3)
    # A bias whose gradient cancels to zero exactly (before a batch norm) is judged on the scale of
    # its layer's weights: rounding of that size passes.
    cancelled = [reference[0], {}, {"w": reference[2]["w"], "b": jnp.array([0.0, 0.0])}]
    rounded = [reference[0], {}, {"w": reference[2]["w"], "b": jnp.array([4 * eps, -4 * eps])}]
    assert gradcheck.tree_agreement(rounded, cancelled)[0] <= 1

    def audit(_, worst):  # inside a compiled loop, as in the training audit
        return jnp.maximum(worst, gradcheck.tree_agreement(nudged, reference)[0])

    assert jax.jit(lambda: jax.lax.fori_loop(0, 3, audit, jnp.zeros(())))() <= 1
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), reference, wrong_bias)
    violations, _, _ = jax.vmap(gradcheck.tree_agreement, in_axes=(0, None))(stacked, reference)
    assert violations[0] == 0 and violations[1] > 1
    nan = jax.tree.map(lambda r: r * jnp.nan, reference)
    assert not gradcheck.tree_agreement(nan, reference)[0] <= 1


def test_tree_agreement_agrees_with_against_autodiff():
    spec = model.MLPSpec((12, 7, 5), "tanh", "sigmoid", "quadratic", l2=1e-2)
    params = model.init(jax.random.PRNGKey(0), spec)
    batch = _batch(1, 9, 12, 5, jnp.float32)
    reference = jax.jit(gradcheck._reference_value_and_grad, static_argnums=2)

    def doubled(p, b, s):
        return jax.tree.map(lambda g: 2 * g, reference(p, b, s))

    for value_and_grad in (reference, doubled):
        reports = gradcheck.against_autodiff(params, batch, spec, value_and_grad=value_and_grad)
        violation, _, max_abs = jax.jit(gradcheck.tree_agreement)(value_and_grad(params, batch, spec)[1],
                                                                   reference(params, batch, spec)[1])
        worst = max(r.worst_ratio for r in reports[1:])  # the grads, not the loss
        assert float(violation) == pytest.approx(worst, rel=1e-4, abs=1e-6)
        assert float(max_abs) == pytest.approx(max(r.max_abs_error for r in reports[1:]), rel=1e-6)


def test_layers_without_params_have_no_leaves_and_dropout_is_checked_with_a_fixed_mask(x64):
    if not hasattr(model, "spec_from_text") or "dropout_key" not in inspect.signature(losses.loss).parameters:
        pytest.skip("needs the layer stack (conv, pool, dropout)")
    spec = model.spec_from_text("conv3x3:2,maxpool2,dropout:0.5,dense:3", (6, 6), "tanh", "softmax", "cross_entropy")
    params = model.init(jax.random.PRNGKey(0), spec, jnp.float64)
    x = jax.random.uniform(jax.random.PRNGKey(1), (3, *spec.input_shape), jnp.float64)
    batch = (x, jnp.arange(3))
    reports = gradcheck.check(params, batch, spec, jax.random.PRNGKey(2), 5, dropout_key=jax.random.PRNGKey(3))
    assert [r.leaf for r in reports] == ["loss"] + ["layer0.b", "layer0.w", "layer3.b", "layer3.w"] * 2
    assert gradcheck.verdict(reports), gradcheck.format_reports(reports)


# --- property test: random architectures, the real backward pass, float64 ----------------------


def _random_cases(count=24, seed=0):
    """Every activation x output x cost x (with, without L2), cycled, at random depths and widths.

    Params and inputs are drawn with numpy (jax.random would compile anew for every shape): weights
    N(0, gain^2 / n_in) with gains from contracting (vanishing gradients) to saturating, biases
    N(0, bias_scale^2). 24 cases: each of the 3 x 2 x 2 x 2 combinations once.
    """
    rng = np.random.default_rng(seed)
    combos = list(itertools.product(model.HIDDEN_ACTIVATIONS, model.OUTPUT_ACTIVATIONS, model.COSTS, (0.0, 1e-2)))
    for index in range(count):
        activation, output, cost, l2 = combos[index % len(combos)]
        depth = int(rng.integers(1, 7))
        sizes = (int(rng.integers(1, 17)), *rng.integers(1, 65, depth).tolist(), int(rng.integers(2, 11)))
        spec = model.MLPSpec(sizes, activation, output, cost, l2=l2)
        gain, bias_scale = rng.choice([0.3, 1.0, 2.0, 4.0]), rng.choice([0.1, 1.0])
        params = [{"w": jnp.asarray(rng.normal(size=(n_in, n_out)) * gain / np.sqrt(n_in)),
                   "b": jnp.asarray(rng.normal(size=n_out) * bias_scale)} for n_in, n_out in
                  zip(sizes[:-1], sizes[1:], strict=True)]
        batch_size = int(rng.integers(1, 7))
        labels = rng.integers(0, sizes[-1], batch_size)
        batch = (jnp.asarray(rng.uniform(size=(batch_size, sizes[0]))), jnp.asarray(labels))
        yield spec, params, batch, index


@pytest.fixture
def fast_compile(x64):
    """One compilation per case dominates the property test: XLA's cheaper optimisation level
    halves it (the numbers only round differently, which is what the check tolerates)."""
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", False)


def test_real_backward_pass_passes_on_random_architectures(fast_compile):
    """24 cases, one compilation each: ~30 s on two busy cores."""
    failures = []
    for spec, params, batch, seed in _random_cases():
        reports = gradcheck.check(params, batch, spec, jax.random.PRNGKey(seed), coords_per_leaf=3)
        assert len(reports) == 1 + 4 * spec.num_layers  # loss; b, w per layer, against both references
        if not gradcheck.verdict(reports):
            failures.append(f"{spec}\n{gradcheck.format_reports(reports)}")
    assert not failures, "\n\n".join(failures)


def _check(spec, batch_size, seed, coords_per_leaf=3):
    params = model.init(jax.random.PRNGKey(seed), spec, jnp.float64)
    batch = _batch(seed + 1, batch_size, spec.layer_sizes[0], spec.layer_sizes[-1], jnp.float64)
    return gradcheck.check(params, batch, spec, jax.random.PRNGKey(seed + 2), coords_per_leaf)


@pytest.mark.parametrize("activation,init,init_scale,output,cost", [
    ("sigmoid", "scaled_normal", 0.5, "softmax", "cross_entropy"),
    ("sigmoid", "scaled_normal", 0.5, "sigmoid", "quadratic"),
    ("tanh", "uniform", 0.1, "softmax", "cross_entropy"),
])
def test_vanishing_gradients_are_not_false_alarms(x64, activation, init, init_scale, output, cost):
    """Deep narrow sigmoid/tanh nets: first-layer gradients of 1e-5 and below, which a relative
    error cannot judge (finite differences carry ~1e-10 absolute error), must PASS."""
    spec = model.MLPSpec((8,) + (4,) * 6 + (3,), activation, output, cost, init=init, init_scale=init_scale)
    reports = _check(spec, 4, 0, coords_per_leaf=5)
    assert gradcheck.verdict(reports), gradcheck.format_reports(reports)
    params = model.init(jax.random.PRNGKey(0), spec, jnp.float64)
    _, grads = gradcheck._reference_value_and_grad(params, _batch(1, 4, 8, 3, jnp.float64), spec)
    assert float(jnp.max(jnp.abs(grads[0]["w"]))) < 1e-5  # the gradients do vanish
    finite = [r for r in reports if r.reference == "finite_difference"]
    assert max(r.relative_error for r in finite) > 1e-6  # the old relative-error verdict said FAIL
