"""Checks that can fail: deliberate bugs in a copy of the MLP backward pass must make gradcheck FAIL.

`mlp_value_and_grad` is a self-contained copy of the MLP equations (no digits.backprop), with a
`mutation` switch. Unmutated, it must PASS both comparisons, so every test here can fail both
ways: a check that always fails would not pass the control, one that never fails would not
catch the mutations.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

from digits import gradcheck, model

MUTATIONS = (
    "transposed_weight",  # dA = dZ W instead of dZ W^T (on a square layer, so the shapes still fit)
    "missing_activation_derivative",  # dZ_{l-1} = dZ_l W^T, without * f'(z_{l-1})
    "softmax_jacobian_dropped",  # quadratic cost with softmax output: dZ = a - y (the CE formula)
    "db_first_row",  # db = dZ[0] instead of the sum over the batch
    "db_mean",  # db = mean over the batch of dZ (the 1/B then enters twice)
    "batch_mean_dropped",  # dZ_L without the 1/B of the batch mean
    "l2_on_biases",  # db += l2 b (the penalty covers weights only)
)


def _activate(z, name):
    return {"relu": lambda: jnp.maximum(z, 0), "sigmoid": lambda: jax.nn.sigmoid(z), "tanh": lambda: jnp.tanh(z),
            "softmax": lambda: jax.nn.softmax(z, axis=-1)}[name]()


def _derivative(a, name):
    """f'(z) in terms of a = f(z)."""
    return {"relu": lambda: (a > 0).astype(a.dtype), "sigmoid": lambda: a * (1 - a), "tanh": lambda: 1 - a * a}[name]()


def mlp_value_and_grad(params, batch, spec, mutation=None):
    """Loss and hand-derived gradients of an MLP: the equations of backprop.py, written out again.

    params: [{"w": (n_in, n_out), "b": (n_out,)}]; batch: (x (B, n_in), labels (B,) int); spec:
    uses activation, output, cost, l2. mutation: None or one of MUTATIONS.
    """
    assert mutation is None or mutation in MUTATIONS, mutation
    x, labels = batch
    batch_size = x.shape[0]
    hidden = [x]  # a_0 = x, then every hidden activation
    for layer in params[:-1]:
        hidden.append(_activate(hidden[-1] @ layer["w"] + layer["b"], spec.activation))
    z = hidden[-1] @ params[-1]["w"] + params[-1]["b"]
    y = jax.nn.one_hot(labels, z.shape[-1], dtype=z.dtype)
    a = _activate(z, spec.output)

    if spec.cost == "quadratic":
        per_example = 0.5 * jnp.sum((a - y) ** 2, axis=-1)
    elif spec.output == "softmax":
        per_example = -jnp.sum(y * jax.nn.log_softmax(z, axis=-1), axis=-1)
    else:
        per_example = jnp.sum(jax.nn.softplus(z) - y * z, axis=-1)
    loss = jnp.mean(per_example) + 0.5 * spec.l2 * sum(jnp.sum(layer["w"] ** 2) for layer in params)

    if spec.cost == "cross_entropy" or (mutation == "softmax_jacobian_dropped" and spec.output == "softmax"):
        delta = a - y
    elif spec.output == "sigmoid":
        delta = (a - y) * a * (1 - a)
    else:  # softmax Jacobian diag(a) - a a^T applied to dC/da = a - y
        g = a - y
        delta = a * (g - jnp.sum(g * a, axis=-1, keepdims=True))
    if mutation != "batch_mean_dropped":
        delta = delta / batch_size

    grads = [None] * len(params)
    for i in reversed(range(len(params))):
        w, b = params[i]["w"], params[i]["b"]
        dw = hidden[i].T @ delta + spec.l2 * w
        if mutation == "db_first_row":
            db = delta[0]
        elif mutation == "db_mean":
            db = jnp.mean(delta, axis=0)
        else:
            db = jnp.sum(delta, axis=0)
        if mutation == "l2_on_biases":
            db = db + spec.l2 * b
        grads[i] = {"w": dw, "b": db}
        if i > 0:
            back = w if mutation == "transposed_weight" and w.shape[0] == w.shape[1] else w.T
            derivative = 1 if mutation == "missing_activation_derivative" else _derivative(hidden[i], spec.activation)
            delta = (delta @ back) * derivative
    return loss, grads


# Every mutation changes this network's gradients: a square hidden layer (transposed weight),
# tanh away from its linear regime (activation derivative), softmax + quadratic cost (Jacobian),
# biases far from zero and a large l2 (penalty on biases), a batch of 4 (the 1/B, the db sum).
SPEC = model.MLPSpec((5, 6, 6, 4), "tanh", "softmax", "quadratic", init="uniform", init_scale=1.0, l2=0.1)


def _problem(dtype):
    params = model.init(jax.random.PRNGKey(0), SPEC, dtype)
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 5), dtype, -2.0, 2.0)
    return params, (x, jnp.array([0, 1, 2, 3]))


def _checks(dtype, mutation):
    params, batch = _problem(dtype)
    grad_fn = functools.partial(mlp_value_and_grad, mutation=mutation)
    reports = gradcheck.check(params, batch, SPEC, jax.random.PRNGKey(2), coords_per_leaf=8, value_and_grad=grad_fn)
    auto = [r for r in reports if r.reference == "jax.grad"]
    return auto, [r for r in reports if r.reference == "finite_difference"]


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    if request.param == "float64":
        jax.config.update("jax_enable_x64", True)
        yield jnp.float64
        jax.config.update("jax_enable_x64", False)
    else:
        yield jnp.float32


def test_unmutated_copy_passes(dtype):
    auto, fd = _checks(dtype, None)
    assert gradcheck.verdict(auto), gradcheck.format_reports(auto)
    assert gradcheck.verdict(fd), gradcheck.format_reports(fd)


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_mutation_fails_both_checks(dtype, mutation):
    auto, fd = _checks(dtype, mutation)
    # Not a near miss: the worst entry is far outside its bound, in both comparisons.
    assert max(r.worst_ratio for r in auto) > 100, gradcheck.format_reports(auto)
    assert max(r.worst_ratio for r in fd) > 10, gradcheck.format_reports(fd)
    assert not gradcheck.verdict(auto) and not gradcheck.verdict(fd)
    assert "FAIL" in gradcheck.format_reports(auto + fd)


def test_mutations_are_caught_by_tree_agreement(dtype):
    params, batch = _problem(dtype)
    _, reference = mlp_value_and_grad(params, batch, SPEC)
    agreement = jax.jit(gradcheck.tree_agreement)
    violation, rel, _ = agreement(mlp_value_and_grad(params, batch, SPEC)[1], reference)
    assert violation == 0 and rel == 0  # same function, same bits
    for mutation in MUTATIONS:
        violation, rel, max_abs = agreement(mlp_value_and_grad(params, batch, SPEC, mutation)[1], reference)
        assert violation > 100 and rel > 1e-3 and max_abs > 0, mutation
