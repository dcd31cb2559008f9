"""Degeneration figures of completions, reported beside accuracy: an adapter can gain accuracy on
its own distribution while its completions elsewhere loop, run on or stop answering.

Per completion:
- `tokens`: its length in generated tokens where the backend reports them (the essa decoder),
  else the completion text tokenized again (shorter for loops of odd tokens: a model in a loop
  often emits a text in more tokens than its tokenizer would use);
- `hit_limit`: 1 when that length reaches `max_new_tokens`, i.e. it ran out of tokens instead of
  stopping (exact with generated counts; undercounted with re-tokenized ones);
- `repetition`: the share of its token 4-grams (the text tokenized again) that repeat an earlier
  4-gram of the same completion (seq-rep-4 of Welleck et al., 2019): 0 for varied text, near 1
  for a loop. Tokens, not words: a loop such as `\\frac{12}{\\frac{12}{...` has no spaces;
- `no_answer`: 1 when it has no non-empty \\boxed{} answer (math tasks only).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from essa.tasks.answers import extract_boxed

NGRAM = 4
# What a summary reports, as share or mean over completions.
SUMMARY_KEYS = {"hit_limit": "hit_limit_share", "repetition": "repeated_4gram_share",
                "tokens": "mean_tokens", "no_answer": "no_answer_share"}


def repeated_ngram_share(items: Sequence[Any], n: int = NGRAM) -> float:
    """Share of the n-grams of `items` (token ids) that already occurred earlier in it (0 without any)."""
    grams = [tuple(items[i:i + n]) for i in range(len(items) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def has_answer(text: str) -> bool:
    return any(box.strip() for box in extract_boxed(text))


def per_completion(completions: list[str], tokenizer: Any, max_new_tokens: int, answers: bool,
                   token_counts: list[int] | None = None) -> dict[str, np.ndarray]:
    """The figures of each completion, one array per key (`no_answer` only where `answers`);
    `token_counts`: the generated tokens of each, where known (else the text is tokenized again)."""
    ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
    lengths = np.asarray([len(i) for i in ids] if token_counts is None else token_counts, dtype=np.float64)
    out = {
        "tokens": lengths,
        "hit_limit": (lengths >= max_new_tokens).astype(np.float64),
        "repetition": np.asarray([repeated_ngram_share(i) for i in ids]),
    }
    if answers:
        out["no_answer"] = np.asarray([0.0 if has_answer(c) else 1.0 for c in completions])
    return out


def summarize(figures: dict[str, np.ndarray]) -> dict[str, float]:
    """Means of the per-completion figures under their report names."""
    return {SUMMARY_KEYS[key]: float(values.mean()) for key, values in figures.items() if len(values)}


def asks_for_box(system_prompt: str | None) -> bool:
    """Whether a task's prompt asks for a \\boxed{} answer (then `no_answer` is reported)."""
    return "\\boxed" in (system_prompt or "")


def side_by_side(before: dict[str, float], after: dict[str, float], labels: tuple[str, str]) -> str:
    """One line: each summary figure of two models, before -> after."""
    names = {"hit_limit_share": "hit the token limit", "repeated_4gram_share": "repeated 4-grams",
             "mean_tokens": "mean tokens", "no_answer_share": "no boxed answer"}
    digits = {"mean_tokens": 1}
    parts = [f"{names[key]} {before[key]:.{digits.get(key, 2)}f} -> {after[key]:.{digits.get(key, 2)}f}"
             for key in names if key in before and key in after]
    return f"degeneration, {labels[0]} -> {labels[1]}: " + ", ".join(parts)
