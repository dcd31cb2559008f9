"""What each CLI command does, as plain functions of a resolved `Config` (the Python API).

    run_sft(cfg)          LoRA SFT warm start         -> output_dir/adapter
    run_train(cfg)        ESSA search from cfg.adapter -> output_dir/{metrics.jsonl, adapter, ...}
    run_eval(cfg, ...)    accuracy of model (+ adapter) on a task split
    run_export(...)       a run's adapter as a PEFT dir, or merged full weights (with a model card)
    run_demo(cfg)         all of the above on the bundled model

`run_sft`, `run_train` and `run_eval` take the task from `cfg.task`, or a `Task` object given as
`task=` (as `essa.ESSATrainer` does with a dataset and reward functions).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from essa import degeneration
from essa.backends import backend_class, build_backend, evaluation_kind, load_inputs
from essa.config import Config
from essa.console import say
from essa.errors import EssaError
from essa.evaluate import SplitResult, evaluate_split
from essa.io import atomic_directory, atomic_write_json, atomic_write_jsonl, ensure_writable_dir
from essa.models import cast_for_inference, load_model, portable_model_name, resolve_dtype
from essa.report import plot_training, write_report
from essa.stats import PairedComparison, compare_paired
from essa.suite import guard_sets, transfer_check
from essa.svd_space import ADAPTER_CONFIG, SvdLoraSpace
from essa.tasks import Task, get_task

log = logging.getLogger("essa")
PLOT = "reward_vs_wallclock.png"
MEAN_ADAPTER = "final_mean"  # the search's final mean as a PEFT adapter, whatever the final choice
TRANSFER_HEADING = ("Transfer check: the start and the final adapter (the search's final mean where the final "
                    "choice kept the start) on real benchmarks (suite.sets)")


def resolve_adapter_dir(path: str | Path | None) -> Path:
    """Accept an adapter dir itself, or a run/SFT dir holding `adapter/`."""
    if path is None:
        raise EssaError("no adapter given: set adapter=PATH (the output of `essa sft`)")
    path = Path(path)
    for candidate in (path, path / "adapter"):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    raise EssaError(f"no PEFT adapter found at {path} (expected {ADAPTER_CONFIG} there or in {path}/adapter)")


def _prepare_run_dir(cfg: Config) -> Path:
    run_dir = ensure_writable_dir(cfg.output_dir)
    cfg.save(run_dir / "config.yaml")
    _log_to_file(run_dir / "run.log")
    return run_dir


def _log_to_file(path: Path) -> None:
    root = logging.getLogger("essa")
    if any(isinstance(h, logging.FileHandler) and h.baseFilename == str(path.resolve()) for h in root.handlers):
        return
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


# -- sft -----------------------------------------------------------------------------------------
def run_sft(cfg: Config, progress: bool = True, model_and_tokenizer: tuple[Any, Any] | None = None,
            task: Task | None = None, resume: bool = False) -> Path:
    from essa.sft import check_targets, run_sft as train_lora

    task = task or get_task(cfg.task)
    task.checked_split("sft")
    if cfg.sft.patience:
        task.checked_split("validation")  # early stopping's loss is checked there
    model, tokenizer = model_and_tokenizer or load_model(cfg.model, training=True)
    check_targets(model, cfg.lora.targets)
    run_dir = _prepare_run_dir(cfg)  # only after every check
    result = train_lora(model, tokenizer, task, cfg.lora, cfg.sft, run_dir / "adapter", progress=progress,
                        resume=resume, settings={"model": cfg.model.name, "task": dataclasses.asdict(cfg.task)})
    log.info("SFT done: %d steps, final loss %.4f, %.1f min", result.steps, result.final_loss,
             result.wall_clock_s / 60)
    return Path(result.adapter_dir)


# -- train ---------------------------------------------------------------------------------------
def run_train(cfg: Config, resume: bool = False, progress: bool = True,
              model_and_tokenizer: tuple[Any, Any] | None = None, task: Task | None = None) -> dict[str, Any]:
    from essa.model_card import read_run, write_card
    from essa.tracking import RunTracking, check_trackers
    from essa.trainer import EssaTrainer, refuse_to_overwrite

    adapter_dir = resolve_adapter_dir(cfg.adapter)
    task = task or get_task(cfg.task)
    task.checked_split("train")
    task.checked_split("validation")
    refuse_to_overwrite(cfg.output_dir, resume)
    check_trackers(cfg)
    guards = guard_sets(cfg)
    # Every check (backend, model, adapter fit) happens here, before the run dir is written.
    inputs = load_inputs(cfg, adapter_dir, cfg.essa.alpha, loaded=model_and_tokenizer)
    space = inputs.space
    run_dir = _prepare_run_dir(cfg)
    say(space.describe())
    tracking = RunTracking(cfg, run_dir, task)
    try:
        backend = build_backend(cfg, inputs)
        try:
            result = EssaTrainer(backend, inputs.tokenizer, tracking.task, cfg.essa, run_dir, progress=progress,
                                 on_generation=tracking.on_generation, guards=guards).run(resume=resume)
        finally:
            backend.close()
        tracking.finish({"validation_accuracy": result.validation, "reward_failures": result.state.reward_failures,
                         "wall_clock_s": result.state.elapsed_s}, step=result.state.generation)
    finally:
        tracking.close()
    space.save_adapter(result.final_z, run_dir / "adapter")
    space.save_adapter(result.mean_z, run_dir / MEAN_ADAPTER)
    np.save(run_dir / "final_offsets.npy", result.final_z)
    plot_training(result.state.history, run_dir / PLOT, title=f"ESSA on {task.name}")
    summary = {
        "task": task.name, "search_dim": space.dim, "generations": result.state.generation,
        "wall_clock_s": round(result.state.elapsed_s, 2), "sigma0": result.state.sigma0,
        "final_choice": result.final_choice, "validation_accuracy": result.validation,
        "validation_versus_start": result.versus_start, "reward_failures": result.state.reward_failures,
    }
    notes = [f"Adapter: `{run_dir / 'adapter'}` (standard PEFT LoRA); the search's final mean, chosen or "
             f"not: `{run_dir / MEAN_ADAPTER}`",
             "Per-generation numbers: `metrics.jsonl` (fitness, sigma, distinct fitness values, "
             "split-half rank agreement, validation accuracy).",
             "The final adapter is the start (the SFT adapter) unless a challenger beats it with "
             "confidence on validation prompts the search never read: the rule and the counts are in "
             "`final.json`."]
    sections = []
    if cfg.suite.sets:
        say("transfer check: the start and the final adapter on real benchmarks")
        final, kept_start = _transfer_final(run_dir, result.final_choice)
        check = transfer_check(cfg, adapter_dir, final, run_dir / "transfer", loaded=inputs.weights(),
                               progress=progress, kept_start=kept_start)
        summary["transfer"], summary["transfer_verdict"] = check.headline, check.verdict
        sections.append((TRANSFER_HEADING, check.report_text))
        say(check.verdict)
    write_report(run_dir / "report.md", f"ESSA run: {task.name}", summary, plot=PLOT, notes=notes,
                 sections=sections)
    atomic_write_json(run_dir / "summary.json", summary)
    write_card(run_dir / "adapter", read_run(run_dir))
    return summary


def _transfer_final(run_dir: Path, final_choice: str) -> tuple[Path, bool]:
    """What the transfer check scores against the start: the final adapter, or the search's final
    mean where the final choice kept the start (and whether it did)."""
    kept_start = final_choice == "start"
    return run_dir / (MEAN_ADAPTER if kept_start else "adapter"), kept_start


# -- eval ----------------------------------------------------------------------------------------
def run_eval(cfg: Config, split: str = "test", samples: int = 1, limit: int | None = None,
             records_path: str | Path | None = None, use_adapter: bool = True,
             model_and_tokenizer: tuple[Any, Any] | None = None, progress: bool = False,
             task: Task | None = None) -> dict[str, Any]:
    """Metrics of the model (+ cfg.adapter) on a task split, as one flat dict."""
    _check_samples(cfg, samples)
    task = task or get_task(cfg.task)
    examples = task.checked_split(split)[:limit]
    adapter = cfg.adapter if use_adapter else None
    result = score_adapter(cfg, task, examples, adapter, samples=samples, loaded=model_and_tokenizer,
                           progress=progress)
    if records_path is not None:
        path = Path(records_path)
        ensure_writable_dir(path.parent)
        atomic_write_jsonl(path, result.records)
    return {"task": task.name, "split": split, "model": cfg.model.name, "adapter": adapter, **result.metrics}


def run_eval_paired(cfg: Config, baseline: str | None, split: str = "test", limit: int | None = None,
                    model_and_tokenizer: tuple[Any, Any] | None = None, progress: bool = False) -> dict[str, Any]:
    """cfg.adapter against `baseline` (another adapter, or None for the base model) on the same
    examples: both metrics, and the paired delta with its bootstrap 95% CI and McNemar p-value."""
    task = get_task(cfg.task)
    examples = task.checked_split(split)[:limit]
    if model_and_tokenizer is None:
        model_and_tokenizer = load_inputs(cfg, None, 1.0, kind=evaluation_kind(cfg)).weights()
    results = {name: score_adapter(cfg, task, examples, adapter, loaded=model_and_tokenizer, progress=progress)
               for name, adapter in (("baseline", baseline), ("candidate", cfg.adapter))}
    paired = compare_paired(results["baseline"].correct, results["candidate"].correct, seed=cfg.essa.seed)
    return {"task": task.name, "split": split, "model": cfg.model.name, "examples": len(examples),
            "baseline": {"adapter": baseline, **results["baseline"].metrics},
            "candidate": {"adapter": cfg.adapter, **results["candidate"].metrics},
            **paired_fields(paired), "verdict": paired.describe("baseline", "candidate")}


def paired_fields(paired: PairedComparison) -> dict[str, Any]:
    """The keys a summary reports for a paired comparison."""
    return {"delta": paired.delta, "delta_ci95": list(paired.ci95), "mcnemar_p": paired.mcnemar_p,
            "gained": paired.gained, "lost": paired.lost}


def score_adapter(cfg: Config, task: Any, examples: list[Any], adapter: str | Path | None, samples: int = 1,
                  loaded: tuple[Any, Any] | None = None, progress: bool = False) -> SplitResult:
    """Scores of the model with `adapter` (None: the plain model) on `examples`."""
    adapter_dir = resolve_adapter_dir(adapter) if adapter is not None else None
    kind = evaluation_kind(cfg)  # a training pool (Ray) evaluates here, on its workers' engine
    inputs = load_inputs(cfg, adapter_dir, 1.0, kind=kind, loaded=loaded)
    backend = build_backend(cfg, inputs, kind=kind, progress=progress)
    try:
        return evaluate_split(backend, inputs.tokenizer, task, examples, samples=samples, seed=cfg.essa.seed)
    finally:
        backend.close()


def _check_samples(cfg: Config, samples: int) -> None:
    if samples < 1:
        raise EssaError(f"--samples must be >= 1 (got {samples})")
    if samples > 1 and cfg.decoding.temperature <= 0:
        raise EssaError("avg@k / pass@k need sampling: set decoding.temperature > 0 with --samples > 1")


# -- export --------------------------------------------------------------------------------------
def run_export(run_dir: str | Path, out: str | Path, merge: bool = False, model_name: str | None = None,
               push_to_hub: str | None = None, private: bool = False,
               evaluation: dict[str, Any] | None = None) -> Path:
    """The run's adapter (or the base model with it merged) in `out`, with a model card; with
    `push_to_hub`, uploaded to that hub repo too. `evaluation` adds metrics to the card."""
    from essa.model_card import CARD_FILES, check_repo_id, push_to_hub as upload, read_run, write_card

    adapter_dir = resolve_adapter_dir(run_dir)
    if push_to_hub is not None:
        check_repo_id(push_to_hub)
    out = Path(out)
    ensure_writable_dir(out.parent if out.parent != Path("") else Path("."))
    record = read_run(adapter_dir.parent) or read_run(run_dir)
    if not merge:
        with atomic_directory(out) as tmp:
            for item in adapter_dir.iterdir():
                if item.is_file() and item.name not in CARD_FILES:  # the card is written anew
                    shutil.copy2(item, tmp / item.name)
            _name_base_model(tmp, model_name or _run_model_name(Path(run_dir), required=False))
            write_card(tmp, record, repo_id=push_to_hub, evaluation=evaluation, base_model=model_name)
    else:
        name = model_name or _run_model_name(Path(run_dir))
        _export_merged(adapter_dir, out, name, lambda tmp: write_card(tmp, record, merged=True, repo_id=push_to_hub,
                                                                      evaluation=evaluation, base_model=name))
    if push_to_hub is not None:
        say(f"uploaded to {upload(out, push_to_hub, private=private)}")
    return out


def _run_model_name(run_dir: Path, required: bool = True) -> str | None:
    import yaml

    for cfg_path in (run_dir / "config.yaml", run_dir.parent / "config.yaml"):
        if cfg_path.is_file():
            return yaml.safe_load(cfg_path.read_text())["model"]["name"]
    if not required:
        return None
    raise EssaError(f"cannot tell the base model of {run_dir}: pass --model NAME")


def _name_base_model(adapter_dir: Path, model_name: str | None) -> None:
    """Point the exported adapter_config.json at the base model by a name other machines resolve
    (adapters from older runs name this machine's cache path)."""
    if model_name is None:
        return
    path = adapter_dir / ADAPTER_CONFIG
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = portable_model_name(model_name)
    path.write_text(json.dumps(config, indent=2) + "\n")


def _export_merged(adapter_dir: Path, out: Path, model_name: str, add_card: Any) -> Path:
    import peft

    from essa.config import ModelConfig

    model, tokenizer = load_model(ModelConfig(name=model_name))
    SvdLoraSpace.from_adapter(adapter_dir, 1.0, model=model)  # clear error if it doesn't fit
    merged = peft.PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    with atomic_directory(out) as tmp:
        merged.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        add_card(tmp)
    return out


# -- demo ----------------------------------------------------------------------------------------
def run_demo(cfg: Config, progress: bool = True, resume: bool = False) -> dict[str, Any]:
    """SFT -> ESSA -> held-out test accuracy before and after, on one loaded model.

    With `resume`, a finished SFT adapter is reused and the ESSA search continues from its checkpoint.
    """
    start = time.perf_counter()
    if not resume and any((Path(cfg.output_dir) / name).exists() for name in ("sft", "essa", "summary.json")):
        raise EssaError(f"{cfg.output_dir} already holds a demo run; pass --resume to continue it, "
                        "or output_dir=NEW_DIR for a fresh one")
    from essa.sft import check_targets, is_finished

    task = get_task(cfg.task)
    for split in ("sft", "train", "validation", "test"):
        task.checked_split(split)
    for kind in (cfg.backend.kind, evaluation_kind(cfg)):
        backend_class(kind).check(cfg)
    model_and_tokenizer = load_model(cfg.model, training=True)
    check_targets(model_and_tokenizer[0], cfg.lora.targets)
    root = _prepare_run_dir(cfg)  # only after every check

    sft_cfg = cfg.with_changes(output_dir=str(root / "sft"))
    stages = 5 if cfg.suite.sets else 4
    say(f"1/{stages} LoRA SFT warm start")
    t0 = time.perf_counter()
    adapter = root / "sft" / "adapter"
    if not (resume and is_finished(adapter)):
        adapter = run_sft(sft_cfg, progress=progress, model_and_tokenizer=model_and_tokenizer, resume=resume)
    sft_s = time.perf_counter() - t0
    cast_for_inference(model_and_tokenizer[0], cfg.model)  # trained in fp32; "auto" infers faster

    say(f"2/{stages} test accuracy of the SFT adapter")
    test = task.checked_split("test")
    before = score_adapter(cfg, task, test, adapter, loaded=model_and_tokenizer, progress=progress)

    say(f"3/{stages} ESSA search")
    # The demo runs the transfer check itself, after the test scores (not a second time inside train).
    train_cfg = cfg.with_changes(adapter=str(adapter), output_dir=str(root / "essa"),
                                 suite=dataclasses.replace(cfg.suite, sets=[]))
    train = run_train(train_cfg, resume=resume, progress=progress, model_and_tokenizer=model_and_tokenizer)

    say(f"4/{stages} test accuracy of the ESSA adapter")
    after = score_adapter(cfg, task, test, root / "essa" / "adapter", loaded=model_and_tokenizer, progress=progress)
    shutil.copy2(root / "essa" / PLOT, root / PLOT)
    paired = compare_paired(before.correct, after.correct, seed=cfg.essa.seed)
    figures = {label: _degeneration(result, model_and_tokenizer[1], cfg, task)
               for label, result in (("sft", before), ("essa", after))}
    degenerated = degeneration.side_by_side(figures["sft"], figures["essa"], ("SFT", "ESSA"))
    summary = {
        "model": cfg.model.name, "task": task.name, "dtype": resolve_dtype(cfg.model.dtype),
        "test_examples": len(test), "test_accuracy_sft": before.metrics["accuracy"],
        "test_accuracy_essa": after.metrics["accuracy"], "test_accuracy_delta": paired.delta,
        "delta_ci95": list(paired.ci95), "mcnemar_p": paired.mcnemar_p, "test_gained": paired.gained,
        "test_lost": paired.lost, "generations": train["generations"], "search_dim": train["search_dim"],
        "popsize": cfg.essa.popsize, "prompts_per_generation": cfg.essa.prompts_per_generation,
        "sigma0": train["sigma0"], "final_choice": train["final_choice"],
        "validation_accuracy": train["validation_accuracy"], "test_metrics_sft": _split_metrics(before.metrics),
        "test_metrics_essa": _split_metrics(after.metrics), "test_degeneration": figures,
        "sft_wall_clock_s": round(sft_s, 1),
        **sft_summary(adapter),
        "essa_wall_clock_s": train["wall_clock_s"], "wall_clock_s": round(time.perf_counter() - start, 1),
    }
    sections = []
    if cfg.suite.sets:
        say(f"5/{stages} transfer check: the SFT and the ESSA adapter on real benchmarks")
        final, kept_start = _transfer_final(root / "essa", train["final_choice"])
        check = transfer_check(cfg, adapter, final, root / "transfer", loaded=model_and_tokenizer,
                               progress=progress, kept_start=kept_start)
        summary["transfer"], summary["transfer_verdict"] = check.headline, check.verdict
        sections.append((TRANSFER_HEADING, check.report_text))
        say(check.table)
    say(f"result: {len(test)} held-out {task.name} problems, " + paired.describe("SFT", "ESSA"))
    say(f"{degenerated} (the same test problems)")
    if cfg.suite.sets:
        say(summary["transfer_verdict"])
    summary["wall_clock_s"] = round(time.perf_counter() - start, 1)
    atomic_write_json(root / "summary.json", summary)
    run_export(root / "essa", root / "adapter")  # after the summary: its model card shows the test results
    write_report(root / "report.md", "ESSA demo", summary, plot=PLOT, sections=sections, notes=[
        f"Held-out test accuracy on {len(test)} problems never used for training or selection (no underlying "
        f"problem shared with the SFT, train or validation splits; `{task.name}` task): "
        + paired.describe("SFT", "ESSA") + ".",
        f"On the same problems, {degenerated} (`test_degeneration`).",
        "The final adapter was selected on the validation split only; the SFT adapter itself was a candidate "
        f"and is kept unless beaten there with confidence (final choice: {train['final_choice']}).",
        f"Exported PEFT adapter: `{root / 'adapter'}`.",
    ])
    return summary


def _degeneration(result: SplitResult, tokenizer: Any, cfg: Config, task: Task) -> dict[str, float]:
    """The degeneration figures of a split's first completions (`degeneration.summarize`)."""
    return degeneration.summarize(degeneration.per_completion(
        result.completions, tokenizer, cfg.decoding.max_new_tokens, degeneration.asks_for_box(task.system_prompt),
        result.token_counts))


def sft_summary(adapter_dir: Path) -> dict[str, Any]:
    """The SFT's steps and, with early stopping, its best step and whether it stopped early."""
    from essa.sft import METRICS_FILE

    path = Path(adapter_dir) / METRICS_FILE
    if not path.is_file():
        return {}
    metrics = json.loads(path.read_text())
    out = {"sft_steps": metrics.get("steps")}
    if "best_step" in metrics:
        out.update(sft_best_step=metrics["best_step"], sft_stopped_early=metrics["stopped_early"],
                   sft_best_validation_loss=metrics["best_validation_loss"])
    return out


def _split_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The numeric metrics of one `run_eval` result (accuracy, mean reward, task extras)."""
    skip = {"task", "split", "model", "adapter", "examples"}
    return {k: v for k, v in metrics.items() if k not in skip}


