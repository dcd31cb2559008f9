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


def assert_held_out_by_problem(task) -> None:
    """No sft/train example shares its underlying problem (`problem_key`) or its worked solution
    (SFT target) with a validation or test example: held-out means held out by problem."""
    from essa.tasks.splits import problem_key

    trained = [e for s in ("sft", "train") for e in task.split(s)]
    held = [e for s in ("validation", "test") for e in task.split(s)]
    assert not {problem_key(e) for e in trained} & {problem_key(e) for e in held}
    assert not {e.target for e in trained if e.target} & {e.target for e in held if e.target}
    for split in ("validation", "test"):
        keys = [problem_key(e) for e in task.split(split)]
        assert len(keys) == len(set(keys)), split
