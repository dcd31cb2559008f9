"""The ESSA loop: ask -> evaluate on a shared mini-batch -> mean reward -> tell, with checkpoints.

The trainer knows no model or task internals: it drives a `Backend` (population -> fitness)
and a `Task` (rewards). Every generation ends with an atomic checkpoint; `resume=True` continues
a killed run exactly, because mini-batches and sampling seeds derive from (seed, generation)
and the optimizer state carries its own random state. Checkpoints are plain data (JSON + numpy
arrays in one .npz, `essa.io.atomic_write_state`), so loading one runs no code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm.auto import tqdm

from essa.backends import Backend, Minibatch
from essa.config import SearchConfig
from essa.errors import EssaError
from essa.evaluate import evaluate_split
from essa.io import atomic_write_json, atomic_write_state, atomic_write_text, ensure_writable_dir, read_state
from essa.optim import make_optimizer
from essa.schedule import minibatch_indices
from essa.tasks import RewardStats, Task, format_prompt

CHECKPOINT = "checkpoint.npz"
PICKLE_CHECKPOINT = "checkpoint.pkl"  # older essa versions; never read (unpickling can run code)
METRICS = "metrics.jsonl"
log = logging.getLogger("essa.train")


@dataclass
class TrainState:
    """Everything a resumed run needs; saved as plain data after every generation."""

    generation: int = 0
    elapsed_s: float = 0.0  # search time: what the time budget and the plots count
    validation_s: float = 0.0  # time spent validating, kept off the search clock
    optimizer: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    best_candidate: np.ndarray | None = None
    best_fitness: float = -np.inf
    best_mean: np.ndarray | None = None  # validation-best optimizer mean so far
    best_mean_val: float = -np.inf
    reward_failures: int = 0
    dim: int = 0

    @classmethod
    def from_tree(cls, tree: Any, path: Path) -> TrainState:
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(tree, dict) or set(tree) != names:
            raise EssaError(f"checkpoint {path} does not hold an ESSA training state")
        return cls(**tree)


@dataclass
class TrainResult:
    final_z: np.ndarray
    final_choice: str  # "mean" | "best_candidate" | "best_validated_mean"
    validation: dict[str, float]
    state: TrainState


class EssaTrainer:
    """The search over `backend.dim` singular-value offsets; `on_generation(state)` runs after each generation."""

    def __init__(self, backend: Backend, tokenizer: Any, task: Task, search: SearchConfig, run_dir: str | Path,
                 progress: bool = True, on_generation: Callable[[TrainState], None] | None = None):
        self.backend = backend
        self.tokenizer = tokenizer
        self.task = task
        self.cfg = search
        self.dim = backend.dim
        self.run_dir = ensure_writable_dir(run_dir)
        self.progress = progress
        self.on_generation = on_generation
        self.train = task.checked_split("train")
        self.validation = task.checked_split("validation")
        self.train_prompts = [format_prompt(tokenizer, task, ex) for ex in self.train]
        self.optimizer = make_optimizer(search, self.dim)

    # -- public -----------------------------------------------------------------------------
    def run(self, resume: bool = False) -> TrainResult:
        state = self._start(resume)
        bar = tqdm(total=self.cfg.generations, initial=state.generation, desc="ESSA", unit="gen",
                   disable=not self.progress, dynamic_ncols=True)
        if state.generation == 0 and not state.history:
            self._validate_mean(state, label="start")
            self._checkpoint(state)
        while not self._budget_spent(state):
            self._step(state)
            bar.update(1)
            last = state.history[-1]
            bar.set_postfix(fit=f"{last['fitness_mean']:.3f}", best=f"{state.best_fitness:.3f}",
                            val=f"{state.best_mean_val:.3f}")
            if self.on_generation is not None:
                self.on_generation(state)
        bar.close()
        return self._finish(state)

    # -- one generation ---------------------------------------------------------------------
    def _step(self, state: TrainState) -> None:
        gen = state.generation
        t0 = time.perf_counter()
        stats = RewardStats()
        population, fitness = self.backend.run_generation(gen, self.optimizer, self.task, self._minibatch(gen),
                                                          self._seed(gen), stats)
        self.optimizer.tell(population, fitness)
        best = int(np.argmax(fitness))
        if fitness[best] > state.best_fitness:
            state.best_fitness, state.best_candidate = float(fitness[best]), population[best].copy()
        state.reward_failures += stats.failures
        state.elapsed_s += time.perf_counter() - t0
        state.generation = gen + 1
        record = {
            "generation": state.generation, "wall_clock_s": round(state.elapsed_s, 3),
            "fitness_mean": float(fitness.mean()), "fitness_max": float(fitness.max()),
            "fitness_min": float(fitness.min()), "sigma": float(self.optimizer.sigma),
            "mean_norm": float(np.linalg.norm(self.optimizer.mean)), "reward_failures": stats.failures,
        }
        state.history.append(record)
        if self.cfg.eval_every and state.generation % self.cfg.eval_every == 0:
            self._validate_mean(state)
        self._checkpoint(state)

    def _minibatch(self, gen: int) -> Minibatch:
        indices = minibatch_indices(self.cfg, len(self.train), gen)
        return Minibatch(indices, [self.train_prompts[i] for i in indices], [self.train[i] for i in indices])

    def _seed(self, gen: int) -> int:
        return int(np.random.default_rng([self.cfg.seed, gen, 1]).integers(2**31))

    def _validate_mean(self, state: TrainState, label: str = "mean") -> None:
        t0 = time.perf_counter()
        mean = self.optimizer.mean.copy()
        acc = self.validation_accuracy(mean)
        state.validation_s += time.perf_counter() - t0
        if acc > state.best_mean_val:
            state.best_mean_val, state.best_mean = acc, mean
        entry = {"generation": state.generation, "wall_clock_s": round(state.elapsed_s, 3),
                 "validation_s": round(state.validation_s, 3), "val_accuracy": acc, "validated": label}
        if state.history and state.history[-1]["generation"] == state.generation:
            state.history[-1].update(entry)
        else:
            state.history.append(entry)
        log.info("generation %d: validation accuracy of the %s = %.4f", state.generation, label, acc)

    def validation_accuracy(self, z: np.ndarray) -> float:
        return evaluate_split(self.backend, self.tokenizer, self.task, self.validation, z[None]).metrics["accuracy"]

    # -- budget, checkpoint, finish ---------------------------------------------------------------
    def _budget_spent(self, state: TrainState) -> bool:
        if self.cfg.generations is not None and state.generation >= self.cfg.generations:
            return True
        return self.cfg.time_budget_s is not None and state.elapsed_s >= self.cfg.time_budget_s

    def _start(self, resume: bool) -> TrainState:
        path = self.run_dir / CHECKPOINT
        refuse_to_overwrite(self.run_dir, resume)
        if not path.exists():
            if resume:
                log.info("no checkpoint in %s: starting a new run", self.run_dir)
            return TrainState()
        state = TrainState.from_tree(read_state(path), path)
        if state.dim != self.dim:
            raise EssaError(f"checkpoint {path} belongs to a search space of another size")
        self.optimizer.load_state_dict(state.optimizer)
        log.info("resumed at generation %d (%.0f s spent)", state.generation, state.elapsed_s)
        return state

    def _checkpoint(self, state: TrainState) -> None:
        state.optimizer = self.optimizer.state_dict()
        state.dim = self.dim
        atomic_write_state(self.run_dir / CHECKPOINT, dataclasses.asdict(state))
        lines = "".join(_json_line(r) for r in state.history)
        atomic_write_text(self.run_dir / METRICS, lines)

    def _finish(self, state: TrainState) -> TrainResult:
        """Final adapter = the validation-best of {CMA mean, best candidate, best validated mean}."""
        choices: dict[str, np.ndarray] = {"mean": self.optimizer.mean.copy()}
        if state.best_candidate is not None:
            choices["best_candidate"] = state.best_candidate
        validation = {name: self.validation_accuracy(z) for name, z in choices.items()
                      if not (name == "mean" and _validated_last(state))}
        if _validated_last(state):  # the last generation already validated this very mean
            validation = {"mean": state.history[-1]["val_accuracy"], **validation}
        if state.best_mean is not None and not np.array_equal(state.best_mean, choices["mean"]):
            choices["best_validated_mean"] = state.best_mean
            validation["best_validated_mean"] = state.best_mean_val
        choice = max(validation, key=lambda k: (validation[k], k == "mean"))
        atomic_write_json(self.run_dir / "final.json", {
            "choice": choice, "validation_accuracy": validation, "generations": state.generation,
            "wall_clock_s": state.elapsed_s, "reward_failures": state.reward_failures,
        })
        return TrainResult(choices[choice], choice, validation, state)


def refuse_to_overwrite(run_dir: str | Path, resume: bool) -> None:
    """A run dir that already holds a checkpoint is only continued, and only with --resume; a
    pickle checkpoint of an older essa is never loaded (unpickling a file can run code)."""
    run_dir = Path(run_dir)
    if (run_dir / PICKLE_CHECKPOINT).exists() and not (run_dir / CHECKPOINT).exists():
        raise EssaError(f"{run_dir} holds a {PICKLE_CHECKPOINT} of an older essa, which is not loaded (unpickling "
                        "a file can run code); start the run again in another output_dir")
    if not resume and (run_dir / CHECKPOINT).exists():
        raise EssaError(f"{run_dir} already holds an ESSA run; pass --resume to continue it "
                        "or choose another output_dir")


def _validated_last(state: TrainState) -> bool:
    last = state.history[-1] if state.history else {}
    return last.get("generation") == state.generation and "val_accuracy" in last


def _json_line(record: dict[str, Any]) -> str:
    return json.dumps(record) + "\n"
