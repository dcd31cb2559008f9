"""The task interface: prompts for each split, their chat formatting, and a reward.

A task knows nothing about models or optimizers. The trainer, SFT and evaluation only use the
methods `Task` declares: `split()` and `reward()` (which a task implements), and `messages()`,
`prompt_text()`, `sft_target()`, `reward_batch()`, `extra_metrics()` and `split_metrics()` (which
have defaults). `safe_reward()`
wraps `reward()` so one bad completion (a checker that raises or returns NaN) scores 0 instead
of crashing a run.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from essa.errors import EssaError

SPLITS = ("sft", "train", "validation", "test")


@dataclass(frozen=True)
class Example:
    """One prompt with what its reward needs (`answer`) and, for SFT, a target completion."""

    prompt: str
    answer: Any = None
    target: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


class Task(ABC):
    """Prompts (sft / train / validation / test), chat formatting and a reward in [0, 1]."""

    name: str = "task"
    system_prompt: str | None = None

    @abstractmethod
    def split(self, name: str) -> list[Example]:
        """Examples of one split; the four splits never share a prompt."""

    @abstractmethod
    def reward(self, completion: str, example: Example) -> float:
        """Reward of one completion (higher is better, normally in [0, 1])."""

    def messages(self, example: Example) -> list[dict[str, str]]:
        out = []
        if self.system_prompt:
            out.append({"role": "system", "content": self.system_prompt})
        out.append({"role": "user", "content": example.prompt})
        return out

    def prompt_text(self, tokenizer: Any, example: Example) -> str:
        """The text the model continues: by default `messages()` through the tokenizer's chat
        template, ready for the assistant turn (or "role: content" lines without a template)."""
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(self.messages(example), tokenize=False, add_generation_prompt=True)
        parts = [f"{m['role']}: {m['content']}" for m in self.messages(example)]
        return "\n".join(parts) + "\nassistant: "

    def reward_batch(self, completions: list[str], examples: list[Example]) -> list[float]:
        """Rewards of many completions at once, in order. Default: `reward` one by one; a task
        whose reward batches well (a reward model) overrides it."""
        return [self.reward(c, ex) for c, ex in zip(completions, examples)]

    def extra_metrics(self, completion: str, example: Example) -> dict[str, float]:
        """Extra per-completion numbers that evaluation averages over a split (e.g. IFEval's strict
        accuracy). Default: none."""
        return {}

    def split_metrics(self, per_completion: dict[str, np.ndarray]) -> dict[str, float]:
        """Split-level numbers from the per-completion `extra_metrics`. Default: their means; a task
        whose report pools differently (IFEval's instruction-level accuracy) overrides it."""
        return {key: float(values.mean()) for key, values in per_completion.items()}

    def sft_target(self, example: Example) -> str:
        if example.target is None:
            raise EssaError(f"task '{self.name}' has no SFT target for prompt {example.prompt[:60]!r}")
        return example.target

    def checked_split(self, name: str) -> list[Example]:
        """`split()` with a clear error for unknown or empty splits."""
        if name not in SPLITS:
            raise EssaError(f"unknown split '{name}' (choose from {', '.join(SPLITS)})")
        examples = self.split(name)
        if not examples:
            raise EssaError(f"task '{self.name}' has an empty '{name}' split: no examples to use")
        return examples


@dataclass
class RewardStats:
    """Counts completions whose reward function failed (raised or returned NaN)."""

    failures: int = 0
    last_error: str | None = None


def safe_reward(task: Task, completion: str, example: Example, stats: RewardStats | None = None) -> float:
    """The task's reward, with a failing or NaN reward scored 0 and counted in `stats`."""
    try:
        value = float(task.reward(completion, example))
        if math.isnan(value):
            raise ValueError("reward is NaN")
        return value
    except Exception as exc:  # noqa: BLE001 - any checker failure must not stop a run
        if stats is not None:
            stats.failures += 1
            stats.last_error = f"{type(exc).__name__}: {exc}"
        return 0.0


def format_prompt(tokenizer: Any, task: Task, example: Example) -> str:
    """The prompt text the model sees (`task.prompt_text`): by default the chat template applied,
    ready for the assistant turn."""
    return task.prompt_text(tokenizer, example)
