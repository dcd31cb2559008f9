"""Task data from local files (JSONL, JSON, Parquet) or, where reachable, the `datasets` hub.

`load_records` returns plain dicts and checks that every row has the fields a task needs, so a
bad row is reported by file and row number before any model runs. A local file always works
offline; a hub id needs the optional `datasets` package and network access.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from essa.errors import EssaError
from essa.tasks.base import SPLITS

if TYPE_CHECKING:
    from essa.config import TaskConfig

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


def load_records(source: str, split: str | None = None,
                 required: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Rows of a local .jsonl/.json/.parquet file or of a `datasets` id (`split` picks its split).

    Raises EssaError when the source is missing or empty, or a row lacks a `required` field
    (a null value counts as missing).
    """
    source = str(source)
    path = Path(source).expanduser()
    if path.is_file():
        rows = _read_file(path)
        where = str(path)
    elif (path.suffix.lower() in FILE_SUFFIXES or path.is_dir()
          or source.startswith((".", "/", "~"))):
        raise EssaError(f"data file not found: {source}")
    else:
        rows = _read_hub(source, split)
        where = f"{source} (split {split or 'train'})"
    if not rows:
        raise EssaError(f"{where} holds no records")
    _check_required(rows, list(required), where, jsonl=path.suffix.lower() == ".jsonl")
    return [row for _, row in rows]


def _read_file(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(row number, record) pairs; for JSONL the row number is the line number."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _numbered(_read_json(path), path)
    if suffix == ".parquet":
        return _numbered(_read_parquet(path), path)
    raise EssaError(f"unsupported data file {path}: use one of {', '.join(FILE_SUFFIXES)}")


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EssaError(f"{path}: line {number} is not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise EssaError(f"{path}: line {number} is not a JSON object")
            rows.append((number, record))
    return rows


def _read_json(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EssaError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})") from exc
    if not isinstance(data, list):
        raise EssaError(f"{path} must hold a JSON list of objects (got {type(data).__name__})")
    return data


def _read_parquet(path: Path) -> list[Any]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise EssaError(f"reading {path} needs pyarrow: pip install pyarrow") from exc
    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # noqa: BLE001 - any pyarrow failure means an unreadable file
        raise EssaError(f"{path} is not a readable Parquet file: {exc}") from exc


def _numbered(records: list[Any], path: Path) -> list[tuple[int, dict[str, Any]]]:
    out = []
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise EssaError(f"{path}: row {number} is not an object with named fields")
        out.append((number, record))
    return out


def _read_hub(name: str, split: str | None) -> list[tuple[int, dict[str, Any]]]:
    hint = "give a local .jsonl/.json/.parquet file instead"
    try:
        import datasets
    except ImportError as exc:
        raise EssaError(f"'{name}' is not a local file and the `datasets` package is not "
                        f"installed: {hint}") from exc
    try:
        dataset = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, bad split: all one message
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EssaError(f"could not load dataset '{name}' from the hub ({first}): {hint}") from exc
    return list(enumerate((dict(row) for row in dataset), start=1))


def _check_required(rows: list[tuple[int, dict[str, Any]]], required: list[str],
                    where: str, jsonl: bool) -> None:
    unit = "line" if jsonl else "row"
    for number, record in rows:
        for name in required:
            if record.get(name) is None:
                raise EssaError(f"{where}: {unit} {number} has no '{name}' field")


def split_sizes(cfg: TaskConfig) -> dict[str, int]:
    """The requested size of each split, checked to be a non-negative integer."""
    sizes = {}
    for split in SPLITS:
        value = getattr(cfg, f"{split}_size")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise EssaError(f"task.{split}_size must be a non-negative integer (got {value!r})")
        sizes[split] = value
    return sizes
