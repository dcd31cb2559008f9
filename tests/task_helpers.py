"""Shared checks for the file-backed task tests: JSONL fixtures and split disjointness."""

from __future__ import annotations

import json
from pathlib import Path

from essa.tasks import SPLITS


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def assert_disjoint(task) -> None:
    """No split repeats a prompt, and no prompt is in two splits."""
    by_split = {s: [e.prompt for e in task.split(s)] for s in SPLITS}
    for split, prompts in by_split.items():
        assert len(prompts) == len(set(prompts)), split
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            assert not set(by_split[a]) & set(by_split[b]), (a, b)
