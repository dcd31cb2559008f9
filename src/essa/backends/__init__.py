"""Backends turn (population of offset vectors, prompts) into completions.

Every backend implements `evaluate(population, prompts, seed) -> completions[candidate][prompt]`.
The trainer only sees this seam, so adding a backend never touches the training loop.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Backend(Protocol):
    def evaluate(self, population: np.ndarray | None, prompts: list[str], seed: int = 0) -> list[list[str]]:
        """Completions for every (candidate, prompt) pair; `population` is (lambda, dim) offsets."""
        ...
