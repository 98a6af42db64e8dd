"""Data sources: packaged pickle (restricted unpickler), IDX files, TFDS under mock_data."""

import gzip
import io
import os
import pickle

import numpy as np
import pytest

from digits import data


def test_packaged_mnist_is_the_official_split(mnist_splits):
    assert mnist_splits.source == "packaged"
    assert mnist_splits.train.images.shape == (50000, 28, 28) and mnist_splits.train.images.dtype == np.uint8
    assert mnist_splits.validation.images.shape == (10000, 28, 28)
    assert mnist_splits.test.images.shape == (10000, 28, 28)
    assert mnist_splits.train.labels.dtype == np.int32
    assert mnist_splits.train.images.max() == 255 and mnist_splits.train.images.min() == 0
    # Well-known facts of official MNIST: the first training labels and the class counts of test.
    assert mnist_splits.train.labels[:8].tolist() == [5, 0, 4, 1, 9, 2, 1, 3]
    assert np.bincount(mnist_splits.test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_packaged_pixels_round_trip_exactly(tmp_path):
    """The pickle stores k/256; the loader must recover k exactly."""
    with gzip.open(data.packaged_path(), "rb") as f:
        (x_train, _), _, _ = data.safe_unpickle(f)
    dataset = data.load("packaged", cache_dir=tmp_path)
    np.testing.assert_array_equal(dataset.train.images[:100].reshape(100, -1) / np.float32(256), x_train[:100])


def test_cache_is_written_and_reused(tmp_path):
    first = data.load("packaged", cache_dir=tmp_path)
    cached = list(tmp_path.glob("mnist-packaged-*.npz"))
    assert len(cached) == 1
    second = data.load("packaged", cache_dir=tmp_path)
    np.testing.assert_array_equal(first.test.images, second.test.images)


def test_restricted_unpickler_refuses_code():
    class RunsCode:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    payload = pickle.dumps(RunsCode(), protocol=2)
    with pytest.raises(data.DataError, match="refusing to load"):
        data.safe_unpickle(io.BytesIO(payload))


def test_restricted_unpickler_admits_numpy_arrays():
    arrays = (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], np.int64))
    loaded = data.safe_unpickle(io.BytesIO(pickle.dumps(arrays, protocol=2)))
    np.testing.assert_array_equal(loaded[0], arrays[0])
    np.testing.assert_array_equal(loaded[1], arrays[1])


def _write_idx_set(directory, n_train=20, n_test=10, gz=False):
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    for key, array in arrays.items():
        data.write_idx(directory / (data.IDX_FILES[key] + (".gz" if gz else "")), array)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    arrays = _write_idx_set(tmp_path, gz=gz)
    dataset = data.load("idx", idx_dir=tmp_path)
    np.testing.assert_array_equal(dataset.train.images, arrays["train_images"])
    np.testing.assert_array_equal(dataset.test.labels, arrays["test_labels"])
    assert dataset.train.labels.dtype == np.int32 and dataset.source == "idx"


def _corrupt(path, how):
    raw = path.read_bytes()
    if how == "truncated":
        path.write_bytes(raw[:-5])
    elif how == "magic":
        path.write_bytes(b"\x00\x00\x0d\x03" + raw[4:])
    elif how == "trailing":
        path.write_bytes(raw + b"\x00")
    elif how == "header":
        path.write_bytes(raw[:6])


@pytest.mark.parametrize("how,message", [("truncated", "does not match its header"), ("magic", "bad IDX magic"),
                                         ("trailing", "does not match its header"), ("header", "truncated IDX header")])
def test_corrupt_idx_files_are_rejected_clearly(tmp_path, how, message):
    _write_idx_set(tmp_path)
    _corrupt(tmp_path / data.IDX_FILES["train_images"], how)
    with pytest.raises(data.DataError, match=message) as error:
        data.load("idx", idx_dir=tmp_path)
    assert "\n" not in str(error.value) and data.IDX_FILES["train_images"] in str(error.value)


def test_idx_count_mismatch_and_missing_files(tmp_path):
    arrays = _write_idx_set(tmp_path)
    data.write_idx(tmp_path / data.IDX_FILES["train_labels"], arrays["train_labels"][:-1])
    with pytest.raises(data.DataError, match="20 images but .* 19 labels"):
        data.load("idx", idx_dir=tmp_path)
    data.write_idx(tmp_path / data.IDX_FILES["train_labels"], arrays["train_labels"])
    (tmp_path / data.IDX_FILES["test_images"]).unlink()
    with pytest.raises(data.DataError, match="missing IDX file t10k-images"):
        data.load("idx", idx_dir=tmp_path)
    with pytest.raises(data.DataError, match="does not exist"):
        data.load("idx", idx_dir=tmp_path / "nowhere")


def test_idx_labels_with_wrong_rank_are_rejected(tmp_path):
    _write_idx_set(tmp_path)
    data.write_idx(tmp_path / data.IDX_FILES["test_labels"], np.zeros((10, 2), np.uint8))
    with pytest.raises(data.DataError, match="expected 1 dimension"):
        data.load("idx", idx_dir=tmp_path)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_tfds_source_under_mock_data(tmp_path, name):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=24):
        dataset = data.load("tfds", name, tfds_data_dir=tmp_path)
    assert dataset.source == "tfds" and dataset.name == name
    assert dataset.train.images.shape == (24, 28, 28) and dataset.train.images.dtype == np.uint8
    assert dataset.test.labels.shape == (24,) and dataset.test.labels.dtype == np.int32
    assert 0 <= dataset.train.labels.min() and dataset.train.labels.max() < 10


def test_tfds_missing_dataset_names_the_download_flag(tmp_path):
    with pytest.raises(data.DataError, match="--tfds_download"):
        data.load("tfds", "mnist", tfds_data_dir=tmp_path)


def test_auto_prefers_prepared_tfds_else_packaged(tmp_path):
    assert not data.tfds_is_prepared("mnist", tmp_path)
    (tmp_path / "mnist" / "3.0.1").mkdir(parents=True)
    (tmp_path / "mnist" / "3.0.1" / "dataset_info.json").write_text("{}")
    assert data.tfds_is_prepared("mnist", tmp_path)
    with pytest.raises(data.DataError, match="only MNIST is packaged"):
        data.load("auto", "kmnist", tfds_data_dir=tmp_path / "empty")


def test_validation_split_takes_the_last_images(mnist_splits):
    dataset = data.Dataset("x", "test",
                           data.Split(np.arange(10, dtype=np.uint8).reshape(10, 1, 1), np.arange(10, dtype=np.int32)),
                           data.Split(np.zeros((2, 1, 1), np.uint8), np.zeros(2, np.int32)))
    splits = data.split_validation(dataset, 3)
    assert splits.validation.labels.tolist() == [7, 8, 9] and len(splits.train) == 7
    with pytest.raises(data.DataError, match="validation_size"):
        data.split_validation(dataset, 10)


def _book_expansion(images, labels):
    """Nielsen's expand_mnist.py loop, on (N, H, W) images, before its shuffle."""
    pairs = []
    for x, y in zip(images, labels, strict=True):
        pairs.append((x, y))
        for d, axis, position, index in ((1, 0, "first", 0), (-1, 0, "first", x.shape[0] - 1),
                                         (1, 1, "last", 0), (-1, 1, "last", x.shape[1] - 1)):
            new = np.roll(x, d, axis)
            if position == "first":
                new[index, :] = 0
            else:
                new[:, index] = 0
            pairs.append((new, y))
    return pairs


def test_the_expanded_set_is_the_books_made_once_and_shuffled():
    rng = np.random.default_rng(0)
    split = data.Split(rng.integers(1, 256, (3, 5, 4), dtype=np.uint8), np.array([7, 1, 4], np.int32))
    expanded = data.expand_by_shifts(split)
    assert expanded.images.shape == (15, 5, 4) and expanded.images.dtype == np.uint8
    book = sorted((x.tobytes(), int(y)) for x, y in _book_expansion(split.images, split.labels))
    assert sorted((x.tobytes(), int(y)) for x, y in zip(expanded.images, expanded.labels, strict=True)) == book
    assert len(set(book)) == 15  # every shift is a different image (none is lost to a collision)
    again = data.expand_by_shifts(split)
    np.testing.assert_array_equal(again.images, expanded.images)  # one fixed set, whatever the run's seed
    assert not np.array_equal(expanded.labels, np.repeat(split.labels, 5))  # shuffled
    with pytest.raises(data.DataError, match="expand_shifts"):
        data.expand_by_shifts(data.Split(np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2, np.int32)))


def test_expand_shifts_expands_the_training_images_only(tmp_path):
    from digits import experiment
    from digits.config import Config

    config = Config(cache_dir=str(tmp_path), train_examples=100, validation_size=1000, expand_shifts=True)
    dataset = experiment.load_dataset(config)
    plain = experiment.load_dataset(Config(cache_dir=str(tmp_path), train_examples=100, validation_size=1000))
    assert len(dataset.train) == 500 and len(dataset.validation) == len(plain.validation) == 1000
    np.testing.assert_array_equal(dataset.validation.images, plain.validation.images)
    np.testing.assert_array_equal(np.bincount(dataset.train.labels, minlength=10),
                                  5 * np.bincount(plain.train.labels, minlength=10))
