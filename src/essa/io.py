"""Atomic file and directory writes: a crash never leaves a half-written file behind.

State files (`atomic_write_state` / `read_state`) hold plain data only, JSON plus numpy arrays,
and are read without unpickling: a state file from elsewhere cannot run code when it is loaded.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from essa.errors import EssaError, first_line


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files 0600; written outputs get the usual permissions instead.
_FILE_MODE = 0o666 & ~_current_umask()


def ensure_writable_dir(path: str | Path) -> Path:
    """Create `path` (and parents) and check we can write there, with a clear error if not."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-", delete=True)
        probe.close()
    except OSError as exc:
        raise EssaError(f"output directory {path} is not writable: {exc.strerror or exc}") from exc
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_jsonl(path: str | Path, records: Iterable[Any]) -> None:
    """One JSON object per line."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


_TREE = "__tree__"  # the .npz entry holding the JSON tree
_ARRAY = "__array__"  # {"__array__": name} in the tree stands for the array entry `name`


def atomic_write_state(path: str | Path, tree: Any) -> None:
    """Write nested dicts / lists of JSON scalars and numpy arrays as one .npz: the tree as a JSON
    string, each (non-object) array as its own entry."""
    arrays: dict[str, np.ndarray] = {}

    def encode(obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            if obj.dtype.hasobject:
                raise TypeError("object arrays cannot go into a state file")
            arrays[f"a{len(arrays)}"] = obj
            return {_ARRAY: f"a{len(arrays) - 1}"}
        if isinstance(obj, dict):
            return {str(k): encode(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [encode(v) for v in obj]
        if isinstance(obj, np.generic):
            return obj.item()
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"a state file cannot hold a {type(obj).__name__}")

    buf = io.BytesIO()
    np.savez(buf, **{_TREE: np.array(json.dumps(encode(tree)))}, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def read_state(path: str | Path) -> Any:
    """The tree `atomic_write_state` wrote; never unpickles (object arrays are refused)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            tree = json.loads(str(data[_TREE]))
            arrays = {name: data[name] for name in data.files if name != _TREE}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise EssaError(f"cannot read state file {path}: {first_line(exc)}") from exc

    def decode(obj: Any) -> Any:
        if isinstance(obj, dict):
            if set(obj) == {_ARRAY}:
                if obj[_ARRAY] not in arrays:
                    raise EssaError(f"state file {path} names a missing array {obj[_ARRAY]!r}")
                return arrays[obj[_ARRAY]]
            return {k: decode(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [decode(v) for v in obj]
        return obj

    return decode(tree)


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~_current_umask())
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
