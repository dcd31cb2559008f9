"""How `essa compare` runs: settings, the jobs in order (each in a fresh 'spawn' process with
compare.isolate), the checks that the methods shared their inputs, and --resume."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

from essa.backends import backend_class, evaluation_kind
from essa.compare import jobs
from essa.compare.fairness import check_same_prompts, check_same_start, start_adapter
from essa.compare.report import write_outputs
from essa.compare.results import (
    RESULT,
    CompareSummary,
    EssaResult,
    GrpoResult,
    GrpoTraining,
    Record,
    SftArmResult,
    SftArmTraining,
    SftResult,
    load_result,
)
from essa.compare.summary import summarize
from essa.config import Config, config_from_mapping, dotted, load_config
from essa.console import say
from essa.errors import EssaError
from essa.io import atomic_write_json, ensure_writable_dir
from essa.schedule import STREAM_STEPS, prompt_stream, rechunk
from essa.svd_space import SvdLoraSpace

COMPARE_CONFIG = "compare.yaml"
# A finished training job's result (SFT, a GRPO or continued-SFT run before its snapshots are scored),
# kept for --resume.
JOB_RESULT = "job.json"
SFT_ARM_DIR = "sft_arm"  # the continued SFT's run dir (compare.sft_arm)
T = TypeVar("T")
R = TypeVar("R", bound=Record)


# -- settings --------------------------------------------------------------------------------------
def compare_defaults() -> Config:
    """The comparison's settings: the packaged compare.yaml over the library defaults."""
    return config_from_mapping(yaml.safe_load(resources.files("essa").joinpath("configs", COMPARE_CONFIG).read_text()))


def load_compare_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Packaged compare.yaml <- YAML file <- key=value overrides (all sections, compare: and grpo: included)."""
    return load_config(path, overrides, base=compare_defaults())


# -- the whole comparison -------------------------------------------------------------------------
def run_compare(cfg: Config, progress: bool = True, resume: bool = False) -> CompareSummary:
    """SFT (or cfg.adapter) -> ESSA, GRPO once per learning rate and (compare.sft_arm) the SFT
    continued, from the same start -> plots, tables, paired statistics and report in output_dir.

    With `resume`, an interrupted comparison in output_dir continues with the same settings: every
    finished job (SFT, ESSA, each GRPO run's and the continued SFT's training and scoring) is kept,
    an unfinished one is started over (a method's clock cannot be resumed fairly)."""
    compare_cfg = cfg.compare
    root = Path(cfg.output_dir)
    task, given = _prepare(cfg, root, resume)
    stages = 4 if compare_cfg.sft_arm else 3
    if given is not None:
        sft = SftResult(adapter=given, wall_clock_s=None, peak_rss_mb=None)
    else:
        _say(f"1/{stages} LoRA SFT warm start")
        sft = _job_once(root / "sft", compare_cfg.isolate, SftResult, jobs.sft_job,
                        cfg=cfg.with_changes(output_dir=str(root / "sft")), progress=progress)
    start = start_adapter(Path(sft.adapter), cfg, root)

    n_train = len(task.checked_split("train"))
    stream = prompt_stream(cfg.essa, n_train, compare_cfg.max_steps or STREAM_STEPS)
    _say(f"2/{stages} ESSA for {compare_cfg.budget_s:.0f} s")
    essa = _finished_run(root / "essa")
    if essa is None:
        essa = run_job(compare_cfg.isolate, jobs.essa_job, cfg=cfg, start_adapter=str(start),
                       run_dir=str(_fresh_dir(root / "essa")), progress=progress)
    grpo_runs = _run_grpo_sweep(cfg, start, root, rechunk(stream, cfg.grpo_prompts_per_step), progress, stages)
    sft_arm = _run_sft_arm(cfg, start, root, progress) if compare_cfg.sft_arm else None
    check_same_start(essa, *grpo_runs, *([sft_arm] if sft_arm is not None else []))
    for grpo in grpo_runs:
        check_same_prompts(cfg.essa, n_train, cfg.grpo_prompts_per_step, essa, grpo)
    summary = summarize(cfg, sft, essa, grpo_runs, len(task.checked_split("test")), baseline=_baseline_name(cfg),
                        sft_arm=sft_arm)
    write_outputs(root, summary, essa, grpo_runs, sft_arm)
    return summary


def _prepare(cfg: Config, root: Path, resume: bool) -> tuple[Any, str | None]:
    """Everything checked that would fail later, then output_dir begun: (the task, the start
    adapter given as cfg.adapter or None)."""
    from essa.commands import resolve_adapter_dir
    from essa.tasks import get_task

    if resume:
        check_resumable(root, cfg)
    elif any((root / name).exists() for name in ("sft", "essa", "grpo", SFT_ARM_DIR, "summary.json")):
        raise EssaError(f"{root} already holds a comparison; pass --resume to continue it, or choose another "
                        "output_dir")
    task = get_task(cfg.task)
    for split in ("train", "validation", "test") + (() if cfg.adapter else ("sft",)):
        task.checked_split(split)
    if cfg.compare.sft_arm:
        check_sft_targets(task)
    given = None if cfg.adapter is None else str(resolve_adapter_dir(cfg.adapter))
    _check_before_writing(cfg, given)
    ensure_writable_dir(root)
    cfg.save(root / "config.yaml")
    return task, given


def check_sft_targets(task: Any) -> None:
    """The continued SFT trains on the task's sft split: every example there needs a target."""
    try:
        for example in task.checked_split("sft"):
            task.sft_target(example)
    except EssaError as exc:
        raise EssaError(f"compare.sft_arm: true continues SFT on the task's sft split, which needs a target "
                        f"completion for each example: {exc}. Set compare.sft_arm: false for this task") from exc


# -- resuming ---------------------------------------------------------------------------------------
def check_resumable(root: Path, cfg: Config) -> None:
    """`root` holds a comparison begun with exactly the settings of `cfg`."""
    saved_path = root / "config.yaml"
    if not saved_path.is_file():
        raise EssaError(f"nothing to resume: {root} holds no comparison (no config.yaml)")
    saved = dotted(_with_new_settings(yaml.safe_load(saved_path.read_text()) or {}, _as_saved(compare_defaults())))
    now = dotted(_as_saved(cfg))
    changed = [f"{k} (was {saved.get(k)!r}, now {now.get(k)!r})" for k in sorted(set(saved) | set(now))
               if saved.get(k) != now.get(k)]
    if changed:
        raise EssaError(f"{root} was begun with other settings; resume it with the same ones, or choose another "
                        "output_dir. Changed: " + "; ".join(changed))


def _as_saved(cfg: Config) -> dict[str, Any]:
    """`cfg` as its config.yaml reads back."""
    return yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _with_new_settings(saved: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """`saved` (a comparison's config.yaml) with every setting added since it began (e.g.
    compare.sft_arm) at its default: what that comparison ran with."""
    out = dict(saved)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):  # a section: its fields, not their values
            out[key] = {**value, **out[key]}
    return out


def _job_once(job_dir: Path, isolate: bool, record: type[R], fn: Callable[..., R], **kwargs: Any) -> R:
    """`fn`'s result (a `record`), saved in `job_dir` when it finishes; a resumed run reads it back
    instead of running `fn` again (and starts `job_dir` over when `fn` had not finished)."""
    path = job_dir / JOB_RESULT
    if path.is_file():
        _say(f"   kept from the interrupted run: {job_dir}")
        return record.from_json(json.loads(path.read_text()))
    _fresh_dir(job_dir)
    result = run_job(isolate, fn, **kwargs)
    atomic_write_json(path, result.to_json())
    return result


def _finished_run(run_dir: Path) -> EssaResult | GrpoResult | SftArmResult | None:
    """A method run that wrote its result (with its per-example scores), or None."""
    if not (run_dir / RESULT).is_file():
        return None
    _say(f"   kept from the interrupted run: {run_dir}")
    return load_result(run_dir)


def _fresh_dir(run_dir: Path) -> Path:
    """`run_dir` emptied of what an interrupted job left (nothing there is reusable)."""
    if run_dir.exists():
        _say(f"   started over: {run_dir} (interrupted)")
        shutil.rmtree(run_dir)
    return run_dir


def _run_grpo_sweep(cfg: Config, start: Path, root: Path, schedule: list[list[int]],
                    progress: bool, stages: int = 3) -> list[GrpoResult]:
    """GRPO once per learning rate (grpo.lr_sweep, or grpo.lr alone), each in its own process and
    run dir, all from the same start adapter and the same prompt schedule."""
    rates = cfg.grpo.learning_rates
    runs = []
    for k, lr in enumerate(rates, 1):
        _say(f"3/{stages} {_baseline_name(cfg)} lr={lr:g} ({k} of {len(rates)}) for {cfg.compare.budget_s:.0f} s")
        member = cfg.with_changes(grpo=dataclasses.replace(cfg.grpo, lr=lr, lr_sweep=[]))
        run_dir = grpo_run_dir(root, lr)
        done = _finished_run(run_dir)
        if done is not None:
            runs.append(done)
            continue
        trained = _job_once(run_dir, cfg.compare.isolate, GrpoTraining, jobs.grpo_job, cfg=member,
                            start_adapter=str(start), run_dir=str(run_dir), schedule=schedule, progress=progress)
        runs.append(run_job(cfg.compare.isolate, jobs.grpo_scoring_job, cfg=member, run_dir=str(run_dir),
                             trained=trained))
    return runs


def _run_sft_arm(cfg: Config, start: Path, root: Path, progress: bool) -> SftArmResult:
    """The start adapter's SFT continued for the budget (training, then scoring in a fresh process)."""
    _say(f"4/4 continued SFT (lr={cfg.sft.lr:g}) for {cfg.compare.budget_s:.0f} s")
    run_dir = root / SFT_ARM_DIR
    done = _finished_run(run_dir)
    if done is not None:
        return done
    trained = _job_once(run_dir, cfg.compare.isolate, SftArmTraining, jobs.sft_arm_job, cfg=cfg,
                        start_adapter=str(start), run_dir=str(run_dir), progress=progress)
    return run_job(cfg.compare.isolate, jobs.sft_arm_scoring_job, cfg=cfg, run_dir=str(run_dir), trained=trained)


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


# -- one job per process ---------------------------------------------------------------------------
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


def run_job(isolate: bool, fn: Callable[..., T], **kwargs: Any) -> T:
    """`fn(**kwargs)`: in a fresh 'spawn' process with `isolate`, so its peak RSS is its own."""
    if not isolate:
        return fn(**kwargs)
    with _env_for_children(JOB_MALLOC_ENV), \
            ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(fn, **kwargs).result()
        except BrokenProcessPool as exc:
            raise EssaError(f"the {fn.__name__.strip('_').removesuffix('_job')} process died: out of memory, or "
                            "a script calling run_compare lacks the `if __name__ == '__main__':` guard") from exc


def _say(message: str) -> None:
    say(message, prefix="essa compare")
