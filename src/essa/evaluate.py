"""Scoring completions with a task's reward, and split-level metrics (accuracy, avg@k, pass@k)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from essa.tasks import Example, RewardStats, Task, format_prompt, safe_reward

if TYPE_CHECKING:
    from essa.backends import Backend


def score(task: Task, completions: list[list[str]], examples: list[Example],
          stats: RewardStats | None = None) -> np.ndarray:
    """Rewards (lambda, B) for completions[candidate][prompt]; failing rewards score 0."""
    stats = stats if stats is not None else RewardStats()
    return np.asarray([_safe_batch(task, cand, examples, stats) for cand in completions], dtype=np.float64)


def _safe_batch(task: Task, completions: list[str], examples: list[Example], stats: RewardStats) -> list[float]:
    try:
        values = [float(v) for v in task.reward_batch(completions, examples)]
    except Exception:  # noqa: BLE001 - fall back to one-by-one so one bad item costs only itself
        return [safe_reward(task, c, ex, stats) for c, ex in zip(completions, examples)]
    out = []
    for v in values:
        if math.isnan(v):
            stats.failures += 1
            stats.last_error = "reward is NaN"
            v = 0.0
        out.append(v)
    return out


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


@dataclass
class SplitResult:
    metrics: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)
    # Per example, 1.0 when its first completion is correct: what paired comparisons take.
    correct: np.ndarray = field(default_factory=lambda: np.zeros(0))
    # Per example, the reward and the task's extra metrics of its first completion.
    rewards: np.ndarray = field(default_factory=lambda: np.zeros(0))
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    completions: list[str] = field(default_factory=list)  # the first completion of each example
    token_counts: list[int] | None = None  # their generated tokens, where the backend knows them


def evaluate_split(backend: Backend, tokenizer: Any, task: Task, examples: list[Example],
                   population: np.ndarray | None = None, samples: int = 1, seed: int = 0) -> SplitResult:
    """Greedy (samples=1) accuracy, or avg@k / pass@k with `samples` completions per prompt.

    `population` holds one candidate (1, dim) or None for the adapter as loaded.
    Accuracy counts a completion correct when its reward is >= 1 (exact-answer rewards);
    `mean_reward` is reported beside it for graded rewards.
    """
    prompts = [format_prompt(tokenizer, task, ex) for ex in examples]
    stats = RewardStats()
    repeated = [p for p in prompts for _ in range(samples)]
    completions = backend.evaluate(population, repeated, seed=seed)[0]
    lengths = backend.generated_lengths()
    rewards = score(task, [completions], [ex for ex in examples for _ in range(samples)], stats)[0]
    per_prompt = rewards.reshape(len(examples), samples)
    correct = per_prompt >= 1.0 - 1e-9
    metrics: dict[str, Any] = {
        "examples": len(examples),
        "accuracy": float(correct[:, 0].mean()),
        "mean_reward": float(per_prompt.mean()),
        "reward_failures": stats.failures,
    }
    if samples > 1:
        metrics[f"avg@{samples}"] = float(correct.mean())
        metrics[f"pass@{samples}"] = float(np.mean([pass_at_k(samples, int(c.sum()), samples) for c in correct]))
    extras = _extra_metrics(task, completions, examples, samples)
    metrics.update(task.split_metrics(extras) if extras else {})
    records = [
        {"prompt": ex.prompt, "answer": _jsonable(ex.answer), "completion": completions[i * samples + j],
         "reward": float(per_prompt[i, j]), "sample": j}
        for i, ex in enumerate(examples) for j in range(samples)
    ]
    first = {key: values[::samples] for key, values in extras.items()}
    return SplitResult(metrics, records, correct[:, 0].astype(np.float64), per_prompt[:, 0].copy(), first,
                       completions[::samples], None if lengths is None else list(lengths[::samples]))


def _extra_metrics(task: Task, completions: list[str], examples: list[Example],
                   samples: int) -> dict[str, np.ndarray]:
    """The task's `extra_metrics(completion, example)` of every completion, as one array per key;
    a checker that fails on a completion scores 0 for each key there."""
    rows: list[dict[str, float]] = []
    for i, ex in enumerate(examples):
        for j in range(samples):
            try:
                rows.append(task.extra_metrics(completions[i * samples + j], ex))
            except Exception:  # noqa: BLE001 - a failing checker counts as 0 for that completion
                rows.append({})
    keys = sorted({key for row in rows for key in row})
    return {key: np.asarray([float(row.get(key, 0.0)) for row in rows]) for key in keys}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)
