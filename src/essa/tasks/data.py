"""Task data from local files (JSONL, JSON, Parquet), the cached real benchmarks (`real:NAME`,
`essa.tasks.real`) or, where reachable, the `datasets` hub.

`load_records` returns plain dicts and checks that every row has the fields a task needs, so a
bad row is reported by file and row number before any model runs. A local file always works
offline; a hub id needs the optional `datasets` package and network access.

The option helpers read the `task.options` that file-backed tasks share: `source`
("procedural", "data" or "real") and, per side ("train" / "test"), `<side>_file`, `<side>_split` and
`<side>_config`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from essa.errors import EssaError, first_line
from essa.tasks.real import is_real, real_path

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
# real: the task's real benchmark files (`essa.tasks.real`), fetched once into the cache.
SOURCES = ("procedural", "data", "real")
DATA_OPTIONS = {"source", "train_file", "test_file", "train_split", "test_split",
                "train_config", "test_config"}


def load_records(source: str, split: str | None = None, required: Iterable[str] = (),
                 config: str | None = None) -> list[dict[str, Any]]:
    """Rows of a local .jsonl/.json/.parquet file or of a `datasets` id (`split` picks its split,
    `config` its configuration, such as GSM8K's "main"; both are ignored for a local file).

    Raises EssaError when the source is missing or empty, or a row lacks a `required` field
    (a null value counts as missing).
    """
    source = str(source)
    if is_real(source):
        source = str(real_path(source))
    path = Path(source).expanduser()
    if path.is_file():
        rows = _read_file(path)
        where = str(path)
    elif (path.suffix.lower() in FILE_SUFFIXES or path.is_dir()
          or source.startswith((".", "/", "~"))):
        raise EssaError(f"data file not found: {source}")
    else:
        rows = _read_hub(source, split, config)
        where = f"{source} ({config + ', ' if config else ''}split {split or 'train'})"
    if not rows:
        raise EssaError(f"{where} holds no records")
    _check_required(rows, list(required), where, jsonl=path.suffix.lower() == ".jsonl")
    return [row for _, row in rows]


def reject_unknown_options(task: str, options: dict[str, Any], known: set[str]) -> None:
    """EssaError naming any option of `task` that is not in `known`."""
    unknown = set(options) - known
    if unknown:
        raise EssaError(f"task '{task}' got unknown option(s) {', '.join(sorted(unknown))} "
                        f"(known: {', '.join(sorted(known))})")


def check_options(task: str, options: dict[str, Any], known: set[str]) -> str:
    """Reject unknown options; return the data source ("procedural" or "data").

    Without a `source` option, naming a train or test file means "data".
    """
    reject_unknown_options(task, options, known)
    has_files = bool(options.get("train_file") or options.get("test_file"))
    source = str(options.get("source") or ("data" if has_files else "procedural"))
    if source not in SOURCES:
        raise EssaError(f"task.options.source must be one of {', '.join(SOURCES)} (got {source!r})")
    return source


def data_source(options: dict[str, Any], side: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """Where one side ("train" or "test") of a file-backed task reads from: file, split, config.

    Options win over `defaults`; the hub split defaults to the side's name.
    """
    return {
        "source": str(options.get(f"{side}_file") or defaults[f"{side}_file"]),
        "split": options.get(f"{side}_split") or defaults.get(f"{side}_split", side),
        "config": options.get(f"{side}_config", defaults.get(f"{side}_config")),
    }


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


def _read_hub(name: str, split: str | None,
              config: str | None) -> list[tuple[int, dict[str, Any]]]:
    hint = "give a local .jsonl/.json/.parquet file instead"
    try:
        import datasets
    except ImportError as exc:
        raise EssaError(f"'{name}' is not a local file and the `datasets` package is not "
                        f"installed: {hint}") from exc
    # Only a set config is passed on: most ids have a single, default one.
    args = (name, config) if config else (name,)
    try:
        dataset = datasets.load_dataset(*args, split=split or "train")
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, bad split: all one message
        label = f"'{name}' ({config})" if config else f"'{name}'"
        raise EssaError(f"could not load dataset {label} from the hub ({first_line(exc)}): {hint}") from exc
    return list(enumerate((dict(row) for row in dataset), start=1))


def _check_required(rows: list[tuple[int, dict[str, Any]]], required: list[str],
                    where: str, jsonl: bool) -> None:
    unit = "line" if jsonl else "row"
    for number, record in rows:
        for name in required:
            if record.get(name) is None:
                raise EssaError(f"{where}: {unit} {number} has no '{name}' field")
