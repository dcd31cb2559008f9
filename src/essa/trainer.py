"""The ESSA loop: ask -> evaluate on a shared mini-batch -> mean reward -> tell, with checkpoints.

The trainer knows no model or task internals: it drives a `Backend` (population -> fitness)
and a `Task` (rewards). Every generation ends with an atomic checkpoint; `resume=True` continues
a killed run exactly, because mini-batches and sampling seeds derive from (seed, generation)
and the optimizer state carries its own random state. Checkpoints are plain data (JSON + numpy
arrays in one .npz, `essa.io.atomic_write_state`), so loading one runs no code.

Around the loop:
- `essa.sigma0: auto` first probes the signal around the start (`essa.probe`) and takes its step.
- Each generation records how many distinct fitness values its candidates got and how well the two
  halves of its prompts agree on their ranking (`distinct_fitness`, `split_half_rho`).
- The validation split is cut in two (alternate examples): the *selection* half is what the
  loop validates the mean on (the best validated mean is the best of many such looks), the
  *judgement* half only scores the start and the challengers once, at the end.
- The start (the SFT adapter, zero offsets) is always a candidate for the final adapter: the
  others (those of essa.final_challengers: the final mean, the best validated mean, the best
  candidate) replace it only when they beat it on the judgement half with confidence (an exact
  sign test, McNemar's for 0/1 scores, at 5% split over the challengers, Bonferroni) and, with
  guard sets (`essa.guard_sets`: data from other sources), do not lose to it beyond noise
  (paired bootstrap 95% interval below zero) on any of them.
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
from essa.optim import make_optimizer, mean_rate
from essa.probe import TARGET_FLIPS, choose_sigma0, probe_signal, rank_agreement
from essa.schedule import minibatch_indices
from essa.stats import PairedComparison, compare_paired, mcnemar_exact_p
from essa.tasks import Example, RewardStats, Task, format_prompt

CHECKPOINT = "checkpoint.npz"
PICKLE_CHECKPOINT = "checkpoint.pkl"  # older essa versions; never read (unpickling can run code)
METRICS = "metrics.jsonl"
# Prompts the sigma0 probe scores each candidate on: 8 candidates x 32 prompts per sigma give a
# flip rate's binomial error of about +-2 points; each sigma costs half a generation of the demo
# (8 candidates x 64 prompts). Which 8 candidates are drawn moves it more than that (3-8% at
# sigma 0.2 across seeds on the demo, docs/history/2026-12-02-es-signal-arithmetic.md).
PROBE_PROMPTS = 32
# Chance that the final choice replaces the start with a challenger no better than it, over all
# challengers together (each is tested at FINAL_ALPHA / number of challengers).
FINAL_ALPHA = 0.05
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
    sigma0: float = 0.0  # the initial step size (essa.sigma0, or the probe's choice for "auto")
    start_correct: np.ndarray | None = None  # per selection-half example: the start's correctness
    best_mean_correct: np.ndarray | None = None  # its selection-half scores (history; never judged on)

    @classmethod
    def from_tree(cls, tree: Any, path: Path) -> TrainState:
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(tree, dict) or set(tree) != names:
            raise EssaError(f"checkpoint {path} does not hold an ESSA training state")
        return cls(**tree)


@dataclass
class TrainResult:
    final_z: np.ndarray
    final_choice: str  # "start" | "mean" | "best_candidate" | "best_validated_mean"
    validation: dict[str, float]
    state: TrainState
    mean_z: np.ndarray  # the search's final mean, chosen or not
    versus_start: dict[str, dict[str, Any]] = field(default_factory=dict)  # paired comparisons


class EssaTrainer:
    """The search over `backend.dim` singular-value offsets; `on_generation(state)` runs after each generation."""

    def __init__(self, backend: Backend, tokenizer: Any, task: Task, search: SearchConfig, run_dir: str | Path,
                 progress: bool = True, on_generation: Callable[[TrainState], None] | None = None,
                 guards: list[GuardSet] | None = None):
        self.backend = backend
        self.guards = list(guards or [])
        self.tokenizer = tokenizer
        self.task = task
        self.cfg = search
        self.dim = backend.dim
        self.run_dir = ensure_writable_dir(run_dir)
        self.progress = progress
        self.on_generation = on_generation
        self.train = task.checked_split("train")
        self.validation = task.checked_split("validation")
        self.selection, self.judgement = split_validation(self.validation)
        self.train_prompts = [format_prompt(tokenizer, task, ex) for ex in self.train]
        # Built in run(): a new run's once sigma0 is known (the probe's, with "auto"), a resumed
        # run's from its checkpoint.
        self.optimizer = None
        self._scored: dict[tuple[str, bytes], np.ndarray] = {}

    # -- public -----------------------------------------------------------------------------
    def run(self, resume: bool = False) -> TrainResult:
        state = self._start(resume)
        if state.generation == 0 and not state.history:
            state.sigma0 = self._initial_sigma(state)
            self.optimizer = make_optimizer(self.cfg, self.dim, sigma0=state.sigma0)
            self._validate_mean(state, label="start")
            self._checkpoint(state)
        bar = tqdm(total=self.cfg.generations, initial=state.generation, desc="ESSA", unit="gen",
                   disable=not self.progress, dynamic_ncols=True)
        while not self._budget_spent(state):
            self._step(state)
            bar.update(1)
            last = state.history[-1]
            val = max(state.best_mean_val, float(state.start_correct.mean()))  # best validated so far
            bar.set_postfix(fit=f"{last['fitness_mean']:.3f}", best=f"{state.best_fitness:.3f}", val=f"{val:.3f}")
            if self.on_generation is not None:
                self.on_generation(state)
        bar.close()
        return self._finish(state)

    # -- one generation ---------------------------------------------------------------------
    def _initial_sigma(self, state: TrainState) -> float:
        """essa.sigma0, or with "auto" the probe's choice (its table goes into the history)."""
        if self.cfg.sigma0 != "auto":
            return float(self.cfg.sigma0)
        t0 = time.perf_counter()
        rng = np.random.default_rng([self.cfg.seed, 2**32 - 1])  # a stream apart from the mini-batches
        size = min(self.cfg.prompts_per_generation, PROBE_PROMPTS, len(self.train))
        picked = rng.choice(len(self.train), size=size, replace=False)
        harm = self.cfg.sigma0_rule == "harm"
        rows = probe_signal(self.backend, self.tokenizer, self.task, [self.train[i] for i in picked],
                            seed=self.cfg.seed, stop_at_flips=None if harm else TARGET_FLIPS, stop_at_harm=harm)
        sigma0 = choose_sigma0(rows, TARGET_FLIPS, rule=self.cfg.sigma0_rule)  # what the probe stopped at
        state.elapsed_s += time.perf_counter() - t0  # the probe spends search compute: it counts
        state.history.append({"generation": 0, "wall_clock_s": round(state.elapsed_s, 3), "sigma0": sigma0,
                              "probe": [r.to_dict() for r in rows]})
        log.info("probe (%s): sigma0 = %g (flip rates %s; loss against the start %s)", self.cfg.sigma0_rule, sigma0,
                 [round(r.flipped, 3) for r in rows], [f"{r.loss_vs_start:.3f}+-{r.loss_se:.3f}" for r in rows])
        return sigma0

    def _step(self, state: TrainState) -> None:
        gen = state.generation
        t0 = time.perf_counter()
        stats = RewardStats()
        result = self.backend.run_generation(gen, self.optimizer, self.task, self._minibatch(gen), self._seed(gen),
                                             stats)
        population, fitness = result.population, result.fitness
        rate = mean_rate(self.cfg, result.half_fitness)
        self.optimizer.tell(population, fitness, mean_rate=rate)
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
            # How much the generation could tell candidates apart (0/1 rewards on few prompts tie).
            "distinct_fitness": int(len(np.unique(fitness))),
            "split_half_rho": None if result.half_fitness is None else rank_agreement(*result.half_fitness.T),
            "mean_rate": rate,
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
        correct = self.validation_scores(mean)
        acc = float(correct.mean())
        state.validation_s += time.perf_counter() - t0
        if label == "start":
            state.start_correct = correct
        elif acc > state.best_mean_val:
            state.best_mean_val, state.best_mean, state.best_mean_correct = acc, mean, correct
        entry = {"generation": state.generation, "wall_clock_s": round(state.elapsed_s, 3),
                 "validation_s": round(state.validation_s, 3), "val_accuracy": acc, "validated": label}
        if state.history and state.history[-1]["generation"] == state.generation:
            state.history[-1].update(entry)
        else:
            state.history.append(entry)
        log.info("generation %d: validation accuracy of the %s = %.4f", state.generation, label, acc)

    def validation_scores(self, z: np.ndarray) -> np.ndarray:
        """Per selection-half validation example, 1.0 where candidate `z` answers correctly
        (greedy); each candidate is scored once per process."""
        return self._scores("selection", self.task, self.selection, z)

    def judgement_scores(self, z: np.ndarray) -> np.ndarray:
        """The same on the judgement half, which only the final choice reads."""
        return self._scores("judgement", self.task, self.judgement, z)

    def _scores(self, split: str, task: Task, examples: list[Example], z: np.ndarray) -> np.ndarray:
        """Per example of `examples` (named `split`), 1.0 where candidate `z` answers correctly
        (greedy); each (split, candidate) is scored once per process."""
        key = (split, np.asarray(z, dtype=np.float64).tobytes())
        if key not in self._scored:
            self._scored[key] = evaluate_split(self.backend, self.tokenizer, task, examples, z[None]).correct
        return self._scored[key]

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
        self.optimizer = restore_optimizer(self.cfg, state)
        log.info("resumed at generation %d (%.0f s spent)", state.generation, state.elapsed_s)
        return state

    def _checkpoint(self, state: TrainState) -> None:
        state.optimizer = self.optimizer.state_dict()
        state.dim = self.dim
        atomic_write_state(self.run_dir / CHECKPOINT, dataclasses.asdict(state))
        lines = "".join(_json_line(r) for r in state.history)
        atomic_write_text(self.run_dir / METRICS, lines)

    def _finish(self, state: TrainState) -> TrainResult:
        """The final adapter: the start, unless a challenger beats it on the judgement half with
        confidence (`choose_final`) and passes the guard sets."""
        start = self.judgement_scores(np.zeros(self.dim))
        challengers = self._challengers(state)
        guarded: dict[str, dict[str, PairedComparison]] = {}

        def passes_guard(name: str) -> bool:
            guarded[name] = self._guard_comparisons(challengers[name][0])
            return guard_verdict(guarded[name])

        choice, versus = choose_final(start, {n: c for n, (_, c) in challengers.items()}, seed=self.cfg.seed,
                                      passes_guard=passes_guard)
        validation = {"start": float(start.mean()), **{n: float(c.mean()) for n, (_, c) in challengers.items()}}
        final_z = np.zeros(self.dim) if choice == "start" else challengers[choice][0]
        versus_start = {name: c.to_dict() for name, c in versus.items()}
        rule = (f"the start unless a challenger beats it on the judgement half of validation ({len(self.judgement)} "
                f"examples the search never saw) by an exact sign test at {FINAL_ALPHA:g} / {max(1, len(versus))} "
                "challengers")
        if self.guards:
            rule += (" and its paired 95% CI against the start on no guard set (essa.guard_sets) lies below zero; "
                     "challengers are asked in order of judgement accuracy")
        atomic_write_json(self.run_dir / "final.json", {
            "choice": choice, "validation_accuracy": validation, "versus_start": versus_start,
            "selection_examples": len(self.selection), "judgement_examples": len(self.judgement),
            "guard": {name: {"passed": guard_verdict(sets), **{s: c.to_dict() for s, c in sets.items()}}
                      for name, sets in guarded.items() if self.guards},
            "rule": rule,
            "generations": state.generation, "wall_clock_s": state.elapsed_s, "sigma0": state.sigma0,
            "reward_failures": state.reward_failures,
        })
        return TrainResult(final_z, choice, validation, state, self.optimizer.mean, versus_start)

    def _guard_comparisons(self, z: np.ndarray) -> dict[str, PairedComparison]:
        """Candidate `z` against the start on each guard set (greedy, the run's decoding settings)."""
        out = {}
        for guard in self.guards:  # the start is scored on each guard set once, whatever is asked
            start, candidate = (self._scores(f"guard/{guard.name}", guard.task, guard.examples, offsets)
                                for offsets in (np.zeros(self.dim), z))
            out[guard.name] = compare_paired(start, candidate, seed=self.cfg.seed)
        return out

    def _challengers(self, state: TrainState) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Each challenger the config names that exists: its offsets and per-example judgement scores."""
        wanted = self.cfg.final_challengers
        mean = self.optimizer.mean.copy()
        points = {}
        if "mean" in wanted:
            points["mean"] = mean
        if ("best_validated_mean" in wanted and state.best_mean is not None
                and not np.array_equal(state.best_mean, mean)):
            points["best_validated_mean"] = state.best_mean
        if "best_candidate" in wanted and state.best_candidate is not None:
            points["best_candidate"] = state.best_candidate
        return {name: (z, self.judgement_scores(z)) for name, z in points.items()}


def restore_optimizer(search: SearchConfig, state: TrainState) -> Any:
    """The optimizer as the checkpointed `state` left it (its mean, step size and random state)."""
    optimizer = make_optimizer(search, state.dim, sigma0=state.sigma0)
    optimizer.load_state_dict(state.optimizer)
    return optimizer


def choose_final(start: np.ndarray, challengers: dict[str, np.ndarray], seed: int = 0,
                 passes_guard: Callable[[str], bool] = lambda name: True,
                 alpha: float = FINAL_ALPHA) -> tuple[str, dict[str, PairedComparison]]:
    """"start", or the challenger with the highest accuracy among those that `beats_start` at
    `alpha` / number of challengers (Bonferroni) and that `passes_guard` (asked in that order,
    until one passes); with each one's comparison. Scores are per example of prompts the
    challengers were not selected on."""
    versus = {name: compare_paired(start, correct, seed=seed) for name, correct in challengers.items()}
    level = alpha / max(1, len(versus))
    qualified = sorted((name for name, c in versus.items() if beats_start(c, level)),
                       key=lambda n: (versus[n].mean_b, n == "mean"), reverse=True)
    return next((name for name in qualified if passes_guard(name)), "start"), versus


def beats_start(versus: PairedComparison, level: float) -> bool:
    """More examples gained than lost, and an exact two-sided sign test on them (McNemar's exact
    test for 0/1 scores) below `level`: unlike a bootstrap interval it holds at a handful of
    discordant examples (3 gained, 0 lost gives p = 0.25, not a gain)."""
    return versus.gained > versus.lost and mcnemar_exact_p(versus.gained, versus.lost) < level


def split_validation(examples: list[Example]) -> tuple[list[Example], list[Example]]:
    """(selection half, judgement half): alternate examples, so either half keeps the split's mix."""
    if len(examples) < 2:
        raise EssaError("the validation split needs at least 2 examples: one half selects during the search, "
                        "the other judges the final choice (raise task.validation_size)")
    return examples[0::2], examples[1::2]


@dataclass
class GuardSet:
    """Examples from another source the final adapter must not lose on (`essa.guard_sets`)."""

    name: str
    task: Task
    examples: list[Example]


def guard_verdict(comparisons: dict[str, PairedComparison]) -> bool:
    """A challenger passes the guard unless it loses to the start beyond noise on some guard set
    (its paired 95% interval lies below zero there)."""
    return all(c.ci95[1] >= 0 for c in comparisons.values())


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


def _json_line(record: dict[str, Any]) -> str:
    return json.dumps(record) + "\n"
