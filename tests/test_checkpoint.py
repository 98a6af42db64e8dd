"""Tests for digits.checkpoint (orbax format): round trip, pruning, corruption, mismatches,
old-format directories, resharding between device counts."""

from __future__ import annotations

import logging
import os
import pathlib
import subprocess
import sys
import textwrap
from types import SimpleNamespace
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from digits import checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]


class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array


def make_state(sizes=(784, 30, 10), seed=0) -> TrainState:
    """A realistic MLP training state with non-trivial values in every leaf and, through
    `add_decayed_weights`, EmptyState nodes (no leaves) in the optimizer state."""
    rng = np.random.default_rng(seed)
    params = [
        {"w": jnp.asarray(rng.normal(size=(m, n)), jnp.float32), "b": jnp.asarray(rng.normal(size=(n,)), jnp.float32)}
        for m, n in zip(sizes[:-1], sizes[1:], strict=True)
    ]
    optimizer = optax.chain(optax.add_decayed_weights(1e-4), optax.adam(1e-3))
    opt_state = optimizer.init(params)
    # One update so the Adam moments and count are non-zero.
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    _, opt_state = optimizer.update(grads, opt_state, params)
    return TrainState(params, opt_state, jnp.asarray(7, jnp.int32), jax.random.PRNGKey(seed))


def zeros_like_state(state):
    return jax.tree_util.tree_map(jnp.zeros_like, state)


def assert_one_line(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_round_trip_restores_identical_tree(tmp_path):
    state = make_state()
    assert any(isinstance(node, optax.EmptyState) for node in state.opt_state)  # the case under test
    metadata = {"config": {"lr": 0.1}, "epoch": np.int64(3), "best": np.float32(0.5)}
    path = checkpoint.save(tmp_path, 100, state, metadata=metadata)
    assert path == checkpoint.step_path(tmp_path, 100) == tmp_path / "checkpoint_00000100" and path.is_dir()

    restored, restored_metadata = checkpoint.restore(tmp_path, zeros_like_state(state))

    assert restored_metadata == {"config": {"lr": 0.1}, "epoch": 3, "best": 0.5}
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(state)  # NamedTuples, EmptyState
    assert isinstance(restored, TrainState) and isinstance(restored.opt_state[1][0], optax.ScaleByAdamState)
    chex.assert_trees_all_equal(restored, state)
    chex.assert_trees_all_equal_dtypes(restored, state)
    assert restored.key.dtype == jnp.uint32 and restored.step.dtype == jnp.int32
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree_util.tree_leaves(restored))


def test_host_leaves_come_back_as_their_template_type(tmp_path):
    state = {"step": 5, "lr": 0.25, "x": np.arange(3, dtype=np.float32), "y": np.float64(2.5), "z": jnp.arange(2)}
    checkpoint.save(tmp_path, 1, state)

    template = {"step": 0, "lr": 0.0, "x": np.zeros(3, np.float32), "y": np.float64(0), "z": jnp.zeros(2, jnp.int32)}
    restored, metadata = checkpoint.restore(tmp_path, template)
    assert metadata == {}
    assert restored["step"] == 5 and type(restored["step"]) is int
    assert restored["lr"] == 0.25 and type(restored["lr"]) is float
    assert restored["y"] == 2.5 and type(restored["y"]) is np.float64
    assert type(restored["x"]) is np.ndarray
    np.testing.assert_array_equal(restored["x"], np.arange(3, dtype=np.float32))
    assert isinstance(restored["z"], jax.Array) and restored["z"].tolist() == [0, 1]


def test_abstract_template_without_shardings(tmp_path):
    state = make_state(sizes=(4, 3))
    checkpoint.save(tmp_path, 1, state)
    template = jax.eval_shape(lambda: state)  # ShapeDtypeStructs with sharding=None: the default device
    restored, _ = checkpoint.restore(tmp_path, template)
    chex.assert_trees_all_equal(restored, state)
    assert all(leaf.sharding.device_set == {jax.local_devices()[0]} for leaf in jax.tree_util.tree_leaves(restored))


def test_keep_last_n_and_the_checkpoint_just_written(tmp_path):
    state = make_state(sizes=(4, 3, 2))
    for step in (10, 20, 30, 40):
        checkpoint.save(tmp_path, step, state, keep=3)
    assert checkpoint.list_steps(tmp_path) == [20, 30, 40]
    assert checkpoint.latest_step(tmp_path) == 40

    checkpoint.save(tmp_path, 5, state, keep=3)  # older than all: kept, the oldest other one goes
    assert checkpoint.list_steps(tmp_path) == [5, 30, 40]

    checkpoint.save(tmp_path, 50, state, keep=0)  # keep <= 0 keeps everything
    assert checkpoint.list_steps(tmp_path) == [5, 30, 40, 50]
    names = [checkpoint.step_path(tmp_path, s).name for s in (5, 30, 40, 50)]
    assert sorted(p.name for p in tmp_path.iterdir()) == names  # nothing else left behind


def test_saving_a_step_again_replaces_it(tmp_path):
    checkpoint.save(tmp_path, 3, make_state(sizes=(4, 3), seed=1), metadata={"v": 1})
    second = make_state(sizes=(4, 3), seed=2)
    checkpoint.save(tmp_path, 3, second, metadata={"v": 2})
    restored, metadata = checkpoint.restore(tmp_path, second)
    assert checkpoint.list_steps(tmp_path) == [3] and metadata == {"v": 2}
    chex.assert_trees_all_equal(restored, second)


def test_a_killed_save_is_invisible_and_cleaned_up_by_the_next_save(tmp_path):
    good = make_state(sizes=(4, 3), seed=1)
    checkpoint.save(tmp_path, 10, good)
    # What a SIGKILL in the middle of saving step 20 leaves behind (orbax's tmp-dir name).
    partial = tmp_path / "checkpoint_00000020.orbax-checkpoint-tmp"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "manifest.ocdbt").write_bytes(b"half")
    (tmp_path / "notes.txt").write_text("unrelated")

    assert checkpoint.list_steps(tmp_path) == [10]
    restored, _ = checkpoint.restore(tmp_path, good)
    chex.assert_trees_all_equal(restored, good)
    assert partial.is_dir()  # a reader never deletes what may be another process's save in progress

    checkpoint.save(tmp_path, 20, good)  # a writer owns the directory: it cleans up
    assert not partial.exists() and (tmp_path / "notes.txt").read_text() == "unrelated"
    assert checkpoint.list_steps(tmp_path) == [10, 20]


def test_missing_directory_and_missing_step(tmp_path):
    missing = tmp_path / "missing"
    assert checkpoint.list_steps(missing) == [] and checkpoint.latest_step(missing) is None
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.restore(missing, make_state(sizes=(2, 2)))
    assert_one_line(e, "no checkpoint found in", str(missing))
    assert not missing.exists()  # reading creates nothing

    a, b = make_state(sizes=(4, 3), seed=1), make_state(sizes=(4, 3), seed=2)
    checkpoint.save(tmp_path, 1, a)
    checkpoint.save(tmp_path, 2, b)
    restored, _ = checkpoint.restore(tmp_path, b, step=1)
    chex.assert_trees_all_equal(restored, a)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.restore(tmp_path, a, step=5)
    assert_one_line(e, "no checkpoint for step 5", "[1, 2]")


def largest_file(directory: pathlib.Path) -> pathlib.Path:
    """The biggest array data file of a checkpoint (the 784x30 weights and their Adam moments)."""
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def truncate(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [
    lambda step: truncate(largest_file(step / "state")),
    lambda step: flip_a_byte(largest_file(step / "state")),  # caught by the sha256 digests
    lambda step: (step / "state" / "manifest.ocdbt").unlink(),
    lambda step: (step / "state" / "_METADATA").write_text("{not json"),
    lambda step: (step / "metadata" / "metadata").write_bytes(b""),
], ids=["truncated-data", "flipped-byte", "missing-manifest", "garbled-tree-metadata", "empty-metadata"])
def test_damaged_checkpoint_raises_one_line_checkpoint_error(tmp_path, damage):
    state = make_state()
    checkpoint.save(tmp_path, 1, state)
    path = checkpoint.save(tmp_path, 2, state)
    damage(path)

    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.restore(tmp_path, state)
    assert_one_line(e, "checkpoint_00000002 is corrupt or truncated", "delete it to fall back")
    restored, _ = checkpoint.restore(tmp_path, state, step=1)  # the earlier one is unaffected
    chex.assert_trees_all_equal(restored, state)


async def _read_array_index_and_device_put():  # named like the orbax coroutine whose noise is hidden
    pass


def test_orbax_read_noise_is_hidden_and_nothing_else(monkeypatch):
    """After a failed read, orbax's abandoned coroutines and tensorstore's late callbacks print
    tracebacks from other threads at random moments (so a failing restore cannot show it
    reliably); the hook `restore` installs drops exactly those two."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    checkpoint._hide_orbax_read_noise()
    hook = sys.unraisablehook
    checkpoint._hide_orbax_read_noise()
    assert sys.unraisablehook is hook  # installed once, not once per restore
    abandoned = _read_array_index_and_device_put()
    abandoned.close()
    noise = [SimpleNamespace(exc_value=RuntimeError("Event loop is closed"), object=None),
             SimpleNamespace(exc_value=Exception("Encountered error while reading array index"), object=abandoned)]
    other = [SimpleNamespace(exc_value=RuntimeError("something else"), object=None),
             SimpleNamespace(exc_value=ValueError("Event loop is closed"), object=None)]
    for unraisable in noise + other:
        sys.unraisablehook(unraisable)
    assert seen == other


def test_unserialisable_metadata_writes_nothing(tmp_path):
    with pytest.raises(TypeError):
        checkpoint.save(tmp_path / "run", 1, make_state(sizes=(2, 2)), metadata={"f": object()})
    assert not (tmp_path / "run").exists()


def test_template_shape_mismatch_names_the_leaf(tmp_path):
    checkpoint.save(tmp_path, 1, make_state(sizes=(784, 30, 10)))
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.restore(tmp_path, jax.eval_shape(lambda: make_state(sizes=(784, 100, 10))))  # nothing computed
    # The first differing leaf in path order: the Adam moment of layer 0's bias.
    assert_one_line(e, "checkpoint_00000001 does not match: leaf opt_state.1.0.mu.0.b is float32(30,) in the "
                       "checkpoint, float32(100,) expected", "config differs")


def test_template_dtype_and_leaf_count_mismatch(tmp_path):
    state = make_state(sizes=(4, 3, 2))
    checkpoint.save(tmp_path, 1, state)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.restore(tmp_path, state._replace(step=jnp.asarray(7.0, jnp.float32)))
    assert_one_line(e, "leaf step is int32() in the checkpoint, float32() expected")
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.restore(tmp_path, make_state(sizes=(4, 3, 2, 2)))
    assert_one_line(e, "leaf opt_state.1.0.mu.2.b is in the current state only", "config differs")
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.restore(tmp_path, state._replace(key=None))
    assert_one_line(e, "leaf key is in the checkpoint only")


def test_old_npz_directory_is_refused_in_one_line(tmp_path):
    old = tmp_path / "checkpoint_00000010.npz"
    old.write_bytes(b"PK\x03\x04 an old-format checkpoint")
    state = make_state(sizes=(2, 2))
    for call in (lambda: checkpoint.list_steps(tmp_path), lambda: checkpoint.latest_step(tmp_path),
                 lambda: checkpoint.restore(tmp_path, state), lambda: checkpoint.save(tmp_path, 20, state)):
        with pytest.raises(checkpoint.CheckpointError) as e:
            call()
        assert_one_line(e, str(tmp_path), "old .npz format of digits < 0.2", "start afresh")
    assert [p.name for p in tmp_path.iterdir()] == [old.name]  # nothing written beside it


def test_orbax_info_logging_is_silenced_but_not_absl(tmp_path, caplog):
    from absl import logging as absl_logging

    previous = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.INFO)  # as the CLI does
    try:
        with caplog.at_level(logging.INFO, logger="absl"):
            state = make_state(sizes=(4, 3))
            checkpoint.save(tmp_path, 1, state)
            checkpoint.restore(tmp_path, state)
            absl_logging.info("progress line")
    finally:
        absl_logging.set_verbosity(previous)
    assert [r.getMessage() for r in caplog.records] == ["progress line"]


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_importing_the_module_does_not_import_orbax():
    result = run_python("""
        import sys
        import digits.checkpoint
        print(sorted(m for m in sys.modules if m.startswith("orbax")))
    """)
    assert result.stdout.strip() == "[]"


def test_sharded_round_trip_between_4_devices_and_1(tmp_path):
    """A state sharded over 4 (fake CPU) devices restores onto 1 device, and the reverse."""
    result = run_python(f"""
        import jax
        jax.config.update("jax_num_cpu_devices", 4)  # before any JAX operation
        import numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding
        from digits import checkpoint

        mesh = Mesh(np.array(jax.devices()), ("x",))
        four, one = NamedSharding(mesh, PartitionSpec("x")), SingleDeviceSharding(jax.devices()[0])
        replicated = NamedSharding(mesh, PartitionSpec())
        values = {{"w": np.arange(32, dtype=np.float32).reshape(8, 4), "b": np.arange(8, dtype=np.int32),
                   "step": np.int32(3)}}

        def place(sharding, scalar_sharding):
            return {{k: jax.device_put(v, scalar_sharding if np.ndim(v) == 0 else sharding) for k, v in values.items()}}

        def abstract(tree):
            return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)

        saved = place(four, replicated)
        assert len(saved["w"].addressable_shards) == 4 and saved["w"].addressable_shards[0].data.shape == (2, 4)
        checkpoint.save({str(tmp_path)!r}, 1, saved)
        onto_one, _ = checkpoint.restore({str(tmp_path)!r}, abstract(place(one, one)), step=1)

        checkpoint.save({str(tmp_path)!r}, 2, place(one, one))
        onto_four, _ = checkpoint.restore({str(tmp_path)!r}, abstract(saved), step=2)

        for restored, sharding, scalar_sharding in ((onto_one, one, one), (onto_four, four, replicated)):
            for k, v in values.items():
                expected = scalar_sharding if np.ndim(v) == 0 else sharding
                assert restored[k].sharding == expected, (k, restored[k].sharding)
                np.testing.assert_array_equal(np.asarray(restored[k]), v)
        print("shards", [s.data.shape for s in onto_four["w"].addressable_shards])
    """)
    assert "shards [(2, 4), (2, 4), (2, 4), (2, 4)]" in result.stdout


def test_a_relative_directory_works(tmp_path, monkeypatch):
    """The CLI's default workdir is relative (runs/...); orbax wants absolute paths."""
    monkeypatch.chdir(tmp_path)
    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    checkpoint.save("relative/checkpoints", 5, state)
    assert checkpoint.list_steps("relative/checkpoints") == [5]
    restored, _ = checkpoint.restore("relative/checkpoints", {"w": np.zeros((2, 3), np.float32)})
    np.testing.assert_array_equal(restored["w"], state["w"])


class StateWithModelState(NamedTuple):
    """The state of a later version: one more field, which holds no leaves for most models."""

    params: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array
    model_state: Any


def test_a_checkpoint_without_a_leafless_field_restores_into_a_template_with_it(tmp_path):
    """digits 0.2 checkpoints have no model_state; this version's template has [{}, {}] there."""
    state = make_state()
    checkpoint.save(tmp_path, 7, state)
    template = StateWithModelState(*zeros_like_state(state), model_state=[{}, {}])
    restored, _ = checkpoint.restore(tmp_path, template)
    assert isinstance(restored, StateWithModelState) and restored.model_state == [{}, {}]
    chex.assert_trees_all_equal(restored.params, state.params)
    # and the other way: a state with leaves there does not restore into one without them
    checkpoint.save(tmp_path / "new", 7, StateWithModelState(*state, model_state=[{"mean": jnp.ones(3)}]))
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.restore(tmp_path / "new", template)
