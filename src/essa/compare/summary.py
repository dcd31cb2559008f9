"""The numbers of `essa compare`: each method's row, the GRPO run compared (selected on validation
only), time-to-target, the precision of each method, and paired statistics on the test split
(the continued-SFT arm's too, with compare.sft_arm)."""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np

from essa.compare.results import (
    CompareSummary,
    EssaResult,
    EssaSummary,
    GrpoResult,
    GrpoSummary,
    MethodResult,
    MethodSummary,
    Methods,
    PairedTest,
    Point,
    Precision,
    SftArmResult,
    SftArmSummary,
    SftResult,
    Sweep,
    SweepRun,
    TimeToTarget,
    ValidationBest,
)
from essa.config import Config
from essa.errors import EssaError
from essa.stats import compare_paired

SELECTION_RULE = ("the highest validation accuracy of its final snapshot (ties: the first learning rate "
                  "listed); test accuracy plays no part")
Row = TypeVar("Row", bound=MethodSummary)


# -- selection and time-to-target (validation picks, test only reports) -------------------------
def validation_best(val_accuracies: list[float]) -> int:
    """Index of the highest validation accuracy; ties go to the earliest snapshot."""
    if not val_accuracies:
        raise EssaError("no snapshots to select from")
    return int(np.argmax(np.asarray(val_accuracies)))


def time_to_target(points: list[Point], target: float) -> float | None:
    """First snapshot time whose test accuracy reaches `target` (None: never within the budget)."""
    for p in sorted(points, key=lambda p: p.time_s):
        if p.test_accuracy >= target - 1e-12:
            return p.time_s
    return None


def select_grpo_run(runs: list[MethodResult]) -> int:
    """Index of the GRPO run compared with ESSA (SELECTION_RULE): the highest validation accuracy of
    its final snapshot, ties to the first listed. Test accuracy is never read."""
    return validation_best([r.points[-1].val_accuracy for r in runs])


def _best_index(res: MethodResult) -> int:
    """The method's validation-best snapshot (validation accuracy only)."""
    return validation_best([p.val_accuracy for p in res.points])


# -- the summary ----------------------------------------------------------------------------------
def summarize(cfg: Config, sft: SftResult, essa: EssaResult, grpo_runs: list[GrpoResult],
              test_examples: int, baseline: str = "GRPO", sft_arm: SftArmResult | None = None) -> CompareSummary:
    """The comparison's numbers: ESSA against the GRPO run selected on validation (`select_grpo_run`)
    and, where it ran, against the continued SFT (`sft_arm`)."""
    compare = cfg.compare
    chosen = select_grpo_run(grpo_runs)
    grpo = grpo_runs[chosen]
    methods = Methods(essa=method_summary(essa, EssaSummary, trainer_choice=essa.trainer_choice, sigma0=essa.sigma0),
                      grpo=method_summary(grpo, GrpoSummary, lr=grpo.lr),
                      sft_arm=None if sft_arm is None else method_summary(sft_arm, SftArmSummary, lr=sft_arm.lr))
    paired = paired_test(essa, grpo, baseline, seed=compare.seed)
    if sft_arm is not None:
        paired.update(sft_arm_paired_test(essa, sft_arm, seed=compare.seed))
    sweep = Sweep(selection=SELECTION_RULE, selected_lr=grpo.lr,
                  runs=[method_summary(r, SweepRun, lr=r.lr, selected=k == chosen) for k, r in enumerate(grpo_runs)])
    return CompareSummary(
        model=cfg.model.name, task=cfg.task.name, baseline=baseline, budget_s=compare.budget_s,
        checkpoint_times_s=compare.checkpoint_times(), svd_vectors=compare.svd_vectors,
        essa_decoding="greedy" if cfg.decoding.temperature <= 0 else f"T={cfg.decoding.temperature}",
        essa_sigma0=cfg.essa.sigma0, precision=_precision(cfg, sft_arm is not None), test_examples=test_examples,
        sft_adapter=sft.adapter, sft_wall_clock_s=sft.wall_clock_s, sft_peak_rss_mb=sft.peak_rss_mb,
        # run_compare stops before this summary unless both hold (check_same_start, check_same_prompts).
        same_start_adapter=True, same_prompt_stream=True,
        methods=methods, grpo_sweep=sweep, paired_test=paired,
        time_to_target=_time_to_target(methods, essa, grpo))


def method_summary(res: MethodResult, row: type[Row] = MethodSummary, **extra: Any) -> Row:  # type: ignore[assignment]
    """`res` as a row of the comparison (`row`, with the fields `extra` gives a subclass)."""
    points = res.points
    best = points[_best_index(res)]
    return row(
        start_test_accuracy=points[0].test_accuracy, final_test_accuracy=points[-1].test_accuracy,
        final_val_accuracy=points[-1].val_accuracy, final_time_s=points[-1].time_s,
        validation_best=ValidationBest(time_s=best.time_s, val_accuracy=best.val_accuracy,
                                       test_accuracy=best.test_accuracy),
        steps=res.steps, wall_clock_s=res.wall_clock_s, stopped_by=res.stopped_by,
        peak_rss_mb=None if res.peak_rss_mb is None else round(res.peak_rss_mb, 1),
        reward_failures=res.reward_failures, **extra)


def paired_test(essa: MethodResult, grpo: MethodResult, baseline: str = "GRPO",
                seed: int = 0) -> dict[str, PairedTest]:
    """Paired statistics on the test split, problem by problem: ESSA's final snapshot against the
    baseline's, and each method's final and validation-best snapshot against its own start snapshot
    (the shared start adapter through the same evaluator). Each entry: b against a, delta = b - a."""
    e, g = essa.correct["test"], grpo.correct["test"]
    e_best, g_best = e[_best_index(essa)], g[_best_index(grpo)]
    pairs = {
        "essa_final_vs_grpo_final": ((f"{baseline} final", g[-1]), ("ESSA final", e[-1])),
        "essa_final_vs_start": (("start", e[0]), ("ESSA final", e[-1])),
        "grpo_final_vs_start": (("start", g[0]), (f"{baseline} final", g[-1])),
        "essa_validation_best_vs_start": (("start", e[0]), ("ESSA validation-best", e_best)),
        "grpo_validation_best_vs_start": (("start", g[0]), (f"{baseline} validation-best", g_best)),
    }
    return {key: PairedTest(name_a, name_b, compare_paired(a, b, seed=seed))
            for key, ((name_a, a), (name_b, b)) in pairs.items()}


def sft_arm_paired_test(essa: MethodResult, sft_arm: MethodResult, seed: int = 0) -> dict[str, PairedTest]:
    """The continued SFT on the test split: its final and validation-best snapshot against its start
    snapshot, and ESSA's final snapshot against its final one (delta = ESSA - continued SFT)."""
    e, c = essa.correct["test"], sft_arm.correct["test"]
    pairs = {
        "essa_final_vs_sft_arm_final": (("continued SFT final", c[-1]), ("ESSA final", e[-1])),
        "sft_arm_final_vs_start": (("start", c[0]), ("continued SFT final", c[-1])),
        "sft_arm_validation_best_vs_start": (("start", c[0]),
                                             ("continued SFT validation-best", c[_best_index(sft_arm)])),
    }
    return {key: PairedTest(name_a, name_b, compare_paired(a, b, seed=seed))
            for key, ((name_a, a), (name_b, b)) in pairs.items()}


def _time_to_target(methods: Methods, essa: MethodResult, grpo: MethodResult) -> TimeToTarget:
    e_final, g_final = methods.essa.final_test_accuracy, methods.grpo.final_test_accuracy
    essa_s, grpo_s = time_to_target(essa.points, g_final), methods.grpo.final_time_s
    return TimeToTarget(
        essa_reaches_grpo_final_s=essa_s, grpo_final=g_final,
        grpo_reaches_essa_final_s=time_to_target(grpo.points, e_final), essa_final=e_final,
        essa_time_fraction_of_grpo=None if essa_s is None or not grpo_s else round(essa_s / grpo_s, 3))


def _precision(cfg: Config, sft_arm: bool = False) -> Precision:
    """What each method trained in, and what the one evaluator ran in."""
    from essa.grpo import precision, trains_in_bf16
    from essa.models import resolve_dtype

    inference = resolve_dtype(cfg.model.dtype)
    if cfg.model.quantize != "none":
        inference += f" with {cfg.model.quantize} base linears"
    weights = resolve_dtype(cfg.model.dtype, training=True)
    continued = f"{weights} weights, bfloat16 autocast (loss)" if trains_in_bf16(cfg) else weights
    return Precision(essa=inference, grpo=precision(cfg), evaluation=inference, sft_arm=continued if sft_arm else None)
