"""`essa compare`: ESSA vs GRPO from the same SFT adapter, same reward, same prompts, same budget.

Protocol (what makes the comparison fair, and what the report claims):
- One start adapter: the SFT adapter (trained once, or `adapter=PATH`), or with
  `compare.svd_vectors: random` the same adapter with random orthonormal singular vectors and the
  same singular values (the paper's Appendix E ablation). Both methods save the exact tensors they
  start from (`essa/start_adapter`, `grpo/lr_<lr>/start_adapter`); the run fails unless they are
  equal.
- One prompt stream (`essa.schedule.prompt_stream`): ESSA's mini-batches over the task's train
  split. GRPO reads the same stream in the same order, cut into its steps; each method records
  what it read and the run fails unless both read exactly the stream.
- One clock per method, counting training work only: ESSA generations (its validation passes are
  kept off the trainer's search clock), GRPO optimizer steps (snapshot
  saves are off the clock). Each stops at the first step that ends past `compare.budget_s`.
- Matched checkpoints: at every budget/`checkpoints` seconds each method snapshots its current
  model (ESSA: the optimizer mean, no validation involved; GRPO: the current adapter). ESSA trains
  on the configured backend (backend.kind). After training, every snapshot is evaluated greedily
  by the same evaluator (the backend that evaluates single adapters for this config: local or
  vLLM, the workers' engine for a Ray pool) on the validation and the held-out test split.
  Selection ("validation-best") reads validation accuracy only; the test split is only reported.
  Each snapshot's per-example 0/1 scores are kept (`scores.npz` beside each `result.json`), and
  the summary compares snapshots problem by problem on the test split (`essa.stats`: delta,
  paired bootstrap 95% CI, McNemar's exact p).
- A fair baseline: with `grpo.lr_sweep` GRPO runs once per learning rate, each with the full
  budget, from the same start and prompt stream (each checked as above), in `grpo/lr_<lr>/`. The
  run compared with ESSA is the one whose final snapshot has the highest validation accuracy;
  every run's numbers are reported.
- One precision: GRPO trains with bf16 autocast (rollouts included) exactly when the model's
  inference dtype, the one ESSA searches in, is bf16; every snapshot of both methods is evaluated
  in that inference dtype. The summary records each method's precision.
- Peak memory: with `compare.isolate` (default) SFT, ESSA and GRPO each run in a fresh process
  started with multiprocessing 'spawn'; each reports its own `ru_maxrss` right after training
  (model load + training; evaluation comes later), so the two peaks are separable. GRPO's
  snapshots are scored in another fresh process, on a freshly loaded model: in the process that
  trained, greedy decoding ran 2.5x slower (1.6x after `malloc_trim`; the rest not pinned down).
- Resume (`--resume`): finished jobs (SFT, ESSA, each GRPO run's training and its scoring) are
  kept, an interrupted one starts over; only with the settings the comparison began with.

With `grpo.svd_only: true` the baseline is SVD-GRPO: the same GRPO, but only the singular-value
offsets ESSA searches are trained (`svd_grpo.py`); tables and plots then name it SVD-GRPO.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import resource
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from essa.backends import Backend, Generation, Minibatch, backend_class, build_backend, evaluation_kind, load_inputs
from essa.config import Config, SearchConfig, config_from_mapping, dotted, load_config
from essa.console import say
from essa.errors import EssaError
from essa.io import atomic_write_json, atomic_write_state, atomic_write_text, ensure_writable_dir, read_state
from essa.report import line_plot
from essa.schedule import STREAM_STEPS, SnapshotSchedule, prompt_stream, rechunk
from essa.stats import compare_paired
from essa.svd_space import ADAPTER_WEIGHTS, SvdFactorPair, SvdLoraSpace

log = logging.getLogger("essa.compare")
COMPARE_CONFIG = "compare.yaml"
REWARD_PLOT = "reward_vs_wallclock.png"
ACCURACY_PLOT = "test_accuracy_vs_wallclock.png"
RESULT = "result.json"
# Per-example 0/1 correctness of every snapshot, beside result.json: one (snapshots, examples)
# array per split, rows in the order of result.json's "points".
SCORES = "scores.npz"
SPLITS = ("validation", "test")
ACCURACY_KEY = {"validation": "val_accuracy", "test": "test_accuracy"}
SELECTION_RULE = ("the highest validation accuracy of its final snapshot (ties: the first learning rate "
                  "listed); test accuracy plays no part")


# -- config --------------------------------------------------------------------------------------
def compare_defaults() -> Config:
    """The comparison's settings: the packaged compare.yaml over the library defaults."""
    return config_from_mapping(yaml.safe_load(resources.files("essa").joinpath("configs", COMPARE_CONFIG).read_text()))


def load_compare_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Packaged compare.yaml <- YAML file <- key=value overrides (all sections, compare: and grpo: included)."""
    return load_config(path, overrides, base=compare_defaults())


# -- the start adapter --------------------------------------------------------------------------
def randomize_singular_vectors(space: SvdLoraSpace, seed: int) -> SvdLoraSpace:
    """The same factor shapes, singular values and trainable counts, with random orthonormal U and V."""
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for p in space.pairs:
        (r, n), (m, _) = p.a.shape, p.b.shape
        a = _orthonormal(r, r, gen) @ torch.diag(p.s_a) @ _orthonormal(n, r, gen).T
        b = _orthonormal(m, r, gen) @ torch.diag(p.s_b) @ _orthonormal(r, r, gen).T
        pairs.append(SvdFactorPair.decompose(p.name, a.to(p.a.dtype), b.to(p.b.dtype), p.trainable / p.rank,
                                             p.scale))
    return SvdLoraSpace(pairs, dict(space.adapter_config))


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """A (rows, cols) matrix with orthonormal columns, Haar-distributed (QR with sign fix)."""
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def same_adapter_tensors(dir_a: str | Path, dir_b: str | Path) -> bool:
    """True when two PEFT adapter dirs hold the same tensor names with bit-identical values."""
    from safetensors.torch import load_file

    a, b = load_file(str(Path(dir_a) / ADAPTER_WEIGHTS)), load_file(str(Path(dir_b) / ADAPTER_WEIGHTS))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- what the two methods must share, verified after they ran -----------------------------------
def check_same_start(essa: dict[str, Any], grpo: dict[str, Any]) -> None:
    """Both methods saved the tensors they started from: they must be bit-identical."""
    if not same_adapter_tensors(essa["start_adapter"], grpo["start_adapter"]):
        raise EssaError(f"ESSA and GRPO started from different adapter tensors ({essa['start_adapter']} vs "
                        f"{grpo['start_adapter']}): the comparison is void")


def check_same_prompts(search: SearchConfig, n_train: int, per_step: int, essa: dict[str, Any],
                       grpo: dict[str, Any]) -> None:
    """ESSA's generations and GRPO's steps (`per_step` prompts each) read the shared prompt stream,
    in order, and nothing else."""
    generations = max(essa["steps"], -(-grpo["steps"] * per_step // min(search.prompts_per_generation, n_train)))
    stream = prompt_stream(search, n_train, generations)
    expected = {"ESSA": stream[:essa["steps"]], "GRPO": rechunk(stream, per_step)[:grpo["steps"]]}
    for (name, want), used in zip(expected.items(), (essa["prompts_used"], grpo["prompts_used"])):
        if used != want:
            step = next((k for k, (u, w) in enumerate(zip(used, want)) if u != w), min(len(used), len(want)))
            raise EssaError(f"{name} did not read the shared prompt stream (first difference at step {step}: "
                            f"{used[step] if step < len(used) else 'nothing'} instead of "
                            f"{want[step] if step < len(want) else 'nothing'}): the comparison is void")


# -- selection and time-to-target (validation picks, test only reports) -------------------------
def validation_best(val_accuracies: list[float]) -> int:
    """Index of the highest validation accuracy; ties go to the earliest snapshot."""
    if not val_accuracies:
        raise EssaError("no snapshots to select from")
    return int(np.argmax(np.asarray(val_accuracies)))


def time_to_target(points: list[dict[str, Any]], target: float) -> float | None:
    """First snapshot time whose test accuracy reaches `target` (None: never within the budget)."""
    for p in sorted(points, key=lambda p: p["time_s"]):
        if p["test_accuracy"] >= target - 1e-12:
            return p["time_s"]
    return None


# -- one method per process ---------------------------------------------------------------------
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


# glibc's malloc serves blocks over 32 MB with fresh mmaps and unmaps them when they are freed, so
# TRL's full-vocabulary logits (~0.5 GB a micro-batch on the bundled model) page-fault in anew at
# every step: 38% of a GRPO process's CPU time went to the kernel (docs/BENCHMARKS.md). Each job
# process keeps the memory it frees instead (it ends with its job); variables the user set win.
JOB_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}


@contextmanager
def _env_for_children(env: dict[str, str]) -> Iterator[None]:
    """`env` in os.environ (where unset) while child processes are spawned; glibc reads it at their start."""
    added = {k: v for k, v in env.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _run_job(isolate: bool, fn: Callable[..., dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    if not isolate:
        return fn(**kwargs)
    with _env_for_children(JOB_MALLOC_ENV), \
            ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(fn, **kwargs).result()
        except BrokenProcessPool as exc:
            raise EssaError(f"the {fn.__name__.strip('_').removesuffix('_job')} process died: out of memory, or "
                            "a script calling run_compare lacks the `if __name__ == '__main__':` guard") from exc


def _sft_job(cfg: Config, progress: bool) -> dict[str, Any]:
    from essa.commands import run_sft

    _quiet()
    t0 = time.perf_counter()
    adapter = run_sft(cfg, progress=progress)
    return {"adapter": str(adapter), "wall_clock_s": time.perf_counter() - t0, "peak_rss_mb": _peak_rss_mb()}


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


def _essa_job(cfg: Config, start_adapter: str, run_dir: str, progress: bool) -> dict[str, Any]:
    """ESSA on the configured backend, then every snapshot through the one evaluator."""
    from essa.tasks import get_task
    from essa.trainer import EssaTrainer

    _quiet()
    out_dir = ensure_writable_dir(run_dir)
    task = get_task(cfg.task)
    inputs = load_inputs(cfg, start_adapter, cfg.essa.alpha)
    space = inputs.space
    space.save_adapter(np.zeros(space.dim), out_dir / "start_adapter")
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
    end_t = watcher.last_t
    if watcher.snapshots[-1][1] != result.state.generation:
        watcher.snapshots.append((end_t, result.state.generation, trainer.optimizer.mean.copy()))
    space.save_adapter(result.final_z, out_dir / "adapter")
    np.savez(out_dir / "snapshots.npz", **{f"t{i}": z for i, (_, _, z) in enumerate(watcher.snapshots)})
    with _evaluator(cfg, start_adapter, cfg.essa.alpha, inputs.weights()) as (backend, tokenizer):
        scored = [_correct(backend, tokenizer, task, z) for _, _, z in watcher.snapshots]
        final_test = _correct(backend, tokenizer, task, result.final_z, splits=("test",))["test"]
    choice = {"choice": result.final_choice, "val_accuracy": result.validation[result.final_choice],
              "test_accuracy": float(final_test.mean())}
    out = {"method": "essa", "steps": result.state.generation, "wall_clock_s": round(end_t, 3),
           "stopped_by": _stopped_by(result.state.generation, compare.max_steps),
           "validation_s_off_clock": round(result.state.validation_s, 3), "curve": watcher.curve,
           "points": [_point(t, g, c) for (t, g, _), c in zip(watcher.snapshots, scored)],
           "correct": _stack(scored), "prompts_used": recorder.batches, "trainer_choice": choice,
           "search_dim": space.dim, "sigma0": result.state.sigma0, "start_adapter": str(out_dir / "start_adapter"),
           "peak_rss_mb": peak, "reward_failures": result.state.reward_failures}
    _write_result(out_dir, out)
    return out


def _grpo_job(cfg: Config, start_adapter: str, run_dir: str, schedule: list[list[int]],
              progress: bool) -> dict[str, Any]:
    """GRPO (TRL, the model in this process): training only. `_grpo_scoring_job` scores the
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
    return {"method": "grpo", "lr": cfg.grpo.lr, "steps": result.steps, "wall_clock_s": round(result.elapsed_s, 3),
            "stopped_by": stopped, "curve": result.history,
            "snapshots": [dataclasses.asdict(snap) for snap in result.snapshots],
            "prompts_used": result.prompts_used, "start_adapter": result.start_adapter,
            "peak_rss_mb": _peak_rss_mb(), "reward_failures": result.reward_failures,
            "settings": dataclasses.asdict(cfg.grpo)}


def _grpo_scoring_job(cfg: Config, run_dir: str, trained: dict[str, Any]) -> dict[str, Any]:
    """Every snapshot of a finished GRPO run (`trained`: `_grpo_job`'s result) through the one
    evaluator, on a freshly loaded model in the inference dtype; writes the run's result."""
    from essa.models import load_model
    from essa.tasks import get_task

    _quiet()
    loaded = load_model(cfg.model)
    task = get_task(cfg.task)
    scored = []
    for snap in trained["snapshots"]:
        with _evaluator(cfg, snap["adapter_dir"], 1.0, loaded) as (backend, tokenizer):
            scored.append(_correct(backend, tokenizer, task, None))
    points = [_point(snap["elapsed_s"], snap["step"], c) for snap, c in zip(trained["snapshots"], scored)]
    out = {k: v for k, v in trained.items() if k != "snapshots"}
    out.update(points=points, correct=_stack(scored))  # peak_rss_mb stays training's
    _write_result(Path(run_dir), out)
    return out


@contextmanager
def _evaluator(cfg: Config, adapter_dir: str | Path, alpha: float,
               loaded: tuple[Any, Any] | None) -> Iterator[tuple[Backend, Any]]:
    """(backend, tokenizer) of the one evaluator every snapshot of both methods goes through: the
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


def _point(time_s: float, step: int, correct: dict[str, np.ndarray]) -> dict[str, Any]:
    """One snapshot's row of result.json: when it was taken and its accuracy on each split."""
    return {"time_s": round(time_s, 3), "step": step, **{ACCURACY_KEY[s]: float(v.mean()) for s, v in correct.items()}}


def _stack(scored: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per split, the snapshots' 0/1 vectors as one (snapshots, examples) array."""
    return {s: np.stack([c[s] for c in scored]).astype(np.uint8) for s in SPLITS}


def _write_result(run_dir: Path, out: dict[str, Any]) -> None:
    """result.json (the numbers) and scores.npz (the per-example vectors, for paired comparisons)."""
    atomic_write_state(run_dir / SCORES, out["correct"])
    atomic_write_json(run_dir / RESULT, {**{k: v for k, v in out.items() if k != "correct"}, "scores": SCORES})


def load_scores(run_dir: str | Path) -> dict[str, np.ndarray]:
    """The per-example correctness a method's run dir holds: {"validation": (snapshots, examples),
    "test": ...} 0/1 arrays, rows in the order of result.json's "points"."""
    return read_state(Path(run_dir) / SCORES)


# -- the whole comparison -------------------------------------------------------------------------
def run_compare(cfg: Config, progress: bool = True, resume: bool = False) -> dict[str, Any]:
    """SFT (or cfg.adapter) -> ESSA, and GRPO once per learning rate, from the same start -> plots,
    tables, paired statistics and report in output_dir.

    With `resume`, an interrupted comparison in output_dir continues with the same settings: every
    finished job (SFT, ESSA, each GRPO run's training and its scoring) is kept, an unfinished one
    is started over (a method's clock cannot be resumed fairly)."""
    from essa.commands import resolve_adapter_dir
    from essa.tasks import get_task

    compare_cfg = cfg.compare
    root = Path(cfg.output_dir)
    if resume:
        check_resumable(root, cfg)
    elif any((root / name).exists() for name in ("sft", "essa", "grpo", "summary.json")):
        raise EssaError(f"{root} already holds a comparison; pass --resume to continue it, or choose another output_dir")
    task = get_task(cfg.task)
    for split in ("train", "validation", "test") + (() if cfg.adapter else ("sft",)):
        task.checked_split(split)
    given = None if cfg.adapter is None else str(resolve_adapter_dir(cfg.adapter))
    _check_before_writing(cfg, given)
    ensure_writable_dir(root)
    cfg.save(root / "config.yaml")

    sft = {"adapter": given, "wall_clock_s": None, "peak_rss_mb": None}
    if given is None:
        _say("1/3 LoRA SFT warm start")
        sft = _job_once(root / "sft", compare_cfg.isolate, _sft_job,
                        cfg=cfg.with_changes(output_dir=str(root / "sft")), progress=progress)
    start = _start_adapter(Path(sft["adapter"]), cfg, root)

    n_train = len(task.checked_split("train"))
    stream = prompt_stream(cfg.essa, n_train, compare_cfg.max_steps or STREAM_STEPS)
    _say(f"2/3 ESSA for {compare_cfg.budget_s:.0f} s")
    essa = _finished_run(root / "essa")
    if essa is None:
        essa = _run_job(compare_cfg.isolate, _essa_job, cfg=cfg, start_adapter=str(start),
                        run_dir=str(_fresh_dir(root / "essa")), progress=progress)
    grpo_runs = _run_grpo_sweep(cfg, start, root, rechunk(stream, cfg.grpo_prompts_per_step), progress)
    for grpo in grpo_runs:
        check_same_start(essa, grpo)
        check_same_prompts(cfg.essa, n_train, cfg.grpo_prompts_per_step, essa, grpo)
    summary = summarize(cfg, sft, essa, grpo_runs, len(task.checked_split("test")), baseline=_baseline_name(cfg))
    write_outputs(root, summary, essa, grpo_runs)
    return summary


# -- resuming ---------------------------------------------------------------------------------------
# A finished training job's result (SFT, a GRPO run before its snapshots are scored), kept for --resume.
JOB_RESULT = "job.json"


def check_resumable(root: Path, cfg: Config) -> None:
    """`root` holds a comparison begun with exactly the settings of `cfg`."""
    saved_path = root / "config.yaml"
    if not saved_path.is_file():
        raise EssaError(f"nothing to resume: {root} holds no comparison (no config.yaml)")
    saved = dotted(yaml.safe_load(saved_path.read_text()) or {})
    now = dotted(yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False)))
    changed = [f"{k} (was {saved.get(k)!r}, now {now.get(k)!r})" for k in sorted(set(saved) | set(now))
               if saved.get(k) != now.get(k)]
    if changed:
        raise EssaError(f"{root} was begun with other settings; resume it with the same ones, or choose another "
                        "output_dir. Changed: " + "; ".join(changed))


def _job_once(job_dir: Path, isolate: bool, fn: Callable[..., dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    """`fn`'s result, saved in `job_dir` when it finishes; a resumed run reads it back instead of
    running `fn` again (and starts `job_dir` over when `fn` had not finished)."""
    path = job_dir / JOB_RESULT
    if path.is_file():
        _say(f"   kept from the interrupted run: {job_dir}")
        return json.loads(path.read_text())
    _fresh_dir(job_dir)
    result = _run_job(isolate, fn, **kwargs)
    atomic_write_json(path, result)
    return result


def _finished_run(run_dir: Path) -> dict[str, Any] | None:
    """A method run that wrote its result (with its per-example scores), or None."""
    if not (run_dir / RESULT).is_file():
        return None
    _say(f"   kept from the interrupted run: {run_dir}")
    out = json.loads((run_dir / RESULT).read_text())
    out.pop("scores", None)
    return {**out, "correct": load_scores(run_dir)}


def _fresh_dir(run_dir: Path) -> Path:
    """`run_dir` emptied of what an interrupted job left (nothing there is reusable)."""
    if run_dir.exists():
        _say(f"   started over: {run_dir} (interrupted)")
        shutil.rmtree(run_dir)
    return run_dir


def _run_grpo_sweep(cfg: Config, start: Path, root: Path, schedule: list[list[int]],
                    progress: bool) -> list[dict[str, Any]]:
    """GRPO once per learning rate (grpo.lr_sweep, or grpo.lr alone), each in its own process and
    run dir, all from the same start adapter and the same prompt schedule."""
    rates = cfg.grpo.learning_rates
    runs = []
    for k, lr in enumerate(rates, 1):
        _say(f"3/3 {_baseline_name(cfg)} lr={lr:g} ({k} of {len(rates)}) for {cfg.compare.budget_s:.0f} s")
        member = cfg.with_changes(grpo=dataclasses.replace(cfg.grpo, lr=lr, lr_sweep=[]))
        run_dir = grpo_run_dir(root, lr)
        done = _finished_run(run_dir)
        if done is not None:
            runs.append(done)
            continue
        trained = _job_once(run_dir, cfg.compare.isolate, _grpo_job, cfg=member,
                            start_adapter=str(start), run_dir=str(run_dir), schedule=schedule, progress=progress)
        runs.append(_run_job(cfg.compare.isolate, _grpo_scoring_job, cfg=member, run_dir=str(run_dir),
                             trained=trained))
    return runs


def grpo_run_dir(root: str | Path, lr: float) -> Path:
    """The run dir of the GRPO run with learning rate `lr`: OUTPUT_DIR/grpo/lr_<lr>, e.g. grpo/lr_3e-05."""
    return Path(root) / "grpo" / f"lr_{lr!r}"


def _baseline_name(cfg: Config) -> str:
    return "SVD-GRPO" if cfg.grpo.svd_only else "GRPO"


def _check_before_writing(cfg: Config, adapter: str | None) -> None:
    """What would fail later, checked now: both backends can run, and the start adapter fits the
    model (or the SFT targets exist in it), on a weightless copy of the model."""
    from essa.models import load_model_skeleton
    from essa.sft import check_targets

    for kind in (cfg.backend.kind, evaluation_kind(cfg)):
        backend_class(kind).check(cfg)
    skeleton, _ = load_model_skeleton(cfg.model)
    if adapter is None:
        check_targets(skeleton, cfg.lora.targets)
    else:
        SvdLoraSpace.from_adapter(adapter, cfg.essa.alpha, model=skeleton)


def _start_adapter(sft_adapter: Path, cfg: Config, root: Path) -> Path:
    compare = cfg.compare
    if compare.svd_vectors == "sft":
        return sft_adapter
    space = SvdLoraSpace.from_adapter(sft_adapter, 1.0)
    return randomize_singular_vectors(space, compare.seed).save_adapter(np.zeros(space.dim), root / "start_adapter")


# -- the summary ----------------------------------------------------------------------------------
def summarize(cfg: Config, sft: dict[str, Any], essa: dict[str, Any], grpo_runs: list[dict[str, Any]],
              test_examples: int, baseline: str = "GRPO") -> dict[str, Any]:
    """The comparison's numbers: ESSA against the GRPO run selected on validation (`select_grpo_run`)."""
    compare = cfg.compare
    chosen = select_grpo_run(grpo_runs)
    grpo = grpo_runs[chosen]
    methods = {"essa": {**_method_row(essa), "trainer_choice": essa["trainer_choice"], "sigma0": essa["sigma0"]},
               "grpo": {**_method_row(grpo), "lr": grpo["lr"]}}
    return {
        "model": cfg.model.name, "task": cfg.task.name, "baseline": baseline, "budget_s": compare.budget_s,
        "checkpoint_times_s": compare.checkpoint_times(), "svd_vectors": compare.svd_vectors,
        "essa_decoding": "greedy" if cfg.decoding.temperature <= 0 else f"T={cfg.decoding.temperature}",
        "essa_sigma0": cfg.essa.sigma0, "precision": _precision(cfg),
        "test_examples": test_examples, "sft_adapter": sft["adapter"], "sft_wall_clock_s": sft["wall_clock_s"],
        "sft_peak_rss_mb": sft["peak_rss_mb"],
        # run_compare stops before this summary unless both hold (check_same_start, check_same_prompts).
        "same_start_adapter": True, "same_prompt_stream": True,
        "methods": methods,
        "grpo_sweep": {"selection": SELECTION_RULE, "selected_lr": grpo["lr"],
                       "runs": [{"lr": r["lr"], **_method_row(r), "selected": k == chosen}
                                for k, r in enumerate(grpo_runs)]},
        "paired_test": paired_test(essa, grpo, baseline, seed=compare.seed),
        "time_to_target": _time_to_target(methods, essa, grpo),
    }


def select_grpo_run(runs: list[dict[str, Any]]) -> int:
    """Index of the GRPO run compared with ESSA (SELECTION_RULE): the highest validation accuracy of
    its final snapshot, ties to the first listed. Test accuracy is never read."""
    return validation_best([r["points"][-1]["val_accuracy"] for r in runs])


def _method_row(res: dict[str, Any]) -> dict[str, Any]:
    points = res["points"]
    best = points[_best_index(res)]
    return {
        "start_test_accuracy": points[0]["test_accuracy"], "final_test_accuracy": points[-1]["test_accuracy"],
        "final_val_accuracy": points[-1]["val_accuracy"], "final_time_s": points[-1]["time_s"],
        "validation_best": {"time_s": best["time_s"], "val_accuracy": best["val_accuracy"],
                            "test_accuracy": best["test_accuracy"]},
        "steps": res["steps"], "wall_clock_s": res["wall_clock_s"], "stopped_by": res["stopped_by"],
        "peak_rss_mb": None if res["peak_rss_mb"] is None else round(res["peak_rss_mb"], 1),
        "reward_failures": res["reward_failures"],
    }


def _best_index(res: dict[str, Any]) -> int:
    """The method's validation-best snapshot (validation accuracy only)."""
    return validation_best([p["val_accuracy"] for p in res["points"]])


def paired_test(essa: dict[str, Any], grpo: dict[str, Any], baseline: str = "GRPO",
                seed: int = 0) -> dict[str, dict[str, Any]]:
    """Paired statistics on the test split, problem by problem: ESSA's final snapshot against the
    baseline's, and each method's final and validation-best snapshot against its own start snapshot
    (the shared start adapter through the same evaluator). Each entry: b against a, delta = b - a."""
    e, g = essa["correct"]["test"], grpo["correct"]["test"]
    e_best, g_best = e[_best_index(essa)], g[_best_index(grpo)]
    pairs = {
        "essa_final_vs_grpo_final": ((f"{baseline} final", g[-1]), ("ESSA final", e[-1])),
        "essa_final_vs_start": (("start", e[0]), ("ESSA final", e[-1])),
        "grpo_final_vs_start": (("start", g[0]), (f"{baseline} final", g[-1])),
        "essa_validation_best_vs_start": (("start", e[0]), ("ESSA validation-best", e_best)),
        "grpo_validation_best_vs_start": (("start", g[0]), (f"{baseline} validation-best", g_best)),
    }
    return {key: _paired(a, b, seed) for key, (a, b) in pairs.items()}


def _paired(a: tuple[str, np.ndarray], b: tuple[str, np.ndarray], seed: int) -> dict[str, Any]:
    (name_a, scores_a), (name_b, scores_b) = a, b
    result = compare_paired(scores_a, scores_b, seed=seed)
    return {"a": name_a, "b": name_b, **result.to_dict(), "text": result.describe(name_a, name_b)}


def _time_to_target(methods: dict[str, Any], essa: dict[str, Any], grpo: dict[str, Any]) -> dict[str, Any]:
    e_final, g_final = methods["essa"]["final_test_accuracy"], methods["grpo"]["final_test_accuracy"]
    essa_s, grpo_s = time_to_target(essa["points"], g_final), methods["grpo"]["final_time_s"]
    return {
        "essa_reaches_grpo_final_s": essa_s, "grpo_final": g_final,
        "grpo_reaches_essa_final_s": time_to_target(grpo["points"], e_final), "essa_final": e_final,
        # ESSA's time to GRPO's final accuracy as a fraction of the time GRPO trained for it.
        "essa_time_fraction_of_grpo": None if essa_s is None or not grpo_s else round(essa_s / grpo_s, 3),
    }


def _precision(cfg: Config) -> dict[str, str]:
    """What each method trained in, and what the one evaluator ran in."""
    from essa.grpo import precision
    from essa.models import resolve_dtype

    inference = resolve_dtype(cfg.model.dtype)
    if cfg.model.quantize != "none":
        inference += f" with {cfg.model.quantize} base linears"
    return {"essa": inference, "grpo": precision(cfg), "evaluation": inference}


# -- outputs --------------------------------------------------------------------------------------
def write_outputs(root: Path, summary: dict[str, Any], essa: dict[str, Any], grpo_runs: list[dict[str, Any]]) -> None:
    atomic_write_json(root / "summary.json", summary)
    atomic_write_json(root / "comparison.json", {key: summary[key] for key in (
        "methods", "time_to_target", "paired_test", "grpo_sweep", "precision")})
    tables = "\n".join([comparison_table(summary), paired_section(summary), sweep_table(summary)])
    atomic_write_text(root / "comparison.md", tables)
    _plot(root / REWARD_PLOT, "training reward vs wall-clock", "mean training reward",
          _series(summary, ("ESSA (population mean, " + summary["essa_decoding"] + ")", essa["curve"]),
                  [r["curve"] for r in grpo_runs], "sampled rollouts", "reward_mean"))
    _plot(root / ACCURACY_PLOT, f"held-out test accuracy vs wall-clock ({summary['test_examples']} problems)",
          "test accuracy (greedy)",
          _series(summary, ("ESSA (optimizer mean)", _as_curve(essa["points"])),
                  [_as_curve(r["points"]) for r in grpo_runs], "current adapter", "test_accuracy"), markers=True)
    atomic_write_text(root / "report.md", _report(summary, tables))


def _baseline(summary: dict[str, Any]) -> str:
    return summary["baseline"]


def _as_curve(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"wall_clock_s": p["time_s"], **p} for p in points]


def comparison_table(summary: dict[str, Any]) -> str:
    m, ttt = summary["methods"], summary["time_to_target"]
    e, g = m["essa"], m["grpo"]
    rows = [
        ("test accuracy at start", "acc", e["start_test_accuracy"], g["start_test_accuracy"]),
        ("final test accuracy", "acc", e["final_test_accuracy"], g["final_test_accuracy"]),
        ("  its validation accuracy", "acc", e["final_val_accuracy"], g["final_val_accuracy"]),
        ("validation-best test accuracy", "acc", e["validation_best"]["test_accuracy"],
         g["validation_best"]["test_accuracy"]),
        ("  its validation accuracy", "acc", e["validation_best"]["val_accuracy"],
         g["validation_best"]["val_accuracy"]),
        ("  its wall-clock (s)", "s", e["validation_best"]["time_s"], g["validation_best"]["time_s"]),
        ("time to the other's final test accuracy (s)", "s", ttt["essa_reaches_grpo_final_s"],
         ttt["grpo_reaches_essa_final_s"]),
        ("step size: ESSA sigma0 / GRPO learning rate", "g", e["sigma0"], g["lr"]),
        ("generations / optimizer steps", "s", e["steps"], g["steps"]),
        ("training wall-clock (s)", "s", e["wall_clock_s"], g["wall_clock_s"]),
        ("stopped by", "s", e["stopped_by"], g["stopped_by"]),
        ("peak RSS, load + training (MB)", "MB", e["peak_rss_mb"], g["peak_rss_mb"]),
    ]
    lines = [f"| | ESSA | {_baseline(summary)} |", "| --- | --- | --- |"]
    lines += [f"| {name} | {_cell(a, unit)} | {_cell(b, unit)} |" for name, unit, a, b in rows]
    lines += ["", "'-' in the time-to-target row: never reached within the budget."]
    return "\n".join(lines) + "\n"


def _cell(v: Any, unit: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return {"acc": f"{v:.3f}", "s": f"{v:.1f}", "MB": f"{v:.0f}", "g": f"{v:.3g}"}[unit]
    return str(v)


def paired_section(summary: dict[str, Any]) -> str:
    """The paired test-split comparisons in words: each says whether its difference is beyond noise."""
    lines = [f"## Paired comparisons on the {summary['test_examples']} test problems", "",
             "Problem by problem: the difference, its paired bootstrap 95% interval and McNemar's exact test on "
             "the problems exactly one of the two solves. An interval that includes 0 is no difference.", ""]
    lines += [f"- {row['text']}" for row in summary["paired_test"].values()]
    return "\n".join(lines) + "\n"


def sweep_table(summary: dict[str, Any]) -> str:
    """Every GRPO learning rate tried, so the reader sees how the baseline was tuned."""
    sweep = summary["grpo_sweep"]
    lines = [f"## {_baseline(summary)} learning rates", "",
             f"Each from the same start and prompt stream with the full budget. The run compared with ESSA is "
             f"the one with {sweep['selection']}.", "",
             "| learning rate | steps | final validation accuracy | final test accuracy | "
             "validation-best: test accuracy (validation, s) | compared |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in sweep["runs"]:
        best = r["validation_best"]
        lines.append(f"| {r['lr']:g} | {r['steps']} | {r['final_val_accuracy']:.3f} | {r['final_test_accuracy']:.3f} "
                     f"| {best['test_accuracy']:.3f} ({best['val_accuracy']:.3f}, {best['time_s']:.0f}) "
                     f"| {'yes' if r['selected'] else ''} |")
    return "\n".join(lines) + "\n"


def _report(summary: dict[str, Any], tables: str) -> str:
    return "\n".join([
        f"# ESSA vs {_baseline(summary)}: {summary['task']} on {summary['model']}", "", tables,
        f"![training reward vs wall-clock]({REWARD_PLOT})", "",
        f"![held-out test accuracy vs wall-clock]({ACCURACY_PLOT})", "", "## Notes", "",
        *[f"- {n}" for n in _notes(summary)], "",
    ])


def _notes(summary: dict[str, Any]) -> list[str]:
    m, baseline, precision = summary["methods"], _baseline(summary), summary["precision"]
    choice = m["essa"]["trainer_choice"]
    notes = [
        f"Both methods start from `{summary['sft_adapter']}`"
        + (" with random orthonormal singular vectors (same singular values)"
           if summary["svd_vectors"] == "random" else "")
        + f"; start tensors identical: {summary['same_start_adapter']}.",
        f"Budget {summary['budget_s']:.0f} s of training each; matched snapshots at "
        + ", ".join(f"{t:.0f}" for t in summary["checkpoint_times_s"]) + " s (plus the start and the end).",
        f"Both read the same prompt stream (ESSA's mini-batch schedule over the train split), every {baseline} "
        "learning rate included.",
        f"Precision: ESSA searched in {precision['essa']}; {baseline} trained in {precision['grpo']}; every "
        f"snapshot of both was evaluated greedily in {precision['evaluation']} by the same evaluator.",
        ("Snapshots are evaluated on the validation and the held-out test split. 'Validation-best' and the "
         f"{baseline} learning rate are chosen on validation accuracy only; the test split never selects anything."),
        f"Time-to-target uses the {baseline} run compared (lr {m['grpo']['lr']:g}) and snapshot times, so it is "
        "resolved only to the checkpoint spacing.",
        f"ESSA's initial step size sigma0 = {m['essa']['sigma0']:.3g}"
        + (" (essa.sigma0: auto: chosen by a probe on further train prompts, on ESSA's clock)."
           if summary["essa_sigma0"] == "auto" else "."),
        (f"ESSA's own final choice ({choice['choice']}, picked on validation): test accuracy "
         f"{choice['test_accuracy']:.3f}."),
        "Peak RSS is each method's own process (multiprocessing 'spawn'), read after training."
        if m["essa"]["peak_rss_mb"] is not None else "Peak RSS not measured (compare.isolate: false).",
    ]
    if summary["sft_wall_clock_s"] is not None:
        notes.append(f"SFT warm start took {summary['sft_wall_clock_s']:.0f} s (not part of either budget).")
    return notes


Series = tuple[str, list[dict[str, Any]], str, dict[str, Any]]


def _series(summary: dict[str, Any], essa: tuple[str, list[dict[str, Any]]], grpo: list[list[dict[str, Any]]],
            what: str, key: str) -> list[Series]:
    """ESSA's curve, then one per GRPO learning rate: the run compared in full colour, the others faint."""
    baseline = _baseline(summary)
    out: list[Series] = [(essa[0], essa[1], key, {"color": "tab:blue"})]
    for run, rows in zip(summary["grpo_sweep"]["runs"], grpo):
        if run["selected"]:
            out.append((f"{baseline} ({what}, lr {run['lr']:g})", rows, key, {"color": "tab:red"}))
        else:
            out.append((f"{baseline} lr {run['lr']:g} (not selected)", rows, key,
                        {"color": "tab:red", "alpha": 0.3, "linewidth": 1, "zorder": 1}))
    return out


def _plot(path: Path, title: str, ylabel: str, series: list[Series], markers: bool = False) -> None:
    lines = []
    for label, rows, key, style in series:
        kept = [r for r in rows if r.get(key) is not None]
        lines.append(([r["wall_clock_s"] for r in kept], [r[key] for r in kept],
                      {"label": label, "marker": "o" if markers else None, **style}))
    line_plot(path, lines, title=title, xlabel="training wall-clock (s)", ylabel=ylabel)


def _say(message: str) -> None:
    say(message, prefix="essa compare")


__all__ = [
    "check_same_prompts",
    "check_same_start",
    "compare_defaults",
    "grpo_run_dir",
    "load_compare_config",
    "load_scores",
    "paired_test",
    "randomize_singular_vectors",
    "run_compare",
    "same_adapter_tensors",
    "select_grpo_run",
    "time_to_target",
    "validation_best",
]
