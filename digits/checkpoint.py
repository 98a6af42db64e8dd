"""Atomic save / restore of a training-state pytree with orbax-checkpoint.

Checkpoint `step` is the directory `checkpoint_{step:08d}/` inside the checkpoint directory,
written by `orbax.checkpoint.CheckpointManager`:

    checkpoint_00000080/
      state/       the state's leaves (orbax StandardSave: tensorstore zarr in an OCDBT store)
      metadata/    the caller's metadata (orbax JsonSave)
      sha256/      a digest of every leaf (orbax stores no checksums; see `_digests`)

orbax writes a step into `checkpoint_00000080.orbax-checkpoint-tmp` and renames it when it is
complete, so a reader (or a run killed mid-save) never sees half a checkpoint. `restore` takes a
template (the current run's state, or its abstract shapes) that says which structure, shapes,
dtypes and shardings the leaves must have, so a state saved from 8 devices restores onto 1 and
the reverse.

orbax is imported only inside the functions that use it (it costs ~0.4 s of import time).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import os
import pathlib
import re
import sys
from typing import Any

import jax
import numpy as np

from digits import files

STEP_PREFIX = "checkpoint"  # orbax names a step `{STEP_PREFIX}_{step:08d}`
STEP_DIGITS = 8
STATE_ITEM, METADATA_ITEM, DIGEST_ITEM = "state", "metadata", "sha256"
_OLD_FORMAT_RE = re.compile(r"^checkpoint_\d{8,}\.npz$")  # digits < 0.2 wrote one .npz per step


class CheckpointError(Exception):
    """A checkpoint is missing, corrupt or incompatible; the message is one line."""


def step_path(directory, step: int) -> pathlib.Path:
    """The directory of checkpoint `step` inside `directory` (orbax's standard step name)."""
    return pathlib.Path(directory) / f"{STEP_PREFIX}_{int(step):0{STEP_DIGITS}d}"


def _one_line(error: BaseException) -> str:
    """The innermost cause of `error` in one line: orbax wraps tensorstore's precise message
    ("Requested byte range [0, 86897) is not valid ...") in one that prints a page of JSON."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


# --- orbax plumbing -----------------------------------------------------------------------------


class _DropOrbaxInfo(logging.Filter):
    """Drops orbax's INFO/DEBUG records (dozens per save) from the absl logger; keeps warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


@contextlib.contextmanager
def _quiet_orbax():
    """orbax logs through absl, which the CLI sets to INFO for its own progress log; a filter
    on the absl logger silences orbax alone, and only while this module is calling it."""
    absl_logger, quiet = logging.getLogger("absl"), _DropOrbaxInfo()
    absl_logger.addFilter(quiet)
    try:
        yield
    finally:
        absl_logger.removeFilter(quiet)


def _name_format():
    import orbax.checkpoint as ocp

    return ocp.path.step.standard_name_format(step_prefix=STEP_PREFIX, step_format_fixed_length=STEP_DIGITS)


def _manager(directory: pathlib.Path, keep: int = 0, writer: bool = False):
    """A CheckpointManager for one call (use it as a context manager so that it is closed).

    One manager per call rather than one cached per directory: a manager caches the step list
    at creation and would go stale when another process or a person deletes a step, and its
    `max_to_keep` counts saves in the manager's own order rather than by step number. Creating
    one costs milliseconds (it lists the steps). Saves are synchronous (see `save`).
    """
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep > 0 else None,
        step_prefix=STEP_PREFIX,
        step_format_fixed_length=STEP_DIGITS,
        create=writer,  # (not read_only=True for readers: it logs two warnings per manager)
        # A writer owns the directory: it removes what a killed save left behind. A reader must
        # not, or it would delete the tmp dir of a save in progress in another process.
        cleanup_tmp_directories=writer,
        enable_async_checkpointing=False,
    )
    handlers = {STATE_ITEM: ocp.StandardCheckpointHandler(), METADATA_ITEM: ocp.JsonCheckpointHandler(),
                DIGEST_ITEM: ocp.JsonCheckpointHandler()}
    # orbax's tensorstore paths must be absolute; a workdir is often given relative (runs/...).
    return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options, item_handlers=handlers)


def _check_not_old_format(directory: pathlib.Path) -> None:
    """Refuses a directory of `.npz` checkpoints instead of silently starting a new run in it."""
    if directory.is_dir() and any(_OLD_FORMAT_RE.match(entry.name) for entry in directory.iterdir()):
        raise CheckpointError(
            f"{directory} holds checkpoints in the old .npz format of digits < 0.2, which this version no "
            "longer reads; finish that run with the older version, or delete that directory or use another "
            "--workdir to start afresh"
        )


# --- leaves -------------------------------------------------------------------------------------


def _normalised(path) -> tuple[str, ...]:
    """A tree path with NamedTuple fields, dict keys and list indices all as strings: orbax stores
    NamedTuples as dicts and tuples as lists, so only this form is shared by template and disk."""
    parts = []
    for key in path:
        for attribute in ("name", "key", "idx"):  # GetAttrKey, DictKey / FlattenedIndexKey, SequenceKey
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
        else:
            parts.append(str(key))
    return tuple(parts)


def _label(path: tuple[str, ...]) -> str:
    return ".".join(path) or "<root>"


def _savable(leaf):
    """jax.Arrays go to orbax as they are (global arrays in multi-process runs); anything else
    (numpy arrays and scalars, Python numbers) as a numpy array, which orbax writes from
    process 0."""
    return leaf if isinstance(leaf, jax.Array) else np.asarray(leaf)


def _spec(leaf) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of a template leaf, read without a device transfer."""
    if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
        leaf = np.asarray(leaf)  # Python numbers, as `save` stores them
    return tuple(int(d) for d in leaf.shape), np.dtype(leaf.dtype)


def _abstract(leaf):
    """What orbax restores a template leaf into: arrays onto the leaf's sharding, host values as
    numpy arrays."""
    if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
        sharding = getattr(leaf, "sharding", None)
        if sharding is None:  # e.g. a hand-made ShapeDtypeStruct: the default device
            sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
    shape, dtype = _spec(leaf)
    return np.zeros(shape, dtype)


def _like_template(template_leaf, value):
    """Python numbers and numpy scalars come back as their template's type."""
    if isinstance(template_leaf, (bool, int, float, complex)):
        return type(template_leaf)(np.asarray(value).item())
    if isinstance(template_leaf, np.generic):
        return np.asarray(value, template_leaf.dtype)[()]
    return value


def _digests(paths: list[tuple[str, ...]], leaves: list) -> dict[str, str]:
    """{leaf label: sha256 of its bytes}, or {} when a leaf is not fully addressable (a
    multi-process array: no one process sees all of it, so there is nothing to hash).

    orbax stores no checksums: a flipped byte inside a zstd-compressed chunk restores as wrong
    weights without an error. These digests turn that into a CheckpointError.
    """
    if not all(getattr(leaf, "is_fully_addressable", True) for leaf in leaves):
        return {}
    return {_label(p): hashlib.sha256(np.ascontiguousarray(np.asarray(leaf)).tobytes()).hexdigest()
            for p, leaf in zip(paths, leaves, strict=True)}


# --- public API ---------------------------------------------------------------------------------


def save(directory, step: int, state, metadata: dict | None = None, keep: int = 3) -> pathlib.Path:
    """Atomically writes `state` as checkpoint `step` and prunes old checkpoints.

    Every process of a multi-process run must call this with the same arguments (orbax
    coordinates them; process 0 writes the metadata and the host-value leaves).

    The save is synchronous: when it returns, the checkpoint is complete on disk. MNIST states
    are < 50 MB and take milliseconds to write, while an async save would add a background
    thread that races with process exit (Ctrl-C, SIGTERM) and with orbax's tmp-dir cleanup.

    Args:
      directory: created if missing.
      step: non-negative training step. Saving a step that exists replaces it: the old copy is
        deleted first, so a crash in between loses that step (never an earlier one).
      state: a pytree of jax.Arrays (in multi-process runs: global arrays with a NamedSharding)
        and, in single-process use, numpy arrays or Python / numpy scalars.
      metadata: JSON-serialisable dict (numpy scalars allowed) returned by `restore`.
      keep: how many checkpoints to keep: the one just written and the newest `keep - 1` others
        by step number. <= 0 keeps all.

    Returns:
      The directory of the written checkpoint (`step_path(directory, step)`).

    Raises:
      CheckpointError: `directory` holds checkpoints of the old .npz format.
      TypeError: metadata that JSON cannot represent (nothing is written).
    """
    step = int(step)
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    directory = pathlib.Path(directory)
    _check_not_old_format(directory)
    # Convert before touching the disk so that bad metadata leaves nothing behind.
    metadata = files.to_jsonable(dict(metadata or {}))
    state = jax.tree.map(_savable, state)
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    digests = _digests([_normalised(p) for p, _ in leaves], [leaf for _, leaf in leaves])

    import orbax.checkpoint as ocp

    args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state), METADATA_ITEM: ocp.args.JsonSave(metadata),
                                 DIGEST_ITEM: ocp.args.JsonSave(digests)})
    with _quiet_orbax(), _manager(directory, keep, writer=True) as manager:
        if step in manager.all_steps():  # orbax never overwrites a step
            manager.delete(step)
        # force: orbax would otherwise skip a step below its latest (a run resumed from an
        # earlier checkpoint after a later one was deleted must still be able to save).
        manager.save(step, args=args, force=True)
    return step_path(directory, step)


def list_steps(directory) -> list[int]:
    """Steps of the complete checkpoints in `directory`, ascending ([] if it does not exist).

    Raises:
      CheckpointError: `directory` holds checkpoints of the old .npz format (a run that would
        otherwise start afresh beside them).
    """
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    _check_not_old_format(directory)
    with _quiet_orbax():
        # orbax's own listing: only finalized step directories, never a save in progress.
        return sorted(metadata.step for metadata in _name_format().find_all(directory))


def latest_step(directory) -> int | None:
    """The newest checkpoint step in `directory`, or None if there is none."""
    steps = list_steps(directory)
    return steps[-1] if steps else None


def _corrupt(path: pathlib.Path, error: BaseException) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is corrupt or truncated ({_one_line(error)}); "
        "delete it to fall back to an earlier checkpoint"
    )


def _stored_tree(manager, step: int):
    """The tree of leaf metadata (shape, dtype) recorded in checkpoint `step`, in its on-disk structure."""
    tree = manager.item_metadata(step)[STATE_ITEM]
    if tree is None:
        raise ValueError(f"no {STATE_ITEM!r} item")
    return getattr(tree, "tree", tree)  # orbax >= 0.11 wraps the tree in a TreeMetadata


def _stored_specs(tree) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
    """{normalised leaf path: (shape, dtype)} of a stored tree."""
    return {
        _normalised(path): (tuple(int(d) for d in leaf.shape), np.dtype(leaf.dtype))
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _hide_orbax_read_noise() -> None:
    """Hides the two kinds of unraisable-exception noise that orbax makes when a read fails, so
    that the user sees the one-line CheckpointError only:

    - orbax reads (and opens) the arrays concurrently in an asyncio loop that it closes as soon
      as one fails; tensorstore then completes the others and its callback thread calls
      `call_soon_threadsafe` on the closed loop: 'RuntimeError: Event loop is closed', printed
      with a traceback at any moment after the error;
    - the abandoned read coroutines `except BaseException` and re-raise the GeneratorExit of
      their garbage collection as an Exception: 'Exception ignored in: <coroutine
      _read_array_index_and_device_put>' with a page of tensorstore spec.

    Installed once per process (it must be in place before the failure: the noise comes from
    other threads), it drops exactly those and passes every other unraisable exception on.
    """
    previous = sys.unraisablehook
    if getattr(previous, "hides_orbax_read_noise", False):
        return

    def hook(unraisable):
        error = unraisable.exc_value
        closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
        abandoned_read = (inspect.iscoroutine(unraisable.object)
                          and unraisable.object.__qualname__ == "_read_array_index_and_device_put")
        if not (closed_loop or abandoned_read):
            previous(unraisable)

    hook.hides_orbax_read_noise = True
    sys.unraisablehook = hook


def _check_matches_template(path: pathlib.Path, stored: dict, expected: dict) -> None:
    """The checkpoint has exactly the template's leaves, shapes and dtypes (orbax would silently
    cast a dtype, and its shape errors are pages long)."""
    fix = "the config differs from the one the checkpoint was saved with; use a fresh directory or that config"
    for leaf in sorted(expected.keys() | stored.keys()):
        if leaf not in stored or leaf not in expected:
            where = "the current state only" if leaf not in stored else "the checkpoint only"
            raise CheckpointError(f"checkpoint {path} does not match: leaf {_label(leaf)} is in {where}; {fix}")
        (saved_shape, saved_dtype), (shape, dtype) = stored[leaf], expected[leaf]
        if saved_shape != shape or saved_dtype != dtype:
            raise CheckpointError(
                f"checkpoint {path} does not match: leaf {_label(leaf)} is {saved_dtype}{saved_shape} in the "
                f"checkpoint, {dtype}{shape} expected; {fix}"
            )


def _check_digests(path: pathlib.Path, saved: dict[str, str], restored: dict[str, str]) -> None:
    """The restored bytes are the saved ones (checked where both sides could be hashed)."""
    for leaf, digest in restored.items():
        if leaf in saved and saved[leaf] != digest:
            raise _corrupt(path, ValueError(f"leaf {leaf} differs from its sha256 digest"))


def restore(directory, template, step: int | None = None) -> tuple[Any, dict]:
    """Loads checkpoint `step` (default: the latest) into the structure of `template`.

    Every process of a multi-process run must call this.

    Args:
      directory: where `save` wrote.
      template: a pytree with the current run's structure, shapes, dtypes and shardings: the
        freshly initialised state, or `jax.eval_shape` of its init function with shardings set
        (a ShapeDtypeStruct without one means the default device, single-process only).
      step: which checkpoint; None means the newest.

    Returns:
      (state, metadata): the state has `template`'s tree type (NamedTuples, empty optax states
      included). jax.Array / ShapeDtypeStruct leaves come back as jax.Arrays on the template
      leaf's sharding, whatever the sharding at save time; numpy leaves as numpy arrays; Python
      and numpy scalars as their template's type. metadata is the dict given to `save`.

    Raises:
      CheckpointError: no checkpoint, a corrupt or truncated one, one that does not match the
        template, or a directory of old-format checkpoints.
    """
    directory = pathlib.Path(directory)
    steps = list_steps(directory)
    if step is None:
        if not steps:
            raise CheckpointError(
                f"no checkpoint found in {directory}; "
                "start from scratch or pass the directory that holds the checkpoints"
            )
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"no checkpoint for step {step} in {directory} (steps: {steps or 'none'})")
    path = step_path(directory, step)

    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    paths = [_normalised(p) for p, _ in leaves]
    expected = {p: _spec(leaf) for p, (_, leaf) in zip(paths, leaves, strict=True)}
    abstract_by_path = {p: _abstract(leaf) for p, (_, leaf) in zip(paths, leaves, strict=True)}

    import orbax.checkpoint as ocp

    _hide_orbax_read_noise()
    with _quiet_orbax(), _manager(directory) as manager:
        try:
            stored_tree = _stored_tree(manager, step)
            stored = _stored_specs(stored_tree)
        except Exception as e:  # missing / garbled metadata files: tensorstore, JSON, OS errors
            raise _corrupt(path, e) from e
        _check_matches_template(path, stored, expected)
        # Restored in the structure on disk, leaf by leaf onto the template's: containers without
        # leaves may differ (a checkpoint of digits 0.2 has no model_state, an empty list now).
        abstract = jax.tree_util.tree_map_with_path(lambda p, _: abstract_by_path[_normalised(p)], stored_tree)
        args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract),
                                     METADATA_ITEM: ocp.args.JsonRestore(), DIGEST_ITEM: ocp.args.JsonRestore()})
        try:
            restored = manager.restore(step, args=args)
        except Exception as e:  # shapes, dtypes and shardings are checked by now: the bytes are bad
            raise _corrupt(path, e) from e

    # Match leaves by path, not position: orbax may hand back dicts where the template has
    # NamedTuples, and dicts flatten in key order rather than field order.
    by_path = {_normalised(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(restored[STATE_ITEM])[0]}
    values = [by_path[p] for p in paths]
    _check_digests(path, restored[DIGEST_ITEM] or {}, _digests(paths, values))
    state = [_like_template(leaf, value) for (_, leaf), value in zip(leaves, values, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, state), restored[METADATA_ITEM] or {}
