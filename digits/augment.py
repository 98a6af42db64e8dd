"""On-device augmentation of uint8 image batches: integer shifts, rotations, scalings and elastic
distortions (Simard et al. 2003).

Pure functions of a PRNG key, built to run inside the compiled training chunk (under `jax.jit`,
inside `lax.fori_loop`, under `jax.vmap` over models). Pass `fold_in(key, step)` so a resumed
run draws the same augmentations. Images stay uint8 in and out.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """The distribution `augment` draws from, independently for every image of the batch.

    dx, dy: independent integers, each uniform on {-max_shift, ..., max_shift} (drawn as 32 random
        bits mod n = 2 * max_shift + 1: a relative bias below n / 2**32); the content moves dx pixels
        right and dy pixels down; vacated pixels are 0 (background). Nielsen's "expanded" MNIST
        is max_shift=1.
    angle: degrees, uniform on [-max_rotation, +max_rotation]; positive turns the content
        counter-clockwise as displayed (row 0 at the top), about the centre ((H-1)/2, (W-1)/2).
    scale: uniform on [1 - max_scale, 1 + max_scale]; > 1 enlarges the content about the centre.
    elastic (Simard, Steinkraus and Platt 2003): a displacement field of independent U(-1, 1)
        values per pixel and axis, smoothed by a Gaussian of std `elastic_sigma` pixels
        (`scipy.ndimage.gaussian_filter(..., mode="constant", truncate=4)`) and scaled by
        `elastic_alpha` pixels; output pixel p samples the input at p + field(p), after the
        affine map. Off with elastic_alpha = 0.

    With max_rotation = max_scale = elastic_alpha = 0 the shift is exact (pixels are copied).
    Otherwise shift, rotation, scale and the elastic field are one map, resampled once with
    bilinear interpolation in float32 (zero outside the image), rounded half-to-even and clipped
    to [0, 255].
    """

    max_shift: int = 0
    max_rotation: float = 0.0
    max_scale: float = 0.0
    elastic_alpha: float = 0.0
    elastic_sigma: float = 4.0

    def __post_init__(self):
        if isinstance(self.max_shift, bool) or not isinstance(self.max_shift, numbers.Integral) or self.max_shift < 0:
            raise ValueError(f"max_shift must be an int >= 0, got {self.max_shift!r}")
        if not _is_real(self.max_rotation) or not 0 <= self.max_rotation <= 180:
            raise ValueError(f"max_rotation must be a finite number of degrees in [0, 180], got {self.max_rotation!r}")
        if not _is_real(self.max_scale) or not 0 <= self.max_scale < 1:
            raise ValueError(f"max_scale must be a finite number in [0, 1), got {self.max_scale!r}")
        if not _is_real(self.elastic_alpha) or self.elastic_alpha < 0:
            raise ValueError(f"elastic_alpha must be a finite number >= 0, got {self.elastic_alpha!r}")
        if not _is_real(self.elastic_sigma) or self.elastic_sigma <= 0:
            raise ValueError(f"elastic_sigma must be a finite number > 0, got {self.elastic_sigma!r}")

    @property
    def is_identity(self) -> bool:
        return self.max_shift == 0 and self.is_shift_only

    @property
    def is_shift_only(self) -> bool:
        return self.max_rotation == 0 and self.max_scale == 0 and self.elastic_alpha == 0


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def augment(key: jax.Array, images: jax.Array, max_shift: int = 0, max_rotation: float = 0.0,
            max_scale: float = 0.0, elastic_alpha: float = 0.0, elastic_sigma: float = 4.0) -> jax.Array:
    """uint8 (B, H, W) or (B, H, W, C) -> the same shape and dtype; see `Augmentation`.

    The max_* and elastic_* arguments are static Python numbers. All zero returns `images`
    itself. The elastic field draws from fold_in(key, 3), so the shifts, angles and scales of a
    key are the same with and without it.
    """
    aug = Augmentation(max_shift, max_rotation, max_scale, elastic_alpha, elastic_sigma)
    _check_images(images)
    if aug.is_identity:
        return images
    shift_key, angle_key, scale_key = jax.random.split(key, 3)
    batch = images.shape[0]
    span = 2 * aug.max_shift + 1  # bits mod span: about 3x cheaper than jax.random.randint on CPU
    dy, dx = (jax.random.bits(shift_key, (2, batch)) % span).astype(jnp.int32) - aug.max_shift
    if aug.is_shift_only:
        return shift(images, dx, dy, aug.max_shift)
    angle = jax.random.uniform(angle_key, (batch,), jnp.float32, -aug.max_rotation, aug.max_rotation)
    scale = jax.random.uniform(scale_key, (batch,), jnp.float32, 1 - aug.max_scale, 1 + aug.max_scale)
    field = None
    if aug.elastic_alpha:
        field = elastic_field(jax.random.fold_in(key, 3), batch, images.shape[1:3], aug.elastic_alpha,
                              aug.elastic_sigma)
    return warp(images, dx, dy, angle, scale, field)


def gaussian_matrix(size: int, sigma: float) -> np.ndarray:
    """(size, size) float32 G with (G v)[i] = sum_j g(i - j) v[j]: the normalised Gaussian of std
    `sigma` truncated at radius int(4 sigma + 0.5), zero beyond the ends (scipy.ndimage's
    gaussian_filter1d with mode="constant"). A constant of the compiled program."""
    radius = int(4.0 * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    offsets = np.arange(size)[:, None] - np.arange(size)[None, :]
    return np.where(np.abs(offsets) <= radius, taps[np.clip(offsets + radius, 0, 2 * radius)], 0.0).astype(np.float32)


def elastic_field(key: jax.Array, batch: int, shape: tuple[int, int], alpha: float, sigma: float) -> jax.Array:
    """Simard's displacement fields: float32 (B, H, W, 2), (rows, columns) in pixels, alpha times
    U(-1, 1) noise smoothed by a Gaussian of std sigma (two small matmuls per field)."""
    height, width = shape
    # Drawn flat: XLA:CPU takes ~15 s to compile a 4-d threefry draw of this size, 1 s a flat one.
    noise = jax.random.uniform(key, (batch * 2 * height * width,), jnp.float32, -1.0, 1.0)
    noise = noise.reshape(batch, 2, height, width)
    smooth = jnp.einsum("hi,bcij,wj->bhwc", gaussian_matrix(height, sigma), noise, gaussian_matrix(width, sigma))
    return alpha * smooth


def _check_images(images) -> None:
    if images.dtype != jnp.uint8 or images.ndim not in (3, 4):
        raise ValueError(f"images must be uint8 (B, H, W) or (B, H, W, C), got {images.dtype} {images.shape}")


def shift(images: jax.Array, dx: jax.Array, dy: jax.Array, max_shift: int) -> jax.Array:
    """Exact integer shift with zero fill. images (B, H, W[, C]); dx, dy int (B,) in [-max_shift, max_shift].

    Pads the batch by max_shift and cuts each image's window with `dynamic_slice` (the fastest of
    slice / gather / per-offset select on CPU at batch 10 and 128).
    """
    pad = [(0, 0), (max_shift, max_shift), (max_shift, max_shift)] + [(0, 0)] * (images.ndim - 3)
    padded = jnp.pad(images, pad)
    window = images.shape[1:]

    def cut(image, oy, ox):
        start = (max_shift - oy, max_shift - ox) + (0,) * (image.ndim - 2)
        return jax.lax.dynamic_slice(image, start, window)

    return jax.vmap(cut)(padded, dy, dx)


def warp(images: jax.Array, dx: jax.Array, dy: jax.Array, angle: jax.Array, scale: jax.Array,
         field: jax.Array | None = None) -> jax.Array:
    """Shift, rotate (degrees, counter-clockwise) and scale each image about its centre, bilinearly.

    images uint8 (B, H, W[, C]); dx, dy, angle, scale (B,); field: None or (B, H, W, 2) elastic
    displacements (rows, columns). Output pixel p samples the input at
    c + R(-angle) (p - c - (dy, dx)) / scale + field(p), c = ((H-1)/2, (W-1)/2); outside is 0.
    """
    squeeze = images.ndim == 3
    x = images[..., None] if squeeze else images
    if field is None:
        out = jax.vmap(_warp_one)(x, dx, dy, angle, scale)
    else:
        out = jax.vmap(_warp_one)(x, dx, dy, angle, scale, field)
    return out[..., 0] if squeeze else out


def _warp_one(image, dx, dy, angle, scale, field=None):
    """image uint8 (H, W, C); scalars; field None or (H, W, 2) -> uint8 (H, W, C)."""
    height, width, channels = image.shape
    cy, cx = (height - 1) / 2, (width - 1) / 2
    rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32),
                              indexing="ij")
    u = cols - cx - dx.astype(jnp.float32)  # destination, relative to the centre, translation undone
    v = rows - cy - dy.astype(jnp.float32)
    theta = jnp.deg2rad(angle.astype(jnp.float32))
    cos, sin = jnp.cos(theta) / scale, jnp.sin(theta) / scale
    src_col = cx + cos * u - sin * v
    src_row = cy + sin * u + cos * v
    if field is not None:
        src_row, src_col = src_row + field[..., 0], src_col + field[..., 1]
    row0, col0 = jnp.floor(src_row), jnp.floor(src_col)
    fr, fc = (src_row - row0)[..., None], (src_col - col0)[..., None]
    row0, col0 = row0.astype(jnp.int32), col0.astype(jnp.int32)
    # A one-pixel zero border: clipping a tap into it reads 0, so no inside-the-image masks.
    flat = jnp.pad(image, ((1, 1), (1, 1), (0, 0))).astype(jnp.float32).reshape(-1, channels)

    def tap(r, c):
        return flat[(jnp.clip(r, -1, height) + 1) * (width + 2) + jnp.clip(c, -1, width) + 1]

    top = tap(row0, col0) * (1 - fc) + tap(row0, col0 + 1) * fc
    bottom = tap(row0 + 1, col0) * (1 - fc) + tap(row0 + 1, col0 + 1) * fc
    return jnp.clip(jnp.round(top * (1 - fr) + bottom * fr), 0, 255).astype(jnp.uint8)
