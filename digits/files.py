"""Atomic file writes (a reader sees the old file or the complete new one, never half of one) and
the conversion of results to JSON."""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile

import numpy as np


def _fsync_directory(directory: pathlib.Path) -> None:
    """Makes the rename durable; some platforms cannot open directories, which is harmless."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb", prefix: str | None = None, suffix: str = ".tmp"):
    """Opens a temp file beside `path`; on success it is fsynced and renamed over `path`.

    On any exception (KeyboardInterrupt included) the temp file is removed and `path` is left as
    it was. `prefix`/`suffix` name the temp file (default `.<name>.`), so that directory
    listings can tell it from finished files.
    """
    path = pathlib.Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=prefix or f".{path.name}.", suffix=suffix)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_name)
        raise
    _fsync_directory(path.parent)


def to_jsonable(obj):
    """`obj` with numpy / JAX scalars and arrays turned into Python numbers and lists.

    Dict keys become strings (JSON requires it, and mixed key types cannot be sorted).
    """
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (str, bool, int, float)) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, pathlib.PurePath):
        return str(obj)
    if hasattr(obj, "__array__"):  # np.ndarray, jax.Array
        return np.asarray(obj).tolist()
    raise TypeError(f"cannot convert {type(obj).__name__} to JSON")
