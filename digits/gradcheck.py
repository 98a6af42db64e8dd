"""Manual gradients vs `jax.grad` vs central finite differences, leaf by leaf, with a verdict.

Error model. Manual backprop and `jax.grad` compute the same sums in different orders, so entry
by entry they may differ only by rounding, |m - r| <= atol + rtol |r| with rtol = 16 eps and,
per leaf, atol = 16 eps sqrt(N) max|r| for a model of N parameters (absolute, because an entry that
cancels to near zero keeps the rounding of the larger terms it was summed from). A central difference
(f(p + h) - f(p - h)) / 2h carries round-off of about eps F / h (F = max(1, |loss|)) and a
truncation error, so it steps h = cbrt(3 eps) max(1, |p|), which balances the two for a smooth
loss, and allows atol = 8 eps F / h plus a truncation bound computed from exact slopes f'(p + t h)
(`jax.jvp`) at 9 points across the step, which is h^2 |f^(3)| / 6 for a smooth loss and also
covers ReLU kinks inside the step, with rtol = 16 eps. An entry passes when
|error| / (atol + rtol |reference|) <= 1, so near-zero entries such as vanishing first-layer
gradients are judged by their absolute error, never by a meaningless relative one.

eps is `jnp.finfo(dtype).eps`, so the same model serves float64 (`--x64`) and float32.
`tree_agreement` is the jittable form of the manual-vs-autodiff model, for audits inside
compiled training steps; `compare_vectors` computes the report statistics; `check` runs both
comparisons in one compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from digits import backprop, compiling, losses

# Safety factors, in units of eps. Measured worst cases over random MLPs (up to 784 inputs, 4
# layers, batches 1-256, every activation, output, cost and initialiser, float32 and float64):
# manual vs jax.grad reached 0.5 eps sqrt(N) max|r| (2.1 with ReLU, N(0, 1) init and logits ~600
# under softmax + quadratic cost); central differences reached 1 eps F / h in round-off. The
# finite-difference truncation bound is computed from exact slopes, not assumed.
AUTODIFF_RTOL_ULPS = 16.0
AUTODIFF_ATOL_ULPS = 16.0
FINITE_DIFFERENCE_ROUNDOFF_ULPS = 8.0

# The reference gradient, defined here so gradcheck does not depend on where the codebase keeps
# its own copy: jax.value_and_grad of the loss, with respect to params.
_reference_value_and_grad = jax.value_and_grad(losses.loss)


@dataclasses.dataclass(frozen=True)
class LeafReport:
    """Agreement of a gradient with a reference on one leaf (e.g. "layer0.w"), or on the loss value.

    max_abs_error, relative_error (||m - r|| / max(||r||, ||m||)), cosine_similarity: summary
    statistics of the compared entries. atol, rtol: the elementwise bound |m - r| <= atol + rtol |r|
    used for the verdict (for finite differences atol is the largest over the sampled entries:
    round-off plus the truncation bound). worst_ratio: max |m - r| / (atol + rtol |r|) over the
    entries; NaN if any value is NaN, inf where the bound is 0 and the values differ.
    """

    leaf: str
    reference: str
    max_abs_error: float
    relative_error: float
    cosine_similarity: float
    atol: float
    rtol: float
    worst_ratio: float

    @property
    def passed(self) -> bool:
        return bool(self.worst_ratio <= 1.0)  # False for NaN


def _leaf_names(params) -> list[str]:
    """"layer0.w", ... in leaf order; nested blocks add their path ("layer3.body.0.w", "layer3.proj.b")."""
    def name(path):
        parts = [str(getattr(key, "key", getattr(key, "idx", key))) for key in path]
        return ".".join([f"layer{parts[0]}"] + parts[1:])

    return [name(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


# --- the error models --------------------------------------------------------------------------


def autodiff_tolerance(dtype, num_params: int, scale):
    """(atol, rtol) of manual vs autodiff on a leaf whose reference has max|r| = scale.

    num_params: N, the number of parameters of the model (all leaves). Two equivalent evaluations of
    a sum of products differ by a few ulps of its terms, not of its (possibly cancelled) value:
    rtol = 16 eps covers entries that do not cancel. For those that do, atol stands in for the size
    of the terms: the leaf's scale max|r|, times sqrt(N), because roundings add up like a random
    walk over the sums of the whole backward pass (batch, every fan-in and fan-out), for which N is
    a shape-only proxy that `tree_agreement` can compute under jit. The same sqrt(N) absorbs an
    ill-conditioned output delta (e.g. a saturated softmax under the quadratic cost loses digits in
    a - y), which perturbs every leaf by the same relative amount, small leaves (biases) included.
    Per layer, not per tree: `scale` is the largest max|r| among the leaves of the leaf's own layer
    (its dict: w and b of a dense layer), so a first layer with vanishing gradients is judged on
    its own scale, while a leaf that cancels to zero exactly while its sibling does not (the bias
    of a conv followed by batch norm, whose mean removes it: db = sum dy = 0 up to the rounding of
    the dy it sums) is judged on the scale of the terms it was summed from, which its sibling w
    shows. And no entry is held to less than 16 ulps of the model's largest gradient (a floor of
    max|r| over the tree / sqrt(N) on `scale`): where a whole layer's gradient cancels to zero
    exactly (everything before a batch norm over a batch of 2, whose output is +-1 whatever its
    input), what is left is the rounding of the cotangents that cancelled, which no leaf of that
    layer shows. `scale` may be a traced jnp scalar.
    """
    eps = float(jnp.finfo(dtype).eps)
    return AUTODIFF_ATOL_ULPS * eps * math.sqrt(num_params) * scale, AUTODIFF_RTOL_ULPS * eps


def finite_difference_step(dtype) -> float:
    """h0 = cbrt(3 eps): minimises truncation h^2 |f^(3)| / 6 + round-off eps F / h if |f^(3)| ~ F.

    The step actually used for a coordinate p is h0 * max(1, |p|) (a relative step for large
    parameters). float64: 8.7e-6; float32: 7.1e-3.
    """
    return float(np.cbrt(3 * float(jnp.finfo(dtype).eps)))


def finite_difference_roundoff(dtype, loss_scale: float, step):
    """atol from round-off: each loss evaluation is off by ~eps F, the difference quotient by eps F / h.

    loss_scale F = max(1, |f|): the costs are built from O(1) quantities (probabilities, pixels in
    [0, 1]), so even a tiny loss carries absolute rounding of order eps.
    """
    return FINITE_DIFFERENCE_ROUNDOFF_ULPS * float(jnp.finfo(dtype).eps) * loss_scale / step


# Where the exact slope f'(p + t h) is sampled to bound the truncation error (t = 0 is p itself).
SLOPE_OFFSETS = np.linspace(-1.0, 1.0, 9)


def finite_difference_truncation(slopes: np.ndarray) -> np.ndarray:
    """A bound on |(f(p+h) - f(p-h)) / 2h - f'(p)| from exact slopes f'(p + t h) at SLOPE_OFFSETS.

    slopes: (len(SLOPE_OFFSETS), n), for n coordinates. The central difference is exactly the mean
    of f' over [p - h, p + h]; its trapezoid estimate M from the samples gives |M - f'(p)|, which is
    the usual h^2 |f^(3)| / 6 for a smooth loss. A ReLU kink inside the step makes f' jump, which
    the trapezoid rule may miss by up to half the jump over one interval; each jump shows in the
    samples' second differences, so U = sum |second differences| / (2 intervals) covers it (about
    twice over) and is negligible for a smooth loss.
    """
    intervals = len(slopes) - 1
    mean = (slopes[0] / 2 + slopes[1:-1].sum(axis=0) + slopes[-1] / 2) / intervals
    jumps = np.abs(np.diff(slopes, n=2, axis=0)).sum(axis=0) / (2 * intervals)
    return np.abs(mean - slopes[intervals // 2]) + jumps


# --- agreement statistics ----------------------------------------------------------------------


def compare_vectors(manual: np.ndarray, reference: np.ndarray) -> tuple[float, float, float]:
    """(max |m - r|, ||m - r|| / max(||r||, ||m||, tiny), cosine similarity) of two arrays, flattened.

    The relative error is the one `tree_agreement` computes: symmetric in scale, 0 for two zero
    vectors, at most 2.
    """
    manual, reference = np.ravel(manual).astype(np.float64), np.ravel(reference).astype(np.float64)
    diff = manual - reference
    scale = max(np.linalg.norm(reference), np.linalg.norm(manual), np.finfo(np.float64).tiny)
    norms = np.linalg.norm(manual) * np.linalg.norm(reference)
    cosine = float(manual @ reference / norms) if norms > 0 else float(np.array_equal(manual, reference))
    return float(np.max(np.abs(diff), initial=0.0)), float(np.linalg.norm(diff) / scale), cosine


def _ratio(error, bound):
    """error / bound elementwise, 0 where error == 0 (even if bound == 0), NaN stays NaN."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(error == 0, 0.0, error / bound)


def _layer_groups(tree) -> list[int]:
    """For each leaf, the index of its layer (the leaves sharing a parent dict: w and b)."""
    parents = [path[:-1] for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    index = {parent: i for i, parent in enumerate(dict.fromkeys(parents))}
    return [index[parent] for parent in parents]


def _layer_scales(leaves, groups, maximum, zero):
    """The scale each leaf's atol is drawn from, in leaf order (`maximum`: np or jnp.maximum):
    max |r| over the leaf's layer, but at least max |r| over the tree / sqrt(N), so that no entry
    is held to less than 16 ulps of the model's largest gradient (`autodiff_tolerance`)."""
    scales, largest, size = {}, zero, max(1, sum(leaf.size for leaf in leaves))
    for leaf, group in zip(leaves, groups, strict=True):
        leaf_max = abs(leaf).max() if leaf.size else zero
        scales[group] = maximum(scales.get(group, zero), leaf_max)
        largest = maximum(largest, leaf_max)
    return [maximum(scales[group], largest / math.sqrt(size)) for group in groups]


def tree_agreement(manual, reference) -> tuple[jax.Array, jax.Array, jax.Array]:
    """How far a gradient tree is from a reference tree, under the manual-vs-autodiff error model.

    manual, reference: pytrees of float arrays with the same structure, shapes and dtypes (the
    grads from `backprop.value_and_grad` and from `jax.grad` of the loss). Returns three scalars
    in the leaves' dtype:

      max_violation: max over all entries of |m - r| / (atol + rtol |r|), with (atol, rtol) from
        `autodiff_tolerance` for each leaf's dtype and max|r| and the tree's size N. <= 1 means the two agree to
        rounding; > 1 means a real disagreement. NaN if any entry is NaN (so `max_violation <= 1`
        is False); inf if a reference leaf is all zero and the manual one is not.
      rel_error: ||m - r|| / max(||r||, ||m||, tiny) over the whole tree (as in `compare_vectors`).
      max_abs_error: max |m - r| over the tree.

    Pure jnp, no host transfer: jittable, usable inside lax.cond / lax.fori_loop and under vmap
    (e.g. over models). Leaves of size 0 and layers without params contribute nothing; an empty
    tree gives (0, 0, 0).
    """
    jax.tree.map(lambda m, r: None, manual, reference)  # raises on a structure mismatch
    scales = _layer_scales(jax.tree.leaves(reference), _layer_groups(reference), jnp.maximum, 0.0)
    pairs = [(m, r, scale)
             for m, r, scale in zip(jax.tree.leaves(manual), jax.tree.leaves(reference), scales, strict=True) if r.size]
    dtype = jnp.result_type(*[r for _, r, _ in pairs]) if pairs else jnp.float32
    zero = jnp.zeros((), dtype)
    num_params = max(1, sum(r.size for _, r, _ in pairs))
    violation, diff_sq, ref_sq, man_sq, max_abs = zero, zero, zero, zero, zero
    for m, r, scale in pairs:
        diff = jnp.abs(m - r)
        atol, rtol = autodiff_tolerance(r.dtype, num_params, scale)
        ratio = jnp.where(diff == 0, 0, diff / (atol + rtol * jnp.abs(r)))
        violation = jnp.maximum(violation, jnp.max(ratio).astype(dtype))
        diff_sq = diff_sq + jnp.sum(jnp.square(diff)).astype(dtype)
        ref_sq = ref_sq + jnp.sum(jnp.square(r)).astype(dtype)
        man_sq = man_sq + jnp.sum(jnp.square(m)).astype(dtype)
        max_abs = jnp.maximum(max_abs, jnp.max(diff).astype(dtype))
    scale = jnp.maximum(jnp.sqrt(jnp.maximum(ref_sq, man_sq)), jnp.finfo(dtype).tiny)
    return violation, jnp.sqrt(diff_sq) / scale, max_abs


# --- the comparisons ---------------------------------------------------------------------------


def _full_precision(fn):
    """On GPU, float32 matmuls default to TF32 (10-bit mantissa): comparisons run at full precision."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with jax.default_matmul_precision("highest"):
            return fn(*args, **kwargs)

    return wrapper


def _mismatch(name: str, reference: str, manual, expected) -> LeafReport | None:
    """A failing report if a gradient leaf has the wrong shape or dtype (a contract violation)."""
    if jnp.shape(manual) == jnp.shape(expected) and jnp.result_type(manual) == jnp.result_type(expected):
        return None
    nan = float("nan")
    return LeafReport(name, reference, nan, nan, nan, nan, nan, float("inf"))


@compiling.jit(static_argnames=("spec", "value_and_grad", "with_reference", "chunk"))
def _evaluate(params, batch, extra, flat_index, values, *, spec, value_and_grad, with_reference, chunk):
    """Every number one check needs, in one compiled program (one compilation per architecture).

    Returns ((loss, grads) under test, (loss, grads) from jax.grad or None, (f, slope)), where
    f[k] and slope[k] are the loss and its exact derivative along flat coordinate flat_index[k]
    (forward-mode jax.jvp) at params with that coordinate set to values[k] (K points, K may be 0).
    """
    manual = value_and_grad(params, batch, spec, *extra)
    reference = _reference_value_and_grad(params, batch, spec, *extra) if with_reference else None
    flat, unravel = ravel_pytree(params)

    def at_point(point):
        index, value = point
        tangent = jnp.zeros_like(flat).at[index].set(1)
        return jax.jvp(lambda p: losses.loss(unravel(p), batch, spec, *extra), (flat.at[index].set(value),), (tangent,))

    if values.shape[0] == 0:
        samples = (values, values)
    elif values.shape[0] <= chunk:
        samples = jax.vmap(at_point)((flat_index, values))
    else:  # bounded memory: `chunk` points at a time (the caller pads K to a multiple of chunk)
        samples = jax.lax.map(at_point, (flat_index, values), batch_size=chunk)
    return manual, reference, samples


def _key_seed(key) -> np.ndarray:
    """A numpy seed from a jax key (raw uint32 or typed): coordinates are drawn on the host, so
    leaves of every size share one compiled program."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.asarray(key, np.uint32).ravel()


def _sample_points(params, rng: np.random.Generator, coords_per_leaf: int):
    """Per leaf, sampled coordinates and the points p + t h, t in SLOPE_OFFSETS, rounded to the dtype.

    Returns (plan: [(coords, points (len(SLOPE_OFFSETS), n))] per leaf, flat indices, values): one
    evaluation per point, leaf after leaf, offset after offset. The first and last offsets (-1, +1)
    are the central difference's; t = 0 gives p itself.
    """
    plan, indices, values = [], [], []
    offset = 0
    for leaf in jax.tree.leaves(params):
        coords = np.sort(rng.choice(leaf.size, min(coords_per_leaf, leaf.size), replace=False))
        p = np.asarray(leaf).reshape(-1)[coords]
        step = finite_difference_step(leaf.dtype) * np.maximum(1.0, np.abs(p.astype(np.float64)))
        points = (p + SLOPE_OFFSETS[:, None] * step).astype(p.dtype)
        plan.append((coords, points))
        indices.append(np.tile(offset + coords, len(SLOPE_OFFSETS)))
        values.append(points.reshape(-1))
        offset += leaf.size
    return plan, np.concatenate(indices).astype(np.int32), np.concatenate(values)


def _run(params, batch, spec, value_and_grad, dropout_key, with_reference: bool, key=None, coords_per_leaf: int = 0):
    """(autodiff reports or [], finite-difference reports or [], the gradient tree under test,
    jax.grad's tree or None) from one `_evaluate` call."""
    extra = () if dropout_key is None else (dropout_key,)  # gradient functions without the argument still work
    dtype = jnp.result_type(*jax.tree.leaves(params))
    plan, indices, values = [], np.zeros((0,), np.int32), np.zeros((0,), dtype)
    if key is not None:
        plan, indices, values = _sample_points(params, np.random.default_rng(_key_seed(key)), coords_per_leaf)
    count = len(values)
    # ~64 MiB of float64 per vmapped chunk of points: each holds a copy of the params and a forward pass.
    per_point = sum(leaf.size for leaf in jax.tree.leaves(params)) + np.size(batch[0])
    chunk = int(np.clip(2**23 // per_point, 1, max(1, count)))
    pad = -count % chunk if count > chunk else 0  # lax.map takes whole chunks: repeat the first point
    (manual_loss, manual), reference, (f, slope) = _evaluate(
        params, batch, extra, jnp.asarray(np.concatenate([indices, indices[:1].repeat(pad)])),
        jnp.asarray(np.concatenate([values, values[:1].repeat(pad)]), dtype),
        spec=spec, value_and_grad=value_and_grad, with_reference=with_reference, chunk=chunk)
    if jax.tree.structure(manual) != jax.tree.structure(params):
        raise ValueError(f"gradient tree {jax.tree.structure(manual)} does not match params "
                         f"{jax.tree.structure(params)}")
    names, grads = _leaf_names(params), jax.tree.leaves(manual)
    autodiff, auto = [], None
    if with_reference:
        auto_loss, auto = reference
        num_params = max(1, sum(leaf.size for leaf in jax.tree.leaves(params)))
        autodiff.append(_autodiff_report("loss", manual_loss, auto_loss, num_params))
        auto_leaves = [np.asarray(a) for a in jax.tree.leaves(auto)]
        scales = _layer_scales(auto_leaves, _layer_groups(auto), np.maximum, 0.0)
        for name, m, a, scale in zip(names, grads, auto_leaves, scales, strict=True):
            autodiff.append(_mismatch(name, "jax.grad", m, a) or _autodiff_report(name, m, a, num_params, scale))
    if not plan:
        return autodiff, [], manual, auto
    f, slope = np.asarray(f, np.float64)[:count], np.asarray(slope, np.float64)[:count]
    loss_scale = max(1.0, float(np.max(np.abs(f), initial=0.0)))
    finite, start = [], 0
    for name, grad, leaf, (coords, points) in zip(names, grads, jax.tree.leaves(params), plan, strict=True):
        end = start + points.size
        finite.append(_mismatch(name, "finite_difference", grad, leaf) or _finite_difference_report(
            name, np.asarray(grad, np.float64).reshape(-1)[coords], points, f[start:end].reshape(points.shape),
            slope[start:end].reshape(points.shape), loss_scale))
        start = end
    return autodiff, finite, manual, auto


def _autodiff_report(name: str, manual, reference, num_params: int, scale=None) -> LeafReport:
    """scale: max |r| over the leaf's layer (default: over the leaf)."""
    dtype = jnp.result_type(reference)
    m, r = np.asarray(manual, np.float64), np.asarray(reference, np.float64)
    scale = float(np.max(np.abs(r), initial=0.0)) if scale is None else float(scale)
    atol, rtol = autodiff_tolerance(dtype, num_params, scale)
    ratio = _ratio(np.abs(m - r), atol + rtol * np.abs(r))
    return LeafReport(name, "jax.grad", *compare_vectors(m, r), atol=float(atol), rtol=float(rtol),
                      worst_ratio=float(np.max(ratio, initial=0.0)))


def _finite_difference_report(name: str, manual, points, losses_at, slopes_at, loss_scale: float) -> LeafReport:
    """The finite-difference model on one leaf's sampled coordinates.

    manual: (n,) the gradient under test there, float64; points: (len(SLOPE_OFFSETS), n) the
    evaluated parameter values in the leaf's dtype; losses_at, slopes_at: f and df/dp at them.
    """
    half_step = (points[-1].astype(np.float64) - points[0].astype(np.float64)) / 2  # the step actually taken
    estimate = (losses_at[-1] - losses_at[0]) / (2 * half_step)
    atol = finite_difference_roundoff(points.dtype, loss_scale, half_step) + finite_difference_truncation(slopes_at)
    _, rtol = autodiff_tolerance(points.dtype, 1, 0.0)  # the gradient under test carries its own rounding
    ratio = _ratio(np.abs(manual - estimate), atol + rtol * np.abs(estimate))
    return LeafReport(name, "finite_difference", *compare_vectors(manual, estimate),
                      atol=float(np.max(atol, initial=0.0)), rtol=float(rtol),
                      worst_ratio=float(np.max(ratio, initial=0.0)))


@_full_precision
def against_autodiff(params, batch, spec, value_and_grad=backprop.value_and_grad, dropout_key=None) -> list[LeafReport]:
    """Per-leaf comparison of `value_and_grad` with jax.value_and_grad(losses.loss), loss value first.

    params: [{"w", "b"} or {} per layer]; batch: (x, labels); spec: hashable (a static argument);
    value_and_grad(params, batch, spec[, dropout_key]) -> (loss, grads like params): the gradient
    under test, backprop's by default. dropout_key: a fixed key, to check the backward pass through
    one fixed dropout mask (None: no dropout). Leaf names: "loss", then "layer{i}.{b,w}"; layers
    without params have no leaves. Raises ValueError if the gradient tree's structure differs from
    params; a leaf of the wrong shape or dtype FAILs.
    """
    return _run(params, batch, spec, value_and_grad, dropout_key, with_reference=True)[0]


@_full_precision
def against_finite_differences(params, batch, spec, key, coords_per_leaf: int = 20,
                               value_and_grad=backprop.value_and_grad, dropout_key=None) -> list[LeafReport]:
    """Central differences (f(p + h e_i) - f(p - h e_i)) / 2h of f = losses.loss on sampled coordinates.

    key: draws up to coords_per_leaf coordinates per leaf, without replacement. The gradient under
    test comes from `value_and_grad` (as in `against_autodiff`). The bound per coordinate is the
    module's finite-difference model: atol = 8 eps F / h + |(f'(p+h) + f'(p-h)) / 2 - f'(p)|,
    rtol = 16 eps, with h the step actually taken once p +- h is rounded to the dtype.
    """
    return _run(params, batch, spec, value_and_grad, dropout_key, False, key, coords_per_leaf)[1]


@_full_precision
def check(params, batch, spec, key, coords_per_leaf: int = 20, value_and_grad=backprop.value_and_grad,
          dropout_key=None) -> list[LeafReport]:
    """`against_autodiff(...) + against_finite_differences(...)`, computed in one compiled program."""
    return check_with_gradients(params, batch, spec, key, coords_per_leaf, value_and_grad, dropout_key)[0]


@_full_precision
def check_with_gradients(params, batch, spec, key, coords_per_leaf: int = 20, value_and_grad=backprop.value_and_grad,
                         dropout_key=None) -> tuple[list[LeafReport], list, list]:
    """(`check`'s reports, the gradient tree under test, jax.grad's tree), from the same program:
    for a caller that also compares the whole trees (e.g. `tree_agreement`)."""
    autodiff, finite, manual, auto = _run(params, batch, spec, value_and_grad, dropout_key, True, key,
                                          coords_per_leaf)
    return autodiff + finite, manual, auto


def verdict(reports: list[LeafReport]) -> bool:
    return all(r.passed for r in reports)


def format_reports(reports: list[LeafReport]) -> str:
    """A fixed-width table, one row per leaf and reference; ratio = max |err| / (atol + rtol |ref|)."""
    width = max([12] + [len(r.leaf) for r in reports])
    lines = [f"{'leaf':<{width}} {'reference':<18} {'max abs err':>12} {'rel err':>10} {'cosine':>10} "
             f"{'atol':>9} {'rtol':>9} {'ratio':>9}  ok"]
    for r in reports:
        lines.append(
            f"{r.leaf:<{width}} {r.reference:<18} {r.max_abs_error:12.3e} {r.relative_error:10.2e} "
            f"{r.cosine_similarity:10.7f} {r.atol:9.2e} {r.rtol:9.2e} {r.worst_ratio:9.2e}  "
            f"{'PASS' if r.passed else 'FAIL'}"
        )
    return "\n".join(lines)
