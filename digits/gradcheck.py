"""Manual gradients vs `jax.grad` vs central finite differences, leaf by leaf, with a verdict."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from digits import backprop, losses, model

# Manual vs autodiff should agree to rounding; finite differences carry O(h^2) truncation and
# eps/h rounding error, so they get a looser bound.
TOLERANCES = {
    "float64": {"autodiff": 1e-10, "finite_difference": 1e-6},
    "float32": {"autodiff": 1e-5, "finite_difference": 5e-2},
}
FD_STEP = {"float64": 1e-6, "float32": 1e-2}


@dataclasses.dataclass(frozen=True)
class LeafReport:
    """Agreement of the manual gradient with a reference on one leaf (e.g. layer 0 "w")."""

    leaf: str
    reference: str
    max_abs_error: float
    relative_error: float
    cosine_similarity: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return bool(self.relative_error <= self.tolerance)


def _leaf_names(params) -> list[str]:
    return [f"layer{i}.{k}" for i, layer in enumerate(params) for k in sorted(layer)]


def compare_vectors(manual: np.ndarray, reference: np.ndarray) -> tuple[float, float, float]:
    """(max abs error, ||m - r|| / max(||r||, ||m||), cosine similarity) of two flat vectors."""
    manual, reference = np.ravel(manual).astype(np.float64), np.ravel(reference).astype(np.float64)
    diff = manual - reference
    scale = max(np.linalg.norm(reference), np.linalg.norm(manual), np.finfo(np.float64).tiny)
    norms = np.linalg.norm(manual) * np.linalg.norm(reference)
    cosine = float(manual @ reference / norms) if norms > 0 else float(np.array_equal(manual, reference))
    return float(np.max(np.abs(diff), initial=0.0)), float(np.linalg.norm(diff) / scale), cosine


def _full_precision(fn):
    """On GPU, float32 matmuls default to TF32 (10-bit mantissa): comparisons run at full precision."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with jax.default_matmul_precision("highest"):
            return fn(*args, **kwargs)

    return wrapper


@_full_precision
def against_autodiff(params, batch, spec: model.MLPSpec) -> list[LeafReport]:
    """Per-leaf comparison of backprop.value_and_grad with jax.value_and_grad (and the loss value)."""
    dtype = jnp.result_type(jax.tree.leaves(params)[0]).name
    tol = TOLERANCES.get(dtype, TOLERANCES["float32"])["autodiff"]
    manual_loss, manual = jax.jit(backprop.value_and_grad, static_argnums=2)(params, batch, spec)
    auto_loss, auto = jax.jit(losses.autodiff_value_and_grad, static_argnums=2)(params, batch, spec)
    reports = [LeafReport("loss", "jax.grad", *compare_vectors(manual_loss, auto_loss), tol)]
    for name, m, a in zip(_leaf_names(params), jax.tree.leaves(manual), jax.tree.leaves(auto)):
        reports.append(LeafReport(name, "jax.grad", *compare_vectors(m, a), tol))
    return reports


@_full_precision
def against_finite_differences(params, batch, spec: model.MLPSpec, key, coords_per_leaf: int = 20) -> list[LeafReport]:
    """Central differences (f(p + h e_i) - f(p - h e_i)) / 2h on sampled coordinates of each leaf."""
    dtype = jnp.result_type(jax.tree.leaves(params)[0]).name
    tol = TOLERANCES.get(dtype, TOLERANCES["float32"])["finite_difference"]
    h = FD_STEP.get(dtype, FD_STEP["float32"])
    loss_fn = jax.jit(losses.loss, static_argnums=2)
    _, manual = jax.jit(backprop.value_and_grad, static_argnums=2)(params, batch, spec)
    leaves, treedef = jax.tree.flatten(params)
    reports = []
    for index, (name, leaf, grad) in enumerate(zip(_leaf_names(params), leaves, jax.tree.leaves(manual))):
        key, sub = jax.random.split(key)
        count = min(coords_per_leaf, leaf.size)
        coords = np.asarray(jax.random.choice(sub, leaf.size, (count,), replace=False))
        estimates = []
        for c in coords:
            def shifted(delta):
                bumped = leaf.reshape(-1).at[c].add(delta).reshape(leaf.shape)
                return loss_fn(treedef.unflatten(leaves[:index] + [bumped] + leaves[index + 1:]), batch, spec)

            estimates.append((shifted(h) - shifted(-h)) / (2 * h))
        reports.append(LeafReport(name, "finite_difference", *compare_vectors(np.ravel(grad)[coords], np.array(estimates)), tol))
    return reports


def verdict(reports: list[LeafReport]) -> bool:
    return all(r.passed for r in reports)


def format_reports(reports: list[LeafReport]) -> str:
    """A fixed-width table, one row per leaf and reference."""
    lines = [f"{'leaf':<12} {'reference':<18} {'max abs err':>12} {'rel err':>10} {'cosine':>10} {'tol':>8}  ok"]
    for r in reports:
        lines.append(
            f"{r.leaf:<12} {r.reference:<18} {r.max_abs_error:12.3e} {r.relative_error:10.2e} "
            f"{r.cosine_similarity:10.7f} {r.tolerance:8.0e}  {'PASS' if r.passed else 'FAIL'}"
        )
    return "\n".join(lines)
