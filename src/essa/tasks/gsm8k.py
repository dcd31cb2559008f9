"""GSM8K grade-school word problems with a numeric final-answer reward.

Data (`task.options`):
- `source: procedural` (the default when no data file is named): GSM8K-style problems generated
  offline by reasoning-gym's `gsm_symbolic`, split like the arithmetic task (each split its own
  seeded stream, no prompt in two splits).
- `source: data`: `train_file` / `test_file`, each a local .jsonl/.json/.parquet file or a
  `datasets` id (default `openai/gsm8k`, config `main` via `train_config` / `test_config`, hub
  splits `train_split` / `test_split`). Rows need `question` and `answer`, the answer ending in
  a `#### N` line. The train source is partitioned (seeded, disjoint) into validation, train and
  sft, in that order, so the validation set does not move when the sft or train sizes change;
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
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from essa.errors import EssaError
from essa.tasks.answers import numeric_reward, parse_number
from essa.tasks.arithmetic import build_splits
from essa.tasks.base import SPLITS, Example, Task
from essa.tasks.data import FILE_SUFFIXES, load_records, split_sizes

if TYPE_CHECKING:
    from essa.config import TaskConfig

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
SOURCES = ("procedural", "data")
DATA_OPTIONS = {"source", "train_file", "test_file", "train_split", "test_split",
                "train_config", "test_config"}
GSM8K_FIELDS = ("question", "answer")

_CALCULATOR_RE = re.compile(r"<<[^<>]*>>")
_FINAL_LINE_RE = re.compile(r"^\s*####.*$", re.MULTILINE)
_HASHES_RE = re.compile(r"####\s*(.+?)\s*$", re.MULTILINE)
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


# ---- data sources shared by the file-backed math tasks ---------------------------------------

def data_source(options: dict[str, Any], split: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """Where one side ("train" or "test") of a file-backed task reads from: file, split, config."""
    return {
        "source": str(options.get(f"{split}_file") or defaults[f"{split}_file"]),
        "split": options.get(f"{split}_split") or defaults.get(f"{split}_split", split),
        "config": options.get(f"{split}_config", defaults.get(f"{split}_config")),
    }


def load_rows(source: str, split: str | None, required: Iterable[str],
              config: str | None = None) -> list[dict[str, Any]]:
    """Records of a local file or a `datasets` id; `config` names the dataset's configuration.

    Local files and config-less ids go through `essa.tasks.data.load_records`; an id with a
    config (GSM8K's "main") is read here, with the same one-line errors.
    """
    if not config or _looks_local(source):
        return load_records(source, split=split, required=required)
    try:
        import datasets
    except ImportError as exc:
        raise EssaError(f"'{source}' is not a local file and the `datasets` package is not "
                        "installed: give a local .jsonl/.json/.parquet file instead") from exc
    try:
        rows = [dict(row) for row in datasets.load_dataset(source, config, split=split or "train")]
    except Exception as exc:  # offline, unknown id, bad split: all one message
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EssaError(f"could not load dataset '{source}' ({config}) from the hub ({first}): "
                        "give a local .jsonl/.json/.parquet file instead") from exc
    where = f"{source} ({config}, split {split or 'train'})"
    if not rows:
        raise EssaError(f"{where} holds no records")
    for number, row in enumerate(rows, start=1):
        for name in required:
            if row.get(name) is None:
                raise EssaError(f"{where}: row {number} has no '{name}' field")
    return rows


def _looks_local(source: str) -> bool:
    return (Path(source).expanduser().exists() or source.startswith((".", "/", "~"))
            or source.lower().endswith(FILE_SUFFIXES))


def unique_by_prompt(examples: Iterable[Example], exclude: set[str] = frozenset()) -> list[Example]:
    """The examples in order, keeping the first of each prompt and none in `exclude`."""
    seen = set(exclude)
    out = []
    for example in examples:
        if example.prompt not in seen:
            seen.add(example.prompt)
            out.append(example)
    return out


def partition(pool: list[Example], sizes: dict[str, int], seed: str, where: str,
              order: tuple[str, ...] = ("validation", "train", "sft")) -> dict[str, list[Example]]:
    """Seeded, disjoint splits of a pool of unique prompts, filled in `order`.

    Filling the held-out split first keeps it fixed when later sizes change.
    """
    wanted = sum(sizes[s] for s in order)
    if wanted > len(pool):
        asked = ", ".join(f"{s} {sizes[s]}" for s in order)
        raise EssaError(f"{where} has {len(pool)} unique prompts, fewer than the {wanted} asked "
                        f"for ({asked}): lower the split sizes")
    shuffled = list(pool)
    random.Random(seed).shuffle(shuffled)
    out, start = {}, 0
    for split in order:
        out[split] = shuffled[start:start + sizes[split]]
        start += sizes[split]
    return out


def file_splits(options: dict[str, Any], sizes: dict[str, int], seed: str,
                defaults: dict[str, Any],
                read: Callable[[dict[str, Any]], list[Example]]) -> dict[str, list[Example]]:
    """All four splits from a train source and a test source (`read` turns one into examples).

    A source whose splits are all empty is not read at all, so an offline run can name only
    the file it needs.
    """
    test_pool: list[Example] = []
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    if sizes["test"]:
        test_pool = unique_by_prompt(read(data_source(options, "test", defaults)))
        out.update(partition(test_pool, sizes, f"{seed}/test", _describe(options, "test", defaults),
                             order=("test",)))
    if any(sizes[s] for s in ("sft", "train", "validation")):
        pool = unique_by_prompt(read(data_source(options, "train", defaults)),
                                exclude={e.prompt for e in test_pool})
        out.update(partition(pool, sizes, f"{seed}/train", _describe(options, "train", defaults)))
    return out


def _describe(options: dict[str, Any], split: str, defaults: dict[str, Any]) -> str:
    return f"the {split} source {data_source(options, split, defaults)['source']}"


def check_options(task: str, options: dict[str, Any], known: set[str]) -> str:
    """Reject unknown options; return the data source ("procedural" or "data")."""
    unknown = set(options) - known
    if unknown:
        raise EssaError(f"task '{task}' got unknown option(s) {', '.join(sorted(unknown))} "
                        f"(known: {', '.join(sorted(known))})")
    has_files = bool(options.get("train_file") or options.get("test_file"))
    source = str(options.get("source") or ("data" if has_files else "procedural"))
    if source not in SOURCES:
        raise EssaError(f"task.options.source must be one of {', '.join(SOURCES)} (got {source!r})")
    return source


# ---- GSM8K ----------------------------------------------------------------------------------

_DEFAULTS = {"train_file": "openai/gsm8k", "test_file": "openai/gsm8k",
             "train_config": "main", "test_config": "main"}


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


def procedural_problem(rng: random.Random) -> Example:
    """One GSM8K-style problem from reasoning-gym's `gsm_symbolic`, seeded by `rng`."""
    import reasoning_gym

    entry = reasoning_gym.create_dataset("gsm_symbolic", seed=rng.getrandbits(31), size=1)[0]
    question = entry["question"].removesuffix(_GSM_SYMBOLIC_SUFFIX).strip()
    gold = gold_number(str(entry["answer"]))
    if gold is None:  # not seen in practice; a clear message beats a silent bad example
        raise EssaError(f"gsm_symbolic gave a non-numeric answer {entry['answer']!r}")
    cot = str(entry["metadata"].get("answer_cot") or "")
    return Example(prompt=question, answer=gold, target=solution_target(cot, gold),
                   meta={"source": "gsm_symbolic",
                         "template": entry["metadata"].get("source_index")})


class Gsm8kTask(Task):
    """GSM8K (files or hub) or GSM8K-style procedural problems; exact numeric answer reward."""

    name = "gsm8k"
    system_prompt = SYSTEM_PROMPT

    def __init__(self, cfg: TaskConfig) -> None:
        options = dict(cfg.options)
        self.source = check_options(self.name, options, DATA_OPTIONS)
        sizes = split_sizes(cfg)
        if self.source == "procedural":
            self._splits = build_splits(sizes, procedural_problem, seed=f"gsm8k/{cfg.seed}")
        else:
            self._splits = file_splits(options, sizes, f"gsm8k/{cfg.seed}", _DEFAULTS, _read)

    def split(self, name: str) -> list[Example]:
        if name not in self._splits:
            raise EssaError(f"unknown split '{name}' (choose from {', '.join(SPLITS)})")
        return list(self._splits[name])

    def reward(self, completion: str, example: Example) -> float:
        return numeric_reward(completion, example.answer)


def _read(where: dict[str, Any]) -> list[Example]:
    rows = load_rows(where["source"], where["split"], GSM8K_FIELDS, where["config"])
    return gsm8k_examples(rows, where["source"])
