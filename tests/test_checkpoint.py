"""Tests for digits.checkpoint: round trip, pruning, corruption, failed saves, mismatches."""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from digits import checkpoint


class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array


def make_state(sizes=(784, 30, 10), seed=0) -> TrainState:
    """A realistic MLP training state with non-trivial values in every leaf."""
    rng = np.random.default_rng(seed)
    params = [
        {
            "w": jnp.asarray(rng.normal(size=(m, n)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(n,)), jnp.float32),
        }
        for m, n in zip(sizes[:-1], sizes[1:])
    ]
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(params)
    # One update so the Adam moments and count are non-zero.
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    _, opt_state = optimizer.update(grads, opt_state, params)
    return TrainState(params, opt_state, jnp.asarray(7, jnp.int32), jax.random.PRNGKey(seed))


def zeros_like_state(state):
    return jax.tree_util.tree_map(jnp.zeros_like, state)


def test_round_trip_restores_identical_tree(tmp_path):
    state = make_state()
    path = checkpoint.save(tmp_path, 100, state, metadata={"config": {"lr": 0.1}, "epoch": 3})
    assert path == tmp_path / "checkpoint_00000100.npz"

    restored, metadata = checkpoint.restore(tmp_path, zeros_like_state(state))

    assert metadata == {"config": {"lr": 0.1}, "epoch": 3}
    assert isinstance(restored, TrainState)
    chex.assert_trees_all_equal_structs(restored, state)
    chex.assert_trees_all_equal(restored, state)  # values
    chex.assert_trees_all_equal_dtypes(restored, state)
    assert restored.key.dtype == jnp.uint32 and restored.step.dtype == jnp.int32
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree_util.tree_leaves(restored))


def test_python_scalar_leaves_and_numpy_metadata(tmp_path):
    state = {"step": 5, "lr": 0.25, "x": np.arange(3, dtype=np.float32)}
    checkpoint.save(tmp_path, 1, state, metadata={"best": np.float32(0.5), "n": np.int64(2)})

    template = {"step": 0, "lr": 0.0, "x": np.zeros(3, np.float32)}
    restored, metadata = checkpoint.restore(tmp_path, template)
    assert metadata == {"best": 0.5, "n": 2}
    assert restored["step"] == 5 and type(restored["step"]) is int
    assert restored["lr"] == 0.25 and type(restored["lr"]) is float
    np.testing.assert_array_equal(restored["x"], np.arange(3, dtype=np.float32))


def test_metadata_header_records_leaves_and_digest(tmp_path):
    state = make_state()
    path = checkpoint.save(tmp_path, 3, state)
    header = checkpoint.read_metadata(path)
    leaves = jax.tree_util.tree_leaves(state)
    assert header["step"] == 3
    assert header["num_leaves"] == len(leaves)
    assert [tuple(s["shape"]) for s in header["leaves"]] == [leaf.shape for leaf in leaves]
    assert [s["dtype"] for s in header["leaves"]] == [str(leaf.dtype) for leaf in leaves]
    assert len(header["sha256"]) == 64


def test_keep_last_n_and_latest_step(tmp_path):
    state = make_state(sizes=(4, 3, 2))
    assert checkpoint.latest_step(tmp_path / "missing") is None
    assert checkpoint.list_steps(tmp_path / "missing") == []
    for step in (10, 20, 30, 40, 50):
        checkpoint.save(tmp_path, step, state, keep=3)
    (tmp_path / "notes.txt").write_text("unrelated")
    (tmp_path / ".checkpoint_abc.tmp").write_bytes(b"partial")  # a killed writer's temp file

    assert checkpoint.list_steps(tmp_path) == [30, 40, 50]
    assert checkpoint.latest_step(tmp_path) == 50
    assert not (tmp_path / "checkpoint_00000010.npz").exists()

    checkpoint.save(tmp_path, 60, state, keep=0)  # keep <= 0 keeps everything
    assert checkpoint.list_steps(tmp_path) == [30, 40, 50, 60]


def test_restore_specific_step_and_missing_step(tmp_path):
    a, b = make_state(seed=1), make_state(seed=2)
    checkpoint.save(tmp_path, 1, a)
    checkpoint.save(tmp_path, 2, b)
    restored, _ = checkpoint.restore(tmp_path, a, step=1)
    chex.assert_trees_all_equal(restored, a)
    with pytest.raises(checkpoint.CheckpointError, match="checkpoint_00000005.npz"):
        checkpoint.restore(tmp_path, a, step=5)


def test_restore_without_checkpoint_raises(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint found"):
        checkpoint.restore(tmp_path, make_state(sizes=(2, 2)))


def assert_one_line_error(excinfo, path):
    message = str(excinfo.value)
    assert path.name in message
    assert "\n" not in message


def test_truncated_file_raises_checkpoint_error(tmp_path):
    state = make_state()
    path = checkpoint.save(tmp_path, 1, state)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(checkpoint.CheckpointError, match="corrupt or truncated") as excinfo:
        checkpoint.restore(tmp_path, state)
    assert_one_line_error(excinfo, path)


def test_empty_file_raises_checkpoint_error(tmp_path):
    path = tmp_path / "checkpoint_00000001.npz"
    path.write_bytes(b"")
    with pytest.raises(checkpoint.CheckpointError, match="corrupt or truncated") as excinfo:
        checkpoint.restore(tmp_path, make_state(sizes=(2, 2)))
    assert_one_line_error(excinfo, path)


def test_byte_flipped_file_raises_checkpoint_error(tmp_path):
    state = make_state()
    path = checkpoint.save(tmp_path, 1, state)
    data = bytearray(path.read_bytes())
    # np.savez stores arrays uncompressed, so the first weight matrix appears verbatim.
    offset = data.find(np.asarray(state.params[0]["w"]).tobytes())
    assert offset > 0
    data[offset + 1000] ^= 0xFF
    path.write_bytes(bytes(data))

    with pytest.raises(checkpoint.CheckpointError, match="corrupt or truncated") as excinfo:
        checkpoint.restore(tmp_path, state)
    assert_one_line_error(excinfo, path)


def test_digest_mismatch_raises_checkpoint_error(tmp_path):
    """A well-formed zip whose leaves differ from the recorded digest is still rejected."""
    state = make_state(sizes=(4, 3))
    path = checkpoint.save(tmp_path, 1, state)
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files}
    arrays["leaf_00000"] = arrays["leaf_00000"] + 1  # same shape/dtype, different bytes
    with open(path, "wb") as f:
        np.savez(f, **arrays)

    with pytest.raises(checkpoint.CheckpointError, match="sha256") as excinfo:
        checkpoint.restore(tmp_path, state)
    assert_one_line_error(excinfo, path)


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_save_leaves_no_partial_file(tmp_path, monkeypatch, failure):
    good = make_state(seed=1)
    checkpoint.save(tmp_path, 1, good)
    before = sorted(p.name for p in tmp_path.iterdir())

    real_savez = np.savez

    def savez_then_fail(file, **arrays):
        real_savez(file, **arrays)  # the bytes reach the temp file, then the write "dies"
        raise failure

    monkeypatch.setattr(checkpoint.np, "savez", savez_then_fail)
    with pytest.raises(type(failure)):
        checkpoint.save(tmp_path, 2, make_state(seed=2))
    monkeypatch.undo()

    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temp, no checkpoint_2
    assert checkpoint.latest_step(tmp_path) == 1
    restored, _ = checkpoint.restore(tmp_path, good)
    chex.assert_trees_all_equal(restored, good)


def test_failed_replace_leaves_no_partial_file(tmp_path, monkeypatch):
    good = make_state(seed=1)
    checkpoint.save(tmp_path, 1, good)

    def fail_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", fail_replace)
    with pytest.raises(OSError, match="rename failed"):
        checkpoint.save(tmp_path, 2, make_state(seed=2))
    monkeypatch.undo()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_00000001.npz"]
    restored, _ = checkpoint.restore(tmp_path, good)
    chex.assert_trees_all_equal(restored, good)


def test_unserialisable_metadata_writes_nothing(tmp_path):
    with pytest.raises(TypeError):
        checkpoint.save(tmp_path, 1, make_state(sizes=(2, 2)), metadata={"f": object()})
    assert list(tmp_path.iterdir()) == []


def test_template_shape_mismatch_raises(tmp_path):
    checkpoint.save(tmp_path, 1, make_state(sizes=(784, 30, 10)))
    with pytest.raises(checkpoint.CheckpointError, match="does not match the current config") as e:
        checkpoint.restore(tmp_path, make_state(sizes=(784, 100, 10)))
    assert_one_line_error(e, tmp_path / "checkpoint_00000001.npz")
    # Names the first differing leaf (dict keys flatten sorted, so "b" precedes "w").
    assert "params[0]['b']: float32(30,) in the checkpoint, float32(100,) expected" in str(e.value)


def test_template_leaf_count_and_dtype_mismatch_raise(tmp_path):
    state = make_state(sizes=(4, 3, 2))
    checkpoint.save(tmp_path, 1, state)
    with pytest.raises(checkpoint.CheckpointError, match="leaves in the checkpoint"):
        checkpoint.restore(tmp_path, make_state(sizes=(4, 3, 3, 2)))
    wrong_dtype = state._replace(step=jnp.asarray(7.0, jnp.float32))
    with pytest.raises(checkpoint.CheckpointError, match="int32"):
        checkpoint.restore(tmp_path, wrong_dtype)


def test_abstract_template_from_eval_shape(tmp_path):
    state = make_state(sizes=(4, 3))
    checkpoint.save(tmp_path, 1, state)
    template = jax.eval_shape(lambda: state)  # ShapeDtypeStruct leaves, nothing allocated
    restored, _ = checkpoint.restore(tmp_path, template)
    chex.assert_trees_all_equal(restored, state)


def test_metadata_is_stored_as_json_not_pickle(tmp_path):
    path = checkpoint.save(tmp_path, 1, {"a": jnp.ones(2)}, metadata={"note": "x"})
    with np.load(path, allow_pickle=False) as data:
        header = json.loads(data[checkpoint.METADATA_KEY].tobytes())
        assert data[checkpoint.METADATA_KEY].dtype == np.uint8
    assert header["metadata"] == {"note": "x"}
