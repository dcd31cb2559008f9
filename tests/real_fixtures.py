"""Tiny stand-ins for the real benchmark wheels (never the real data): files of the same layout in
wheels of the same names, and the registry pinned to their checksums."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zipfile
from pathlib import Path

from essa.tasks import real


def gsm_rows(start: int, count: int) -> list[dict]:
    return [{"question": f"Sam has {n} apples and buys {n + 1} more. How many apples does he have?",
             "answer": f"Sam has {n} + {n + 1} = <<{n}+{n + 1}={2 * n + 1}>>{2 * n + 1} apples.\n#### {2 * n + 1}",
             "idx": n} for n in range(start, start + count)]


def math_rows(start: int, count: int, with_answer: bool) -> list[dict]:
    rows = []
    for n in range(start, start + count):
        row = {"problem": f"Compute ${n} + {n}$.", "solution": f"${n} + {n} = \\boxed{{{2 * n}}}$.",
               "level": "Level 1", "type": "Algebra"}
        if with_answer:
            row["answer"] = str(2 * n)
        rows.append(row)
    return rows


FIXTURE_ROWS = {
    "gsm8k-train": gsm_rows(1, 40),
    "gsm8k-test": gsm_rows(100, 12),
    "math-train": math_rows(1, 30, with_answer=False),
    "math-test": math_rows(100, 20, with_answer=False),
    "math500": math_rows(100, 10, with_answer=True),
    "svamp": [{"Body": f"There are {n} birds on a tree", "Question": "If 2 fly away, how many are left?",
               "Answer": float(n - 2), "Equation": f"( {n}.0 - 2.0 )", "Type": "Subtraction", "ID": f"chal-{n}",
               "idx": n} for n in range(10, 20)],
    "asdiv": ([{"body": f"A box holds {n} pens.", "question": "How many pens are in two boxes?",
                "answer": f"{2 * n} (pens)", "formula": f"{n}*2={2 * n}", "solution_type": "Multiplication",
                "idx": n} for n in range(1, 9)]
              + [{"body": "Ann is 5. Bob is 7.", "question": "Who is older?", "answer": "Bob", "formula": "N/A",
                  "solution_type": "Comparison", "idx": 99}]),
    "mawps": [{"input": f"Tom had {n} cards and lost 1 . How many cards does he have ?", "target": float(n - 1),
               "type": "addsub", "idx": n} for n in range(3, 13)],
    "ifeval": [{"key": 1000 + n, "prompt": f"Write a note number {n} without any commas.",
                "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]} for n in range(12)],
    # IFBench's layout (null for every unset kwarg); the last row's checker needs nltk data.
    "ifbench": ([{"key": str(n), "prompt": f"Describe tea number {n}. Include keyword steep twice in your response.",
                  "instruction_id_list": ["count:keywords_multiple"],
                  "kwargs": [{"keyword1": "steep", "keyword2": "leaf", "keyword3": "cup", "keyword4": "pot",
                              "keyword5": "brew", "N": None}]} for n in range(5)]
                + [{"key": "99", "prompt": "Write about tea with few stop words.",
                    "instruction_id_list": ["ratio:stop_words"], "kwargs": [{"percentage": 20}]}]),
}


def jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def install_fixture_wheels(wheel_dir: Path, monkeypatch, rows: dict[str, list[dict]] | None = None) -> Path:
    """Write fixture wheels named like the real ones into `wheel_dir`, point $ESSA_WHEEL_DIR there
    and pin the registry to the fixture files' checksums and row counts."""
    rows = rows or FIXTURE_ROWS
    wheel_dir.mkdir(parents=True, exist_ok=True)
    by_wheel: dict[str, list[real.RealSet]] = {}
    for spec in real.REAL_SETS.values():
        by_wheel.setdefault(spec.wheel, []).append(spec)
    for wheel_spec, specs in by_wheel.items():
        name, version = wheel_spec.split("==")
        with zipfile.ZipFile(wheel_dir / f"{name.replace('-', '_')}-{version}-py3-none-any.whl", "w") as zf:
            for spec in specs:
                data = jsonl_bytes(rows[spec.name])
                zf.writestr(spec.member, data)
                pinned = dataclasses.replace(spec, sha256=hashlib.sha256(data).hexdigest(),
                                             rows=len(rows[spec.name]))
                monkeypatch.setitem(real.REAL_SETS, spec.name, pinned)
    monkeypatch.setenv("ESSA_WHEEL_DIR", str(wheel_dir))
    return wheel_dir
