"""Disjoint, seeded task splits: from a problem generator or from a train and a test source.

Every builder here guarantees that no problem is in two splits, and fills held-out splits first,
so their contents depend only on the seed and their own size: they do not move when the SFT or
train sizes change. A problem is what `problem_key` names: the task's `meta["problem"]` where a
generator knows the underlying problem (operands, template and values, expression), else the
prompt text.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from essa.errors import EssaError
from essa.tasks.base import SPLITS, Example
from essa.tasks.data import DATA_OPTIONS, check_options, data_source

if TYPE_CHECKING:
    from essa.config import TaskConfig

# Held-out splits first, so their contents depend only on the seed and their own size.
FILL_ORDER = ("test", "validation", "train", "sft")


def problem_key(example: Example) -> Any:
    """The identity of an example's underlying problem: `meta["problem"]`, else its prompt text."""
    return example.meta.get("problem", example.prompt)


def split_sizes(cfg: TaskConfig) -> dict[str, int]:
    """The requested size of each split, checked to be a non-negative integer."""
    sizes = {}
    for split in SPLITS:
        value = getattr(cfg, f"{split}_size")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise EssaError(f"task.{split}_size must be a non-negative integer (got {value!r})")
        sizes[split] = value
    return sizes


def pick_split(splits: dict[str, list[Example]], name: str) -> list[Example]:
    """A copy of one built split; EssaError for a name that is not a split."""
    if name not in splits:
        raise EssaError(f"unknown split '{name}' (choose from {', '.join(SPLITS)})")
    return list(splits[name])


def build_splits(sizes: dict[str, int], make: Callable[[random.Random], Example],
                 seed: str) -> dict[str, list[Example]]:
    """Fill each split from its own seeded stream, skipping problems (`problem_key`) taken by any split.

    Raises EssaError when `make` stops producing new problems (the problem space is exhausted).
    """
    seen: set[Any] = set()
    out: dict[str, list[Example]] = {}
    for split in FILL_ORDER:
        size = sizes.get(split, 0)
        rng = random.Random(f"{seed}/{split}")
        examples: list[Example] = []
        # Duplicates are rare in a large template space; many in a row mean it is exhausted.
        budget = 20 * size + 1000
        while len(examples) < size and budget > 0:
            budget -= 1
            example = make(rng)
            key = problem_key(example)
            if key not in seen:
                seen.add(key)
                examples.append(example)
        if len(examples) < size:
            raise EssaError(
                f"could only generate {len(examples)} distinct problems for split '{split}' "
                f"(asked for {size}; {len(seen)} problems in all): lower the split sizes"
            )
        out[split] = examples
    return out


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

    The test source gives the test split; the train source, less any prompt also in the test
    source, gives validation, train and sft. A source whose splits are all empty is not read at
    all, so an offline run can name only the file it needs. `options` and `defaults` are read
    by `essa.tasks.data.data_source`.
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


def generated_or_file_splits(
        task: str, cfg: TaskConfig, make: Callable[[random.Random], Example],
        defaults: dict[str, Any], read: Callable[[dict[str, Any]], list[Example]],
        real_defaults: dict[str, Any] | None = None,
) -> tuple[str, dict[str, list[Example]]]:
    """The data source ("procedural", "data" or "real") of a task and its four splits.

    "procedural" fills the splits from `make` (`build_splits`); "data" reads a train and a
    test source (`file_splits`, with `defaults` and `read`); "real" does the same with
    `real_defaults`, the task's real benchmark files. The task accepts `DATA_OPTIONS`.
    """
    options = dict(cfg.options)
    source = check_options(task, options, DATA_OPTIONS)
    sizes = split_sizes(cfg)
    seed = f"{task}/{cfg.seed}"
    if source == "procedural":
        return source, build_splits(sizes, make, seed=seed)
    if source == "real":
        if real_defaults is None:
            raise EssaError(f"task '{task}' has no real benchmark data (source: procedural or data)")
        defaults = real_defaults
    return source, file_splits(options, sizes, seed, defaults, read)


def _describe(options: dict[str, Any], split: str, defaults: dict[str, Any]) -> str:
    return f"the {split} source {data_source(options, split, defaults)['source']}"
