"""Loading task records from JSONL / JSON / Parquet files and (mocked) `datasets` ids."""

from __future__ import annotations

import json
import sys

import pytest

from essa.config import TaskConfig
from essa.errors import EssaError
from essa.tasks.data import load_records
from essa.tasks.splits import split_sizes

ROWS = [{"prompt": "a", "response": "x"}, {"prompt": "b"}, {"prompt": "c", "response": None}]


def write_jsonl(path, rows, blank_lines=False):
    lines = []
    for row in rows:
        lines.append(json.dumps(row))
        if blank_lines:
            lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_json_and_parquet_give_the_same_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = write_jsonl(tmp_path / "d.jsonl", ROWS)
    as_json = tmp_path / "d.json"
    as_json.write_text(json.dumps(ROWS))
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), parquet)
    for path in (jsonl, as_json, parquet):
        records = load_records(str(path), required=["prompt"])
        assert [r["prompt"] for r in records] == ["a", "b", "c"]
        assert records[0]["response"] == "x"
        assert records[2].get("response") is None


def test_jsonl_skips_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS, blank_lines=True)
    assert [r["prompt"] for r in load_records(str(path))] == ["a", "b", "c"]


def test_missing_field_names_file_line_and_field(tmp_path):
    rows = [{"prompt": "a"}, {"prompt": "b"}, {"text": "no prompt here"}]
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    with pytest.raises(EssaError, match=r"prompts\.jsonl: line 3 has no 'prompt' field"):
        load_records(str(path), required=["prompt"])
    # Without the requirement the same file loads.
    assert len(load_records(str(path))) == 3


def test_missing_field_in_json_and_null_value_count_as_missing(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"prompt": "a", "key": 1}, {"prompt": "b", "key": None}]))
    with pytest.raises(EssaError, match=r"rows\.json: row 2 has no 'key' field"):
        load_records(str(path), required=["prompt", "key"])


def test_row_number_in_jsonl_is_the_line_number(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a"}, {"x": 1}], blank_lines=True)
    with pytest.raises(EssaError, match="line 3 has no 'prompt'"):
        load_records(str(path), required=["prompt"])


@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", "", "empty.jsonl holds no records"),
    ("empty.jsonl", "\n\n  \n", "empty.jsonl holds no records"),
    ("empty.json", "[]", "empty.json holds no records"),
    ("bad.jsonl", '{"prompt": "a"}\n{"prompt": \n', "line 2 is not valid JSON"),
    ("list.jsonl", '{"prompt": "a"}\n[1, 2]\n', "line 2 is not a JSON object"),
    ("obj.json", '{"prompt": "a"}', "must hold a JSON list"),
    ("d.csv", "prompt\na\n", "unsupported data file"),
])
def test_unreadable_file_is_a_clear_error(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(EssaError, match=message):
        load_records(str(path))


def test_missing_file_is_not_mistaken_for_a_hub_id(tmp_path):
    with pytest.raises(EssaError, match="data file not found"):
        load_records(str(tmp_path / "nope.jsonl"))
    with pytest.raises(EssaError, match="data file not found"):
        load_records("data/nope.parquet")


def test_hub_id_without_datasets_asks_for_a_local_file(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(EssaError, match="not installed.*local .jsonl"):
        load_records("someone/some-dataset")


def test_unreachable_hub_asks_for_a_local_file(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/some-dataset' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(EssaError, match="could not load dataset 'someone/some-dataset'.*local"):
        load_records("someone/some-dataset")


def test_hub_rows_are_checked_like_file_rows(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake(name, split):
        calls.append((name, split))
        return [{"prompt": "p1"}, {"other": 1}]

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert load_records("org/name", split="validation") == [{"prompt": "p1"}, {"other": 1}]
    assert calls == [("org/name", "validation")]
    with pytest.raises(EssaError, match=r"org/name \(split train\): row 2 has no 'prompt'"):
        load_records("org/name", required=["prompt"])


def test_hub_config_is_passed_on_and_named_in_errors(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake(name, config, split):
        calls.append((name, config, split))
        return [{"question": "q1"}, {"other": 1}]

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert load_records("org/name", split="test", config="main") == [{"question": "q1"},
                                                                     {"other": 1}]
    assert calls == [("org/name", "main", "test")]
    with pytest.raises(EssaError, match=r"org/name \(main, split train\): row 2 has no 'question'"):
        load_records("org/name", required=["question"], config="main")
    # A local file ignores the hub config.
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert load_records(str(path), config="main") == ROWS
    assert len(calls) == 2

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(EssaError, match=r"could not load dataset 'org/name' \(main\).*local"):
        load_records("org/name", config="main")


def test_split_sizes_checks_values():
    cfg = TaskConfig(sft_size=3, train_size=2, validation_size=1, test_size=0)
    assert split_sizes(cfg) == {"sft": 3, "train": 2, "validation": 1, "test": 0}
    cfg.train_size = -1
    with pytest.raises(EssaError, match="task.train_size"):
        split_sizes(cfg)
