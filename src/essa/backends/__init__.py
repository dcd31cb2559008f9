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

    def close(self) -> None:
        """Release what the backend holds (wrapped layers, workers)."""
        ...


# The backend registry: `backend.kind` names one of these ("module:Class", imported on use).
_BACKENDS = {
    "local": "essa.backends.local:LocalBackend",
    "vllm": "essa.backends.vllm_backend:VllmBackend",
    "ray": "essa.backends.ray_backend:RayPopulationEvaluator",
}


def available_backends() -> list[str]:
    return list(_BACKENDS)


# A backend may also offer `run_generation(gen, optimizer, prompt_indices, seed, stats)`, returning
# an object with `.population` and `.fitness`: then its workers regenerate the candidates from the
# shared optimizer state and only (index, reward) pairs travel (the Ray backend does this).
