"""Atomic save / restore of a training-state pytree as `.npz` files.

A checkpoint `checkpoint_{step:08d}.npz` holds the flattened leaves of the state (`leaf_00000`,
...) plus a `__metadata__` entry: UTF-8 JSON (stored as a uint8 array so that loading never
needs pickle) with the step, each leaf's shape / dtype / tree path, the caller's metadata and a
sha256 digest of the leaf bytes. The tree structure itself is not stored: `restore` takes a
template pytree (the freshly initialised state) and checks the leaves against it.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from digits import files

FORMAT_VERSION = 1
METADATA_KEY = "__metadata__"
_NAME_RE = re.compile(r"^checkpoint_(\d{8,})\.npz$")
_TMP_PREFIX = ".checkpoint_"  # leading dot + no `.npz` suffix: never matched by _NAME_RE
_TMP_SUFFIX = ".tmp"


class CheckpointError(Exception):
    """A checkpoint is missing, corrupt or incompatible; the message is one line."""


def checkpoint_path(directory, step: int) -> pathlib.Path:
    """Path of the checkpoint file for `step` inside `directory`."""
    return pathlib.Path(directory) / f"checkpoint_{step:08d}.npz"


def _leaf_key(index: int) -> str:
    return f"leaf_{index:05d}"


def _one_line(error: BaseException) -> str:
    # Library errors (zipfile, numpy) can span lines; ours promise one line.
    return " ".join(f"{type(error).__name__}: {error}".split())


def _to_host(leaf) -> np.ndarray:
    """One leaf as a host numpy array (device arrays are copied off the accelerator)."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        # Typed keys (jax.random.key) have no numpy dtype; raw uint32 keys (PRNGKey) are fine.
        raise TypeError("typed PRNG key leaves are not supported; store jax.random.key_data(key)")
    return np.asarray(jax.device_get(leaf))


def _digest(arrays: list[np.ndarray]) -> str:
    """sha256 over the C-ordered bytes of every leaf, in leaf order."""
    h = hashlib.sha256()
    for array in arrays:
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def _leaf_specs(state) -> tuple[list[str], list[tuple[int, ...]], list[str]]:
    """Tree paths, shapes and dtypes of the leaves of `state`, in `tree_flatten` order.

    Array-likes (including `jax.ShapeDtypeStruct`) are read without a device transfer; Python
    scalars go through `np.asarray`, exactly as `save` would store them.
    """
    paths, shapes, dtypes = [], [], []
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            leaf = np.asarray(leaf)
        paths.append(jax.tree_util.keystr(path))
        shapes.append(tuple(int(d) for d in leaf.shape))
        dtypes.append(str(np.dtype(leaf.dtype)))
    return paths, shapes, dtypes


def _write_atomically(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    """Writes `arrays` to `path` so that a reader only ever sees no file or a complete one."""
    with files.atomic_open(path, "wb", prefix=_TMP_PREFIX, suffix=_TMP_SUFFIX) as f:
        np.savez(f, **arrays)


def save(directory, step: int, state, metadata: dict | None = None, keep: int = 3) -> pathlib.Path:
    """Atomically writes `state` as checkpoint `step` and prunes old checkpoints.

    Args:
      directory: created if missing.
      step: non-negative training step; an existing checkpoint of the same step is replaced.
      state: any pytree of arrays / scalars (typed PRNG keys excluded: use uint32 raw keys).
      metadata: JSON-serialisable dict (numpy scalars allowed) returned by `restore`.
      keep: how many of the newest checkpoints to keep; <= 0 keeps all. The checkpoint just
        written is always kept, even if older-numbered than the others.

    Returns:
      The path of the written checkpoint.
    """
    step = int(step)
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    leaves = [_to_host(leaf) for leaf in jax.tree_util.tree_leaves(state)]
    paths = _leaf_specs(state)[0]
    header = {
        "format": FORMAT_VERSION,
        "step": step,
        "num_leaves": len(leaves),
        "leaves": [
            {"path": p, "shape": list(a.shape), "dtype": str(a.dtype)}
            for p, a in zip(paths, leaves)
        ],
        "sha256": _digest(leaves),
        "metadata": dict(metadata or {}),
    }
    # Serialise before touching the disk so a bad metadata value leaves nothing behind.
    header_bytes = json.dumps(files.to_jsonable(header), sort_keys=True).encode("utf-8")
    arrays = {_leaf_key(i): a for i, a in enumerate(leaves)}
    arrays[METADATA_KEY] = np.frombuffer(header_bytes, dtype=np.uint8)

    path = checkpoint_path(directory, step)
    _write_atomically(path, arrays)
    if keep > 0:
        _prune(directory, keep, protect=step)
    return path


def _prune(directory: pathlib.Path, keep: int, protect: int) -> None:
    """Deletes all but the newest `keep` checkpoints, never the one numbered `protect`."""
    for old in list_steps(directory)[:-keep]:
        if old != protect:
            try:
                checkpoint_path(directory, old).unlink()
            except FileNotFoundError:  # another process pruned it first
                pass


def list_steps(directory) -> list[int]:
    """Steps of the complete checkpoints in `directory`, ascending ([] if it does not exist)."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    steps = []
    for entry in directory.iterdir():
        match = _NAME_RE.match(entry.name)
        if match and entry.is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def latest_step(directory) -> int | None:
    """The newest checkpoint step in `directory`, or None if there is none."""
    steps = list_steps(directory)
    return steps[-1] if steps else None


def _corrupt(path, error: BaseException) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is corrupt or truncated ({_one_line(error)}); "
        "delete it to fall back to an earlier checkpoint"
    )


def _read(path: pathlib.Path, with_leaves: bool) -> tuple[dict, list[np.ndarray]]:
    """Reads the header (and optionally every leaf); any read failure is a CheckpointError."""
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(data[METADATA_KEY].tobytes().decode("utf-8"))
            count = int(header["num_leaves"]) if with_leaves else 0
            leaves = [data[_leaf_key(i)] for i in range(count)]
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {path} does not exist; check the directory and step"
        ) from None
    # BadZipFile (truncation, CRC), ValueError (npy header), EOFError (empty file), KeyError
    # (missing entry), UnicodeDecodeError / JSONDecodeError (metadata), OSError (read).
    except (zipfile.BadZipFile, ValueError, EOFError, KeyError, TypeError, OSError) as e:
        raise _corrupt(path, e) from e
    return header, leaves


def _check_integrity(path: pathlib.Path, header: dict, leaves: list[np.ndarray]) -> None:
    """The leaves are exactly the bytes (and shapes / dtypes) that `save` wrote."""
    if header.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format {header.get('format')!r}, expected {FORMAT_VERSION}; "
            "restore it with the code version that wrote it"
        )
    if len(header.get("leaves", ())) != len(leaves):
        raise _corrupt(path, ValueError("leaf list and leaf count disagree"))
    for i, (spec, leaf) in enumerate(zip(header["leaves"], leaves)):
        if list(leaf.shape) != spec["shape"] or str(leaf.dtype) != spec["dtype"]:
            raise _corrupt(path, ValueError(f"leaf {i} differs from its recorded shape/dtype"))
    if _digest(leaves) != header.get("sha256"):
        raise _corrupt(path, ValueError("sha256 digest mismatch"))


def _check_matches_template(path: pathlib.Path, header: dict, template) -> None:
    """The checkpoint has the same leaf count, shapes and dtypes as the current state."""
    paths, shapes, dtypes = _leaf_specs(template)
    fix = "use a fresh directory or restore with the config the checkpoint was saved with"
    if header["num_leaves"] != len(shapes):
        raise CheckpointError(
            f"checkpoint {path} does not match the current config "
            f"({header['num_leaves']} leaves in the checkpoint, {len(shapes)} expected); {fix}"
        )
    for spec, p, shape, dtype in zip(header["leaves"], paths, shapes, dtypes):
        if tuple(spec["shape"]) != shape or spec["dtype"] != dtype:
            raise CheckpointError(
                f"checkpoint {path} does not match the current config (leaf {p or '<root>'}: "
                f"{spec['dtype']}{tuple(spec['shape'])} in the checkpoint, {dtype}{shape} "
                f"expected); {fix}"
            )


def _as_template_leaf(template_leaf, value: np.ndarray):
    """Python scalars come back as the same Python type; everything else as a jnp array."""
    if isinstance(template_leaf, (bool, int, float, complex)):
        return type(template_leaf)(value.item())
    return jnp.asarray(value)


def restore(directory, template, step: int | None = None) -> tuple[Any, dict]:
    """Loads checkpoint `step` (default: the latest) into the structure of `template`.

    Args:
      directory: where `save` wrote.
      template: a pytree with the structure, leaf shapes and dtypes of the saved state (e.g.
        the freshly initialised state, or `jax.eval_shape` of the init function).
      step: which checkpoint; None means the newest.

    Returns:
      (state, metadata): the state as `template`'s tree with jnp-array leaves (Python-scalar
      template leaves stay Python scalars), and the metadata dict given to `save`.

    Raises:
      CheckpointError: no checkpoint, a corrupt / truncated file, or a template mismatch.
    """
    directory = pathlib.Path(directory)
    if step is None:
        step = latest_step(directory)
        if step is None:
            raise CheckpointError(
                f"no checkpoint found in {directory}; "
                "start from scratch or pass the directory that holds the checkpoints"
            )
    path = checkpoint_path(directory, step)
    header, leaves = _read(path, with_leaves=True)
    _check_integrity(path, header, leaves)
    _check_matches_template(path, header, template)
    template_leaves, treedef = jax.tree_util.tree_flatten(template)
    restored = [_as_template_leaf(t, v) for t, v in zip(template_leaves, leaves)]
    return jax.tree_util.tree_unflatten(treedef, restored), header["metadata"]


def read_metadata(path) -> dict:
    """The full header of one checkpoint file (step, leaves, sha256, user `metadata`)."""
    return _read(pathlib.Path(path), with_leaves=False)[0]
