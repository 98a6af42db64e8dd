"""Classify the user's own digit images: find files, preprocess them like MNIST, predict.

MNIST digits are bright ink on black, scaled so the ink fits a 20x20 box (aspect kept) and
placed in a 28x28 field with the ink centre of mass at the centre. A network trained on them
only works on photos and scans prepared the same way, so `to_mnist` repeats that recipe.

Typical use:
    paths = find_images("a.png,scans/")
    results, errors = predict_files(paths, predict_fn)   # predict_fn: uint8 (N,28,28) -> (N,C)
    print(format_table(results))

Every per-file problem is an `ImageError` with a one-line message naming the file, so a batch
with one bad file still classifies the others.
"""

from __future__ import annotations

import os
import pathlib
import struct
import zlib
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MNIST_SIZE = 28  # side of the output field
BOX_SIZE = 20  # MNIST scaled the ink to fit this box inside the field
CENTRE = 14.0  # measured mean ink centre of mass of MNIST (row, col), pixel-index convention
INK_THRESHOLD = 0.2  # ink weaker than this fraction of the strongest ink counts as background
MIN_CONTRAST = 0.08  # strongest ink minus background below this (~20/255) means a blank image
LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601, what PIL's convert("L") uses

PredictFn = Callable[[np.ndarray], np.ndarray]


class ImageError(ValueError):
    """A file could not be used as a digit image; str() is "<file>: <reason>" on one line."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        # Collapse newlines so every error prints as exactly one line, whatever PIL says.
        self.reason = " ".join(str(reason).split())
        super().__init__(f"{self.path}: {self.reason}")


def find_images(spec: str) -> list[pathlib.Path]:
    """Expands "a.png,scans/,b.jpg" into files, in the given order, without duplicates.

    A folder contributes its image files (by suffix, case-insensitive, not recursive) sorted by
    name; a named file is kept whatever its suffix, so the loader can say why it is not an image.
    """
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        raise ImageError(repr(spec), "no files or folders given")
    found: dict[pathlib.Path, None] = {}  # an ordered set
    for item in items:
        for path in _expand(pathlib.Path(item).expanduser()):
            found.setdefault(path)
    return list(found)


def _expand(path: pathlib.Path) -> list[pathlib.Path]:
    """One item of a spec -> its files; a folder without images is an error, not silence."""
    if not path.exists():
        raise ImageError(path, "no such file or folder")
    if not path.is_dir():
        return [path]
    try:
        files = sorted(
            child
            for child in path.iterdir()
            # Dot files are OS litter (macOS "._x.png"), not the user's images.
            if child.suffix.lower() in IMAGE_SUFFIXES
            and not child.name.startswith(".")
            and child.is_file()
        )
    except PermissionError:
        raise ImageError(path, "unreadable folder (permission denied)") from None
    if not files:
        raise ImageError(path, f"folder has no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def load_grayscale(path: str | os.PathLike) -> np.ndarray:
    """Reads any PIL-readable image as float32 (H, W) in [0, 1], 0 = black.

    Transparent areas become white (paper), EXIF rotation is applied, and 16-bit images keep
    their full range. Raises ImageError for missing, empty, unreadable or corrupt files.
    """
    path = pathlib.Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError(path, "empty file")
        with Image.open(path) as img:
            img.load()  # PIL decodes lazily; force it so truncation is caught here
            return _gray_float(ImageOps.exif_transpose(img))
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(path, "no such file") from None
    except IsADirectoryError:
        raise ImageError(path, "is a folder, not an image file") from None
    except PermissionError:
        raise ImageError(path, "unreadable (permission denied)") from None
    except UnidentifiedImageError:
        raise ImageError(path, "not an image file (cannot identify image format)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(path, f"image too large ({e})") from None
    except OSError as e:
        if e.errno is not None:  # a real I/O error from the OS, not a decoder complaint
            raise ImageError(path, f"unreadable ({e.strerror or e})") from None
        raise ImageError(path, f"truncated or corrupt image ({e})") from None
    except (SyntaxError, ValueError, EOFError, struct.error, zlib.error) as e:
        # PIL's decoders signal broken data with all of these, not only OSError.
        raise ImageError(path, f"truncated or corrupt image ({e})") from None


def _gray_float(img: Image.Image) -> np.ndarray:
    """PIL image of any mode -> float32 (H, W) in [0, 1]."""
    if img.mode.startswith("I"):
        # 16/32-bit grayscale; converting to "L" first would clip rather than rescale it.
        # Mode "I" holds 8- or 16-bit data depending on the file: infer the range from values.
        arr = np.asarray(img, np.float32)
        wide = img.mode.startswith("I;16") or arr.max() > 255
        return np.clip(arr / (65535.0 if wide else 255.0), 0.0, 1.0)
    if img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, np.float32))
        return np.clip(arr / 255.0 if arr.max() > 1.0 else arr, 0.0, 1.0)
    if "A" in img.getbands() or "transparency" in img.info:
        # Transparent pixels often store black RGB; without compositing onto white paper a
        # black-on-transparent drawing would turn into a black square.
        rgba = np.asarray(img.convert("RGBA"), np.float32) / 255.0
        alpha = rgba[..., 3]
        return rgba[..., :3] @ LUMA * alpha + (1.0 - alpha)
    if img.mode == "L":
        return np.asarray(img, np.float32) / 255.0
    return np.asarray(img.convert("RGB"), np.float32) / 255.0 @ LUMA  # palette, CMYK, 1, ...


def to_mnist(gray: np.ndarray) -> np.ndarray:
    """float (H, W) in [0, 1], either polarity -> uint8 (28, 28) prepared like MNIST.

    Ink is made bright on black, cropped to its bounding box, resized to fit 20x20 with its
    aspect ratio kept, and pasted so its centre of mass lies at (14, 14) up to rounding.
    Raises ValueError if the image has no ink (blank or nearly uniform).
    """
    ink = _ink(np.asarray(gray, np.float32))
    rows, cols = np.nonzero(ink)
    glyph = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    return _place(_fit_box(glyph))


def _ink(gray: np.ndarray) -> np.ndarray:
    """gray (H, W) -> ink (H, W) in [0, 1]: 1 = strongest ink, 0 = background or faint noise."""
    if gray.ndim != 2 or gray.size == 0:
        raise ValueError(f"expected a non-empty 2-D grayscale image, got shape {gray.shape}")
    if not np.all(np.isfinite(gray)):
        raise ValueError("image contains NaN or infinite values")
    # The border is mostly paper even when strokes touch it, so its median is the background.
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = float(np.median(border))
    ink = 1.0 - gray if background > 0.5 else gray
    background = min(background, 1.0 - background)
    ink = _drop_speckles(ink)  # so one hot pixel sets neither the contrast nor the bounding box
    contrast = float(ink.max()) - background
    if contrast < MIN_CONTRAST:
        raise ValueError(f"no ink found (blank image, contrast {contrast:.3f})")
    ink = (ink - background) / contrast
    # Soft threshold rather than a hard cut: removes paper texture and sensor noise while
    # keeping the anti-aliased ramp at stroke edges continuous.
    return np.clip((ink - INK_THRESHOLD) / (1.0 - INK_THRESHOLD), 0.0, 1.0)


def _drop_speckles(image: np.ndarray) -> np.ndarray:
    """(H, W) -> (H, W): lowers each pixel to at most its brightest 8-neighbour.

    Isolated bright pixels (sensor noise, dust) sink to their surroundings, while any stroke,
    even one pixel wide, has a bright neighbour along it and is unchanged.
    """
    # Pad with the darkest value: replicating edges would give a speckle on the border a twin.
    padded = np.pad(image, 1, constant_values=image.min())
    h, w = image.shape
    brightest = np.full_like(image, -np.inf)
    for dy, dx in [(dy, dx) for dy in (0, 1, 2) for dx in (0, 1, 2) if (dy, dx) != (1, 1)]:
        np.maximum(brightest, padded[dy : dy + h, dx : dx + w], out=brightest)  # no 8x stack
    return np.minimum(image, brightest)


def _fit_box(glyph: np.ndarray) -> np.ndarray:
    """Cropped ink (h, w) -> (h', w') with max(h', w') == 20, aspect kept, peak ink 1."""
    h, w = glyph.shape
    scale = BOX_SIZE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # PIL wants (width, height)
    # Resize in float ("F" mode) so the anti-aliasing is not quantised before the final scaling.
    float_image = Image.fromarray(np.ascontiguousarray(glyph, np.float32))
    small = np.asarray(float_image.resize(size, Image.Resampling.LANCZOS))
    small = np.clip(small, 0.0, None)  # Lanczos rings below zero near sharp edges
    # Downscaling thin strokes dims them; MNIST stroke cores are saturated, so restore peak 1.
    return np.clip(small / max(float(small.max()), 1e-6), 0.0, 1.0)


def _place(glyph: np.ndarray) -> np.ndarray:
    """Glyph (h, w) with h, w <= 20 -> uint8 (28, 28) with its centre of mass at (14, 14).

    Whole-pixel shifts as LeCun did; the glyph is kept entirely inside the field even when
    that leaves the centre of mass slightly off (only for very lopsided glyphs).
    """
    h, w = glyph.shape
    mass = glyph.sum()
    com_row = float(glyph.sum(axis=1) @ np.arange(h)) / mass
    com_col = float(glyph.sum(axis=0) @ np.arange(w)) / mass
    top = min(max(round(CENTRE - com_row), 0), MNIST_SIZE - h)
    left = min(max(round(CENTRE - com_col), 0), MNIST_SIZE - w)
    field = np.zeros((MNIST_SIZE, MNIST_SIZE), np.float32)
    field[top : top + h, left : left + w] = glyph
    return np.round(field * 255.0).astype(np.uint8)


def preprocess_file(path: str | os.PathLike) -> np.ndarray:
    """Image file -> uint8 (28, 28) MNIST-style; ImageError (naming the file) on any problem."""
    gray = load_grayscale(path)
    try:
        return to_mnist(gray)
    except ValueError as e:
        raise ImageError(path, str(e)) from None


def preprocess_files(
    paths: Sequence[str | os.PathLike],
) -> tuple[np.ndarray, list[pathlib.Path], list[str]]:
    """Files -> (uint8 (N, 28, 28) images, the N files that worked, one-line errors for others)."""
    images, good, errors = [], [], []
    for path in paths:
        try:
            images.append(preprocess_file(path))
            good.append(pathlib.Path(path))
        except ImageError as e:
            errors.append(str(e))
    stacked = np.stack(images) if images else np.zeros((0, MNIST_SIZE, MNIST_SIZE), np.uint8)
    return stacked, good, errors


def classify(
    images: np.ndarray,
    paths: Sequence[str | os.PathLike],
    predict_fn: PredictFn,
    top_k: int = 3,
) -> list[dict]:
    """uint8 (N, 28, 28) images of `paths` -> one result dict per image (see `predict_files`)."""
    if len(images) != len(paths):
        raise ValueError(f"{len(images)} images but {len(paths)} paths")
    if len(images) == 0:
        return []  # models may not accept an empty batch
    probs = np.asarray(predict_fn(images), np.float64)  # one call: batching is what's fast
    if probs.ndim != 2 or probs.shape[0] != len(images):
        raise ValueError(f"predict_fn returned shape {probs.shape}, expected ({len(images)}, C)")
    order = np.argsort(-probs, axis=1, kind="stable")[:, : max(1, top_k)]
    return [
        {
            "file": str(path),
            "prediction": int(ranked[0]),
            "probability": float(row[ranked[0]]),
            "top_k": [[int(c), float(row[c])] for c in ranked],
        }
        for path, row, ranked in zip(paths, probs, order, strict=True)
    ]


def predict_files(
    paths: Sequence[str | os.PathLike], predict_fn: PredictFn, top_k: int = 3
) -> tuple[list[dict], list[str]]:
    """Preprocesses and classifies files; bad files are reported, not fatal.

    predict_fn: uint8 (N, 28, 28) -> class probabilities (N, C), called once for all good files.
    Returns (results, errors): results in input order, each
    {"file": str, "prediction": int, "probability": float, "top_k": [[class, prob], ...]};
    errors are one-line "<file>: <reason>" strings for files that could not be used.
    """
    images, good, errors = preprocess_files(paths)
    return classify(images, good, predict_fn, top_k), errors


def format_table(results: Sequence[dict]) -> str:
    """Result dicts from `predict_files` -> aligned plain-text table, one row per file."""
    k = len(results[0]["top_k"]) if results else 3
    header = ("file", "digit", "prob", f"top-{k}")
    rows = [
        (
            r["file"],
            str(r["prediction"]),
            f"{r['probability']:.3f}",
            "  ".join(f"{c}:{p:.2f}" for c, p in r["top_k"]),
        )
        for r in results
    ]
    width = max(len(row[0]) for row in [header, *rows])
    return "\n".join(
        f"{file:<{width}}  {digit:>5}  {prob:>5}  {top}".rstrip()
        for file, digit, prob, top in [header, *rows]
    )


def save_preprocessed(
    images: np.ndarray, paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike
) -> list[pathlib.Path]:
    """Writes uint8 (N, 28, 28) images as out_dir/<stem>_28x28.png, to show what the net saw.

    Same-stem inputs (a/x.png, b/x.jpg) get _2, _3, ... suffixes rather than overwriting.
    """
    if len(images) != len(paths):
        raise ValueError(f"{len(images)} images but {len(paths)} paths")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[pathlib.Path] = []
    for image, path in zip(images, paths, strict=True):
        stem, n = pathlib.Path(path).stem, 1
        target = out_dir / f"{stem}_28x28.png"
        while target in written:
            n += 1
            target = out_dir / f"{stem}_{n}_28x28.png"
        Image.fromarray(np.asarray(image, np.uint8)).save(target)
        written.append(target)
    return written
