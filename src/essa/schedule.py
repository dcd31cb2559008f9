"""What ESSA and the GRPO baseline must agree on: the prompt stream and the snapshot times.

The trainer reads its mini-batches from `minibatch_indices`; `essa compare` feeds GRPO the same
stream (`prompt_stream`, cut into GRPO steps by `rechunk`), and every method snapshots its model
on its own training clock with a `SnapshotSchedule` over the same times (GRPO and the continued
SFT save each as an adapter dir: a `Snapshot`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from essa.config import SearchConfig

# Generations in GRPO's prompt stream when compare.max_steps is unset (a 135M model on CPU makes a
# few dozen steps in half an hour; a run that reaches the end stops early and says so).
STREAM_STEPS = 2000


def minibatch_indices(search: SearchConfig, n_train: int, gen: int) -> list[int]:
    """Train-split indices of generation `gen`'s shared mini-batch, seeded by (essa.seed, gen)."""
    size = min(search.prompts_per_generation, n_train)
    return np.random.default_rng([search.seed, gen]).choice(n_train, size=size, replace=False).tolist()


def prompt_stream(search: SearchConfig, n_train: int, steps: int) -> list[list[int]]:
    """The mini-batches of generations 0..steps-1, in order."""
    return [minibatch_indices(search, n_train, g) for g in range(steps)]


def rechunk(stream: list[list[int]], per_step: int) -> list[list[int]]:
    """The same prompts in the same order, cut into steps of `per_step` (a partial last step is dropped)."""
    flat = [i for batch in stream for i in batch]
    return [flat[k:k + per_step] for k in range(0, len(flat) - per_step + 1, per_step)]


SNAPSHOTS = "snapshots"  # a compare job's snapshot adapters: SNAPSHOTS/stepNNNNN, one per snapshot


def snapshot_dir(out_dir: str | Path, step: int) -> Path:
    """Where a method's snapshot after `step` steps (or generations) is saved as a PEFT adapter."""
    return Path(out_dir) / SNAPSHOTS / f"step{step:05d}"


@dataclass
class Snapshot:
    """The adapter at one point of the training clock."""

    elapsed_s: float
    step: int
    adapter_dir: str


class SnapshotSchedule:
    """Snapshot times on a training clock: `due(t)` is true once each time the clock passes one
    or more of them (a step that jumps several times takes one snapshot)."""

    def __init__(self, times: list[float]):
        self.pending = sorted(t for t in times if t > 0)

    def due(self, elapsed_s: float) -> bool:
        if not self.pending or elapsed_s < self.pending[0]:
            return False
        while self.pending and elapsed_s >= self.pending[0]:
            self.pending.pop(0)
        return True
