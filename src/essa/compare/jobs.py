"""The jobs of `essa compare`, each run in its own process (orchestration.py): the SFT warm start,
ESSA, GRPO's training, the continued SFT's (compare.sft_arm), and the scoring of their snapshots.
Every snapshot of every method goes through one evaluator (`_evaluator`); each job returns its
record (results.py), and each method's run dir gets its result.json and scores.npz."""

from __future__ import annotations

import dataclasses
import multiprocessing
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from essa.backends import Backend, Generation, Minibatch, build_backend, evaluation_kind, load_inputs
from essa.compare.results import (
    SPLITS,
    EssaResult,
    GrpoResult,
    GrpoTraining,
    Point,
    SftArmResult,
    SftArmTraining,
    SftResult,
    TrainerChoice,
    write_result,
)
from essa.config import Config
from essa.io import ensure_writable_dir
from essa.schedule import SnapshotSchedule, snapshot_dir


def _quiet() -> None:
    """A job's process shows our progress only: no weight-loading bars or library deprecation chatter."""
    import warnings

    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _peak_rss_mb() -> float | None:
    """This job process's peak RSS; None in the caller's own process (compare.isolate: false),
    whose high-water mark belongs to no one method."""
    if multiprocessing.parent_process() is None:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def sft_job(cfg: Config, progress: bool) -> SftResult:
    from essa.commands import run_sft

    _quiet()
    t0 = time.perf_counter()
    adapter = run_sft(cfg, progress=progress)
    return SftResult(adapter=str(adapter), wall_clock_s=time.perf_counter() - t0, peak_rss_mb=_peak_rss_mb())


class RecordingBackend(Backend):
    """Wraps ESSA's backend and records the train-split indices each generation hands it."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.batches: list[list[int]] = []

    @property
    def dim(self) -> int:
        return self.backend.dim

    def evaluate(self, population: np.ndarray | None, prompts: list[str], seed: int = 0,
                 candidate_offset: int = 0, prompt_offset: int = 0) -> list[list[str]]:
        return self.backend.evaluate(population, prompts, seed=seed, candidate_offset=candidate_offset,
                                     prompt_offset=prompt_offset)

    def run_generation(self, gen: int, optimizer: Any, task: Any, batch: Minibatch, seed: int,
                       stats: Any) -> Generation:
        self.batches.append(list(batch.indices))
        return self.backend.run_generation(gen, optimizer, task, batch, seed, stats)

    def close(self) -> None:
        self.backend.close()


class EssaWatcher:
    """`on_generation` hook: the training-only clock, per-generation rewards and mean snapshots."""

    def __init__(self, times: list[float]):
        self.schedule = SnapshotSchedule(times)
        self.trainer: Any = None
        self.last_t = 0.0  # the clock when the last generation ended
        self.curve: list[dict[str, Any]] = []
        self.snapshots: list[tuple[float, int, np.ndarray]] = []

    def __call__(self, state: Any) -> None:
        t = self.last_t = state.elapsed_s  # the trainer keeps validation off its search clock
        last = next(r for r in reversed(state.history) if "fitness_mean" in r)
        self.curve.append({"step": state.generation, "wall_clock_s": round(t, 3),
                           "reward_mean": last["fitness_mean"], "reward_max": last["fitness_max"]})
        if self.schedule.due(t):
            self.snapshots.append((t, state.generation, self.trainer.optimizer.mean.copy()))


def essa_job(cfg: Config, start_adapter: str, run_dir: str, progress: bool) -> EssaResult:
    """ESSA on the configured backend, then every snapshot through the one evaluator."""
    from essa.tasks import get_task

    _quiet()
    out_dir = ensure_writable_dir(run_dir)
    task = get_task(cfg.task)
    inputs = load_inputs(cfg, start_adapter, cfg.essa.alpha)
    space = inputs.space
    space.save_adapter(np.zeros(space.dim), out_dir / "start_adapter")
    result, watcher, prompts_used, peak = _train_essa(cfg, inputs, task, out_dir, progress)
    space.save_adapter(result.final_z, out_dir / "adapter")
    np.savez(out_dir / "snapshots.npz", **{f"t{i}": z for i, (_, _, z) in enumerate(watcher.snapshots)})
    for _, generation, z in watcher.snapshots[1:]:  # as PEFT adapters too, named like GRPO's snapshots
        space.save_adapter(z, snapshot_dir(out_dir, generation))
    with _evaluator(cfg, start_adapter, cfg.essa.alpha, inputs.weights()) as (backend, tokenizer):
        scored = [_correct(backend, tokenizer, task, z) for _, _, z in watcher.snapshots]
        final_test = _correct(backend, tokenizer, task, result.final_z, splits=("test",))["test"]
    choice = TrainerChoice(choice=result.final_choice, val_accuracy=result.validation[result.final_choice],
                           test_accuracy=float(final_test.mean()))
    state = result.state
    out = EssaResult(
        steps=state.generation, wall_clock_s=round(watcher.last_t, 3),
        stopped_by=_stopped_by(state.generation, cfg.compare.max_steps), curve=watcher.curve,
        prompts_used=prompts_used, start_adapter=str(out_dir / "start_adapter"), peak_rss_mb=peak,
        reward_failures=state.reward_failures,
        points=[_point(t, g, c) for (t, g, _), c in zip(watcher.snapshots, scored)], correct=_stack(scored),
        validation_s_off_clock=round(state.validation_s, 3), trainer_choice=choice, search_dim=space.dim,
        sigma0=state.sigma0)
    write_result(out_dir, out)
    return out


def _train_essa(cfg: Config, inputs: Any, task: Any, out_dir: Path,
                progress: bool) -> tuple[Any, EssaWatcher, list[list[int]], float | None]:
    """The trainer on compare's budget: (its result, the watcher with every snapshot the final
    one included, the prompts each generation read, peak RSS right after training)."""
    from essa.trainer import EssaTrainer

    compare = cfg.compare
    search = dataclasses.replace(cfg.essa, time_budget_s=compare.budget_s, generations=compare.max_steps)
    recorder = RecordingBackend(build_backend(cfg, inputs))
    watcher = EssaWatcher(compare.checkpoint_times())
    try:
        trainer = EssaTrainer(recorder, inputs.tokenizer, task, search, out_dir, progress=progress,
                              on_generation=watcher)
        watcher.trainer = trainer
        watcher.snapshots.append((0.0, 0, np.zeros(trainer.dim)))  # the start: zero offsets
        result = trainer.run()
        peak = _peak_rss_mb()
    finally:
        recorder.close()
    if watcher.snapshots[-1][1] != result.state.generation:
        watcher.snapshots.append((watcher.last_t, result.state.generation, trainer.optimizer.mean.copy()))
    return result, watcher, recorder.batches, peak


def grpo_job(cfg: Config, start_adapter: str, run_dir: str, schedule: list[list[int]],
             progress: bool) -> GrpoTraining:
    """GRPO (TRL, the model in this process): training only. `grpo_scoring_job` scores the
    snapshots in a fresh process: after training, decoding in this one ran 2.5x slower (the
    bundled model; 1.6x after `malloc_trim`, the rest not pinned down)."""
    from essa.grpo import run_grpo
    from essa.models import load_model
    from essa.tasks import get_task

    _quiet()
    model, tokenizer = load_model(cfg.model, training=True)
    result = run_grpo(model, tokenizer, get_task(cfg.task), start_adapter, cfg, run_dir, schedule=schedule,
                      progress=progress)
    compare = cfg.compare
    stopped = "budget" if result.elapsed_s >= compare.budget_s else (
        "max_steps" if compare.max_steps is not None else "prompt stream end")
    return GrpoTraining(
        steps=result.steps, wall_clock_s=round(result.elapsed_s, 3), stopped_by=stopped, curve=result.history,
        prompts_used=result.prompts_used, start_adapter=result.start_adapter, peak_rss_mb=_peak_rss_mb(),
        reward_failures=result.reward_failures, lr=cfg.grpo.lr, settings=dataclasses.asdict(cfg.grpo),
        snapshots=result.snapshots)


def sft_arm_job(cfg: Config, start_adapter: str, run_dir: str, progress: bool) -> SftArmTraining:
    """The continued SFT (`essa.sft.continue_sft`, the model in this process): training only, on
    compare's budget and snapshot times; `sft_arm_scoring_job` scores it in a fresh process, as
    GRPO's are. bf16 autocast exactly where GRPO has it (one precision for the gradient methods)."""
    from essa.grpo import trains_in_bf16
    from essa.models import load_model
    from essa.sft import continue_sft
    from essa.tasks import get_task

    _quiet()
    compare = cfg.compare
    model, tokenizer = load_model(cfg.model, training=True)
    result = continue_sft(model, tokenizer, get_task(cfg.task), start_adapter, cfg.sft, run_dir,
                          budget_s=compare.budget_s, times=compare.checkpoint_times(), max_steps=compare.max_steps,
                          bf16_autocast=trains_in_bf16(cfg), progress=progress)
    return SftArmTraining(
        steps=result.steps, wall_clock_s=round(result.elapsed_s, 3),
        stopped_by=_stopped_by(result.steps, compare.max_steps), curve=result.history,
        prompts_used=result.examples_used, start_adapter=result.start_adapter, peak_rss_mb=_peak_rss_mb(),
        reward_failures=0, lr=cfg.sft.lr, settings=dataclasses.asdict(cfg.sft), snapshots=result.snapshots)


def grpo_scoring_job(cfg: Config, run_dir: str, trained: GrpoTraining) -> GrpoResult:
    """Every snapshot of a finished GRPO run (`trained`: `grpo_job`'s record) through the one
    evaluator, on a freshly loaded model in the inference dtype; writes the run's result."""
    return _score_snapshots(cfg, run_dir, trained)


def sft_arm_scoring_job(cfg: Config, run_dir: str, trained: SftArmTraining) -> SftArmResult:
    """`grpo_scoring_job` for the continued SFT's snapshots (`sft_arm_job`'s record)."""
    return _score_snapshots(cfg, run_dir, trained)


def _score_snapshots(cfg: Config, run_dir: str,
                     trained: GrpoTraining | SftArmTraining) -> GrpoResult | SftArmResult:
    """Each of `trained.snapshots` (adapter dirs) through the one evaluator, on a freshly loaded
    model in the inference dtype; the run's result, written."""
    from essa.models import load_model
    from essa.tasks import get_task

    _quiet()
    loaded = load_model(cfg.model)
    task = get_task(cfg.task)
    scored = []
    for snap in trained.snapshots:
        with _evaluator(cfg, snap.adapter_dir, 1.0, loaded) as (backend, tokenizer):
            scored.append(_correct(backend, tokenizer, task, None))
    points = [_point(snap.elapsed_s, snap.step, c) for snap, c in zip(trained.snapshots, scored)]
    out = trained.scored(points, _stack(scored))
    write_result(Path(run_dir), out)
    return out


@contextmanager
def _evaluator(cfg: Config, adapter_dir: str | Path, alpha: float,
               loaded: tuple[Any, Any] | None) -> Iterator[tuple[Backend, Any]]:
    """(backend, tokenizer) of the one evaluator every snapshot of every method goes through: the
    backend that evaluates single adapters for this config (`evaluation_kind`), in this process."""
    kind = evaluation_kind(cfg)
    inputs = load_inputs(cfg, adapter_dir, alpha, kind=kind, loaded=loaded)
    backend = build_backend(cfg, inputs, kind=kind)
    try:
        yield backend, inputs.tokenizer
    finally:
        backend.close()


def _stopped_by(steps: int, max_steps: int | None) -> str:
    return "max_steps" if max_steps is not None and steps >= max_steps else "budget"


def _correct(backend: Any, tokenizer: Any, task: Any, z: np.ndarray | None,
             splits: tuple[str, ...] = SPLITS) -> dict[str, np.ndarray]:
    """Per split, the 0/1 correctness of each example's greedy completion (`z`: ESSA offsets, or
    None for the adapter the backend was built with)."""
    from essa.evaluate import evaluate_split

    population = None if z is None else np.asarray(z)[None]
    return {s: evaluate_split(backend, tokenizer, task, task.checked_split(s), population).correct for s in splits}


def _point(time_s: float, step: int, correct: dict[str, np.ndarray]) -> Point:
    """One snapshot: when it was taken and its accuracy on each split."""
    return Point(time_s=round(time_s, 3), step=step, val_accuracy=float(correct["validation"].mean()),
                 test_accuracy=float(correct["test"].mean()))


def _stack(scored: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per split, the snapshots' 0/1 vectors as one (snapshots, examples) array."""
    return {s: np.stack([c[s] for c in scored]).astype(np.uint8) for s in SPLITS}

