"""Backends turn (population of offset vectors, prompts) into completions, and one place builds them.

`Backend` declares everything a caller may use, with defaults: `evaluate` (completions for every
(candidate, prompt) pair), `generated_lengths` (their token counts, where known), `run_generation`
(the fitness of one ES generation; by default ask -> evaluate -> reward -> mean), `dim`, `close`, and the class-level hooks the builder uses. The
registry below maps `backend.kind` to a class; train, eval, compare and Ray workers all build
their backend with `build_backend`, so adding a backend is its module plus one registry line.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import numpy as np

from essa.errors import EssaError

if TYPE_CHECKING:
    from essa.config import Config
    from essa.optim import Optimizer
    from essa.svd_space import SvdLoraSpace
    from essa.tasks import Example, RewardStats, Task


class Generation(NamedTuple):
    population: np.ndarray  # (popsize, dim), as the optimizer asked them
    fitness: np.ndarray  # (popsize,): mean reward of each candidate
    # (popsize, 2): mean reward on the first and the second half of the prompts; how well the two
    # agree on the ranking of candidates is the generation's signal-to-noise figure.
    half_fitness: np.ndarray | None = None


def half_means(rewards: np.ndarray) -> np.ndarray:
    """(candidates, prompts) rewards -> (candidates, 2) mean reward on each half of the prompts."""
    half = rewards.shape[1] // 2
    if half == 0:
        return np.repeat(rewards.mean(axis=1, keepdims=True), 2, axis=1)
    return np.stack([rewards[:, :half].mean(axis=1), rewards[:, half:].mean(axis=1)], axis=1)


@dataclass
class Minibatch:
    """The train prompts of one generation, shared by all candidates."""

    indices: list[int]  # positions in the task's train split (what distributed workers need)
    prompts: list[str]  # the chat-formatted prompt texts
    examples: list[Example]


@dataclass
class BackendInputs:
    """What a backend is built from."""

    # The base model, or for backends that load their own weights (`loads_weights`) a weightless
    # skeleton on the meta device that serves only to check that the adapter fits.
    model: Any
    tokenizer: Any
    space: SvdLoraSpace | None  # None: the plain model, no adapter
    adapter_dir: Path | None = None
    alpha: float = 1.0  # essa.alpha the space was built with

    def weights(self) -> tuple[Any, Any] | None:
        """(model, tokenizer) when the model holds real weights, to reuse; None for a skeleton."""
        if self.model is None or next(self.model.parameters()).is_meta:
            return None
        return self.model, self.tokenizer


class Backend:
    """Evaluates candidates of the SVD-LoRA search space. Subclasses implement `evaluate` and
    `from_config`; every other method has a default."""

    # The backend's engine loads the model weights itself (vLLM, Ray workers): `load_inputs`
    # then hands it a weightless skeleton instead of a loaded model.
    loads_weights: ClassVar[bool] = False
    space: SvdLoraSpace | None = None

    @classmethod
    def check(cls, cfg: Config) -> None:
        """Refuse, before anything is written, a config this backend cannot run (a missing
        package, a setting it would ignore). Default: nothing to refuse."""

    @classmethod
    def evaluation_kind(cls, cfg: Config) -> str:
        """The backend kind that evaluates single adapters in this process (`essa eval`, the
        snapshots of `essa compare`). Default: this backend itself."""
        return cfg.backend.kind

    @classmethod
    def from_config(cls, cfg: Config, inputs: BackendInputs, progress: bool = False) -> Backend:
        raise NotImplementedError(f"{cls.__name__} does not implement from_config")

    @property
    def dim(self) -> int:
        """Dimension of the search space (0 without an adapter)."""
        return self.space.dim if self.space is not None else 0

    def evaluate(self, population: np.ndarray | None, prompts: list[str], seed: int = 0,
                 candidate_offset: int = 0, prompt_offset: int = 0) -> list[list[str]]:
        """Completions[candidate][prompt] for `population` ((lambda, dim) offsets; None: the adapter as loaded).

        Sampling draws from one stream per row, seeded by `row_seed(seed, candidate, prompt)` where
        candidate and prompt count from `candidate_offset` and `prompt_offset`: a caller that
        splits an evaluation into pieces passes each piece's position, and the samples do not
        depend on how the rows were split or batched."""
        raise NotImplementedError(f"{type(self).__name__} does not implement evaluate")

    def generated_lengths(self) -> list[int] | None:
        """Tokens generated for each completion of the last `evaluate` call (candidate-major, EOS
        not counted), where the engine knows them; None otherwise. A completion of
        `decoding.max_new_tokens` tokens ran out of tokens instead of stopping."""
        return None

    def run_generation(self, gen: int, optimizer: Optimizer, task: Task, batch: Minibatch, seed: int,
                       stats: RewardStats) -> Generation:
        """Ask `optimizer` for generation `gen`'s candidates and return them with their fitness
        (mean reward over `batch`). The caller then tells the optimizer exactly these values."""
        from essa.evaluate import score

        population = optimizer.ask()
        completions = self.evaluate(population, batch.prompts, seed=seed)
        rewards = score(task, completions, batch.examples, stats)
        return Generation(population, rewards.mean(axis=1), half_means(rewards))

    def close(self) -> None:
        """Release what the backend holds (wrapped layers, engines, workers)."""


def row_seed(seed: int, candidate: int, prompt: int) -> int:
    """The sampling seed of one (candidate, prompt) row of an evaluation seeded with `seed`."""
    return int(np.random.SeedSequence([seed, candidate, prompt]).generate_state(1, np.uint64)[0] >> 1)


# The backend registry: `backend.kind` names one of these ("module:Class", imported on use).
_BACKENDS: dict[str, str | type[Backend]] = {
    "local": "essa.backends.local:LocalBackend",
    "vllm": "essa.backends.vllm_backend:VllmBackend",
    "ray": "essa.backends.ray_backend:RayPopulationEvaluator",
}


def register_backend(kind: str, cls: type[Backend]) -> None:
    """Make a `Backend` subclass available as `backend.kind: KIND`."""
    _BACKENDS[kind] = cls


def available_backends() -> list[str]:
    return list(_BACKENDS)


def backend_class(kind: str) -> type[Backend]:
    entry = _BACKENDS.get(kind)
    if entry is None:
        raise EssaError(f"unknown backend '{kind}' (available: {', '.join(_BACKENDS)})")
    if isinstance(entry, str):
        module, _, name = entry.partition(":")
        entry = _BACKENDS[kind] = getattr(importlib.import_module(module), name)
    return entry


def load_inputs(cfg: Config, adapter_dir: str | Path | None, alpha: float, kind: str | None = None,
                loaded: tuple[Any, Any] | None = None) -> BackendInputs:
    """Check the config against the backend, load what it is built from, and check that the
    adapter fits the model: every check a backend needs happens here, before anything is written.

    `loaded` is a (model, tokenizer) already in memory, reused instead of loading another.
    """
    from essa.models import load_model, load_model_skeleton
    from essa.svd_space import SvdLoraSpace

    cls = backend_class(kind or cfg.backend.kind)
    cls.check(cfg)
    if loaded is not None:
        model, tokenizer = loaded
    else:
        model, tokenizer = load_model_skeleton(cfg.model) if cls.loads_weights else load_model(cfg.model)
    space = None
    if adapter_dir is not None:
        space = SvdLoraSpace.from_adapter(adapter_dir, alpha, model=model, offsets=cfg.essa.offsets,
                                          share=cfg.essa.share, layer_groups=cfg.essa.layer_groups)
    return BackendInputs(model, tokenizer, space, None if adapter_dir is None else Path(adapter_dir), alpha)


def build_backend(cfg: Config, inputs: BackendInputs, kind: str | None = None, progress: bool = False) -> Backend:
    """The backend `kind` (default: backend.kind) built from `cfg` and `inputs`."""
    return backend_class(kind or cfg.backend.kind).from_config(cfg, inputs, progress=progress)


def evaluation_kind(cfg: Config) -> str:
    """The backend kind that evaluates single adapters in this process for `cfg`."""
    return backend_class(cfg.backend.kind).evaluation_kind(cfg)


__all__ = ["Backend", "BackendInputs", "Generation", "Minibatch", "available_backends", "backend_class",
           "build_backend", "evaluation_kind", "half_means", "load_inputs", "register_backend", "row_seed"]
