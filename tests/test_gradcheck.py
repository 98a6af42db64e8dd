import jax
import jax.numpy as jnp
import numpy as np
import pytest

from digits import gradcheck, model


@pytest.fixture
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


@pytest.mark.parametrize("activation,output,cost", [("relu", "softmax", "cross_entropy"), ("sigmoid", "sigmoid", "quadratic"),
                                                    ("tanh", "softmax", "quadratic")])
def test_manual_agrees_with_finite_differences_in_float64(x64, activation, output, cost):
    spec = model.MLPSpec((784, 16, 10), activation, output, cost, init="glorot", l2=1e-3)
    params = model.init(jax.random.PRNGKey(0), spec, jnp.float64)
    batch = (jax.random.uniform(jax.random.PRNGKey(1), (8, 784), jnp.float64), jnp.arange(8) % 10)
    reports = gradcheck.against_finite_differences(params, batch, spec, jax.random.PRNGKey(2), coords_per_leaf=10)
    assert len(reports) == 4
    assert gradcheck.verdict(reports), gradcheck.format_reports(reports)
    assert all(r.relative_error < 1e-6 and r.cosine_similarity > 0.999999 for r in reports)


def test_verdict_fails_on_a_wrong_gradient():
    manual = np.array([1.0, 2.0, 3.0])
    max_abs, rel, cosine = gradcheck.compare_vectors(manual * 1.01, manual)
    report = gradcheck.LeafReport("w", "jax.grad", max_abs, rel, cosine, tolerance=1e-5)
    assert not report.passed and not gradcheck.verdict([report])
    assert "FAIL" in gradcheck.format_reports([report])


def test_against_autodiff_reports_every_leaf_and_passes():
    spec = model.MLPSpec((784, 10, 10))
    params = model.init(jax.random.PRNGKey(0), spec)
    batch = (jax.random.uniform(jax.random.PRNGKey(1), (32, 784)), jnp.arange(32) % 10)
    reports = gradcheck.against_autodiff(params, batch, spec)
    assert [r.leaf for r in reports] == ["loss", "layer0.b", "layer0.w", "layer1.b", "layer1.w"]
    assert gradcheck.verdict(reports)
