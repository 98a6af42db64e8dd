"""Tests for digits.augment: exact shifts, determinism, jit / fori_loop / vmap, rotation, scale and
elastic distortions."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from digits import augment

KEY = jax.random.PRNGKey(0)
# Compiled once per shape and setting: eager dispatch of the many small ops would dominate the run time.
run = jax.jit(augment.augment, static_argnames=("max_shift", "max_rotation", "max_scale", "elastic_alpha",
                                               "elastic_sigma"))
warp = jax.jit(augment.warp)
shift = jax.jit(augment.shift, static_argnums=3)


def random_images(shape, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randint(0, 256, shape, dtype=np.uint8))


def shifted(image: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Reference: content moves dx right and dy down, zero fill (numpy, any trailing channels)."""
    out = np.zeros_like(image)
    h, w = image.shape[:2]
    if abs(dx) >= w or abs(dy) >= h:
        return out
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = image[max(-dy, 0):h - max(dy, 0),
                                                                      max(-dx, 0):w - max(dx, 0)]
    return out


def matching_shifts(image, out, max_shift):
    return [(dx, dy) for dx in range(-max_shift, max_shift + 1) for dy in range(-max_shift, max_shift + 1)
            if np.array_equal(shifted(image, dx, dy), out)]


def blob(size=28, sigma=3.0, centre=None):
    """A symmetric Gaussian blob, uint8 (size, size)."""
    c = (size - 1) / 2 if centre is None else centre
    r, q = np.mgrid[:size, :size]
    return np.round(255 * np.exp(-((r - c) ** 2 + (q - c) ** 2) / (2 * sigma ** 2))).astype(np.uint8)


def centre_of_mass(image):
    image = np.asarray(image, np.float64)
    r, q = np.mgrid[:image.shape[0], :image.shape[1]]
    return (r * image).sum() / image.sum(), (q * image).sum() / image.sum()


def test_zero_settings_return_the_images_unchanged():
    images = random_images((4, 28, 28))
    assert augment.augment(KEY, images) is images
    assert augment.augment(KEY, images, 0, 0.0, 0.0) is images


@pytest.mark.parametrize("shape, max_shift", [((12, 9, 7), 2), ((6, 8, 8, 3), 1)])
def test_shift_only_is_an_exact_shift_in_range(shape, max_shift):
    images = random_images(shape, seed=max_shift)
    out = run(KEY, images, max_shift=max_shift)
    chex.assert_shape(out, shape)
    chex.assert_type(out, jnp.uint8)
    for image, result in zip(np.asarray(images), np.asarray(out), strict=True):
        assert matching_shifts(image, result, max_shift), "output is not a shift of its input"


@pytest.mark.parametrize("max_shift", [1, 2])
def test_every_shift_occurs_over_a_batch(max_shift):
    # Random images are distinct under every shift, so each output identifies its (dx, dy).
    images = random_images((200, 8, 8), seed=3)
    out = np.asarray(run(jax.random.PRNGKey(7), images, max_shift=max_shift))
    seen = set()
    for image, result in zip(np.asarray(images), out, strict=True):
        (found,) = matching_shifts(image, result, max_shift)
        seen.add(found)
    assert len(seen) == (2 * max_shift + 1) ** 2


def test_shift_larger_than_the_image_gives_blank_images():
    images = random_images((30, 3, 3))
    out = np.asarray(run(KEY, images, max_shift=5))
    for image, result in zip(np.asarray(images), out, strict=True):
        assert matching_shifts(image, result, 5)


@pytest.mark.parametrize("settings", [dict(max_shift=1), dict(max_shift=1, max_rotation=15.0, max_scale=0.1),
                                      dict(elastic_alpha=34.0)])
def test_deterministic_from_the_key(settings):
    images = random_images((16, 28, 28))
    first = run(jax.random.PRNGKey(1), images, **settings)
    chex.assert_trees_all_equal(first, run(jax.random.PRNGKey(1), images, **settings))
    assert not np.array_equal(first, run(jax.random.PRNGKey(2), images, **settings))


@pytest.mark.parametrize("settings", [dict(max_shift=2), dict(max_shift=1, max_rotation=10.0, max_scale=0.1),
                                      dict(max_shift=1, elastic_alpha=8.0, elastic_sigma=2.0)])
def test_same_result_in_jit_fori_loop_and_vmapped_models(settings):
    images = random_images((5, 10, 10))
    keys = jax.random.split(KEY, 3)
    expected = np.stack([run(jax.random.fold_in(k, 2), images, **settings) for k in keys])

    traces = []

    @jax.jit
    def in_a_chunk(model_keys, images):
        traces.append(1)

        def one_model(key):  # what the training chunk does: a loop of steps, keyed by fold_in(key, step)
            def body(step, acc):
                out = augment.augment(jax.random.fold_in(key, step), images, **settings)
                return jnp.where(step == 2, out, acc)

            return jax.lax.fori_loop(0, 4, body, jnp.zeros_like(images))

        return jax.vmap(one_model)(model_keys)

    out = in_a_chunk(keys, images)
    chex.assert_shape(out, (3,) + images.shape)
    chex.assert_type(out, jnp.uint8)
    np.testing.assert_array_equal(out, expected)
    in_a_chunk(jax.random.split(KEY, 3)[::-1], images)
    assert len(traces) == 1  # new keys, no retrace
    assert not np.array_equal(out[0], out[1])  # per-model keys give per-model augmentations


def test_vmap_over_models_with_a_batch_per_model():
    images = random_images((2, 4, 8, 8))
    keys = jax.random.split(KEY, 2)
    out = jax.jit(jax.vmap(lambda k, x: run(k, x, max_shift=1)))(keys, images)
    for k, x, o in zip(keys, images, out, strict=True):
        np.testing.assert_array_equal(o, run(k, x, max_shift=1))


def test_warp_with_no_rotation_or_scale_is_the_exact_shift():
    images = random_images((9, 12, 12))
    dx = jnp.array([-1, 0, 1] * 3)
    dy = jnp.array([-1] * 3 + [0] * 3 + [1] * 3)
    ones = jnp.ones(9)
    out = warp(images, dx, dy, jnp.zeros(9), ones)
    np.testing.assert_array_equal(out, shift(images, dx, dy, 1))
    np.testing.assert_array_equal(warp(images, 0 * dx, 0 * dy, jnp.zeros(9), ones), images)


def test_warp_rotates_counter_clockwise_and_scales_about_the_centre():
    image = np.zeros((1, 9, 9), np.uint8)
    image[0, 4, 7] = 200  # three pixels right of the centre (4, 4)
    zero, one = jnp.zeros(1, jnp.int32), jnp.ones(1)
    rotated = np.asarray(warp(jnp.asarray(image), zero, zero, jnp.array([90.0]), one))[0]
    assert rotated[1, 4] == 200 and rotated.sum() == 200  # now three pixels above the centre
    image = np.zeros((1, 9, 9), np.uint8)
    image[0, 4, 5] = 200  # one pixel right of the centre
    doubled = np.asarray(warp(jnp.asarray(image), zero, zero, jnp.zeros(1), 2 * one))[0]
    np.testing.assert_array_equal(doubled[4, 4:9], [0, 100, 200, 100, 0])  # now two pixels right
    assert doubled.sum() == 4 * 200  # a 3x3 tent: ink grows with the area


@pytest.mark.parametrize("max_rotation, max_scale", [(30.0, 0.0), (0.0, 0.1), (180.0, 0.2)])
def test_rotation_and_scale_keep_range_centre_and_ink(max_rotation, max_scale):
    images = jnp.asarray(np.stack([blob(28, sigma) for sigma in (2.0, 3.0, 4.0)] * 4))
    out = run(jax.random.PRNGKey(4), images, max_rotation=max_rotation, max_scale=max_scale)
    chex.assert_shape(out, images.shape)
    chex.assert_type(out, jnp.uint8)
    assert not np.array_equal(out, images)
    for before, after in zip(np.asarray(images), np.asarray(out), strict=True):
        np.testing.assert_allclose(centre_of_mass(after), (13.5, 13.5), atol=0.1)
        scale_bound = (1 + max_scale) ** 2  # ink scales with area
        ratio = after.astype(np.float64).sum() / before.astype(np.float64).sum()
        assert 1 / scale_bound - 0.02 <= ratio <= scale_bound + 0.02


def test_rotation_and_shift_together_move_the_centre_by_at_most_the_shift():
    images = jnp.asarray(np.stack([blob(28, 2.5)] * 40))
    out = run(KEY, images, max_shift=2, max_rotation=20.0, max_scale=0.1)
    offsets = np.array([centre_of_mass(o) for o in np.asarray(out)]) - 13.5
    assert np.abs(offsets).max() <= 2.1
    assert len({tuple(np.round(o).astype(int)) for o in offsets}) > 10


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_shift=-1), "max_shift"),
    (dict(max_shift=1.0), "max_shift"),
    (dict(max_shift=True), "max_shift"),
    (dict(max_rotation=-1.0), "max_rotation"),
    (dict(max_rotation=181.0), "max_rotation"),
    (dict(max_rotation=float("nan")), "max_rotation"),
    (dict(max_scale=1.0), "max_scale"),
    (dict(max_scale=-0.1), "max_scale"),
    (dict(max_scale=float("inf")), "max_scale"),
    (dict(elastic_alpha=-1.0), "elastic_alpha"),
    (dict(elastic_alpha=1.0, elastic_sigma=0.0), "elastic_sigma"),
])
def test_bad_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        augment.augment(KEY, random_images((2, 4, 4)), **kwargs)


def test_bad_images_raise_value_error():
    with pytest.raises(ValueError, match="uint8"):
        augment.augment(KEY, jnp.zeros((2, 4, 4), jnp.float32), max_shift=1)
    with pytest.raises(ValueError, match="uint8"):
        augment.augment(KEY, jnp.zeros((4, 4), jnp.uint8), max_shift=1)


@pytest.mark.parametrize("size,sigma", [(28, 4.0), (28, 1.5), (10, 6.0)])
def test_the_elastic_smoothing_is_scipys_gaussian_filter(size, sigma):
    from scipy import ndimage

    noise = np.random.RandomState(0).uniform(-1, 1, (size, size)).astype(np.float32)
    g = augment.gaussian_matrix(size, sigma)
    expected = ndimage.gaussian_filter(noise, sigma, mode="constant", truncate=4.0)
    np.testing.assert_allclose(g @ noise @ g.T, expected, atol=1e-6)


def test_elastic_distortion_is_the_warp_by_its_field_from_its_own_stream():
    images = jnp.asarray(np.stack([blob(sigma=4.0)] * 8))
    out = run(KEY, images, elastic_alpha=34.0)
    field = augment.elastic_field(jax.random.fold_in(KEY, 3), 8, (28, 28), 34.0, 4.0)
    zeros, ones = jnp.zeros(8, jnp.int32), jnp.ones(8, jnp.float32)
    np.testing.assert_array_equal(out, jax.jit(augment.warp)(images, zeros, zeros, 0 * ones, ones, field))
    assert not np.array_equal(out[0], out[1]) and 0 < float(jnp.abs(field).max()) < 10
    # The shifts, angles and scales a key draws do not change when elastic distortions are added.
    both = run(KEY, images, max_shift=2, max_rotation=10.0, elastic_alpha=1e-4)
    np.testing.assert_array_equal(both, run(KEY, images, max_shift=2, max_rotation=10.0))
