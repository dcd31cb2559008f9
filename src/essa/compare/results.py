"""The typed records of `essa compare` and the JSON files that hold them.

A method's run: `EssaResult` / `GrpoResult` / `SftArmResult` (its run dir's result.json, with the
per-example scores in scores.npz), `GrpoTraining` / `SftArmTraining` (a run trained but not yet
scored: job.json, kept for --resume) and `SftResult` (the warm start: sft/job.json). The
comparison: `CompareSummary` (summary.json; comparison.json is part of it). The jobs build these,
the summary reads the results, the report and plots read the summary.

`to_json` writes exactly the JSON these files have always held and `from_json` reads it back, so
a comparison begun before a change still resumes. A field added later is `optional()`: absent
from older files, and left out of the JSON while it is None, so those files still round-trip.
Adding a metric is a field here, the line that computes it (summary.py) and, to show it, a row of
the report (report.py).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np

from essa.io import atomic_write_json, atomic_write_state, read_state
from essa.schedule import Snapshot
from essa.stats import PairedComparison

RESULT = "result.json"
# Per-example 0/1 correctness of every snapshot, beside result.json: one (snapshots, examples)
# array per split, rows in the order of result.json's "points".
SCORES = "scores.npz"
SPLITS = ("validation", "test")
S = TypeVar("S", bound="MethodResult")


def optional() -> Any:
    """A record field added after files were written without it: None when absent, omitted while None."""
    return field(default=None, metadata={"optional": True})


def _omitted(f: dataclasses.Field[Any], value: Any) -> bool:
    return f.metadata.get("optional", False) and value is None


class Record:
    """A dataclass kept as a JSON object, one key per field. A subclass whose fields hold records
    decodes them in `_decoded`."""

    def to_json(self) -> dict[str, Any]:
        values = ((f, getattr(self, f.name)) for f in dataclasses.fields(self))
        return {f.name: _plain(v) for f, v in values if not _omitted(f, v)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Any:
        decoded = cls._decoded(data)
        plain = {f.name: data[f.name] for f in dataclasses.fields(cls)
                 if f.name not in decoded and (f.name in data or not f.metadata.get("optional", False))}
        return cls(**plain, **decoded)

    @classmethod
    def _decoded(cls, data: dict[str, Any]) -> dict[str, Any]:
        """The fields of `data` that are records, decoded; the others are taken as they are."""
        return {}


def _plain(value: Any) -> Any:
    """`value` as JSON data: records through their `to_json`, other dataclasses field by field."""
    if isinstance(value, Record):
        return value.to_json()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# -- a method's run -------------------------------------------------------------------------------
@dataclass
class Point(Record):
    """One snapshot of a method's model: when it was taken (training clock) and its greedy accuracy."""

    time_s: float
    step: int
    val_accuracy: float
    test_accuracy: float


@dataclass
class TrainerChoice(Record):
    """ESSA's own final adapter (the trainer's validation-picked candidate) and its test accuracy."""

    choice: str
    val_accuracy: float
    test_accuracy: float


@dataclass(kw_only=True)
class MethodRun(Record):
    """What a method's training did, as both methods report it."""

    method: ClassVar[str]  # result.json's "method"
    steps: int  # ESSA generations, GRPO optimizer steps
    wall_clock_s: float  # training clock when it stopped
    stopped_by: str  # "budget", "max_steps" or (GRPO) "prompt stream end"
    # The training log, one row per step: step, wall_clock_s and, where the step scored rewards, reward_mean.
    curve: list[dict[str, Any]]
    prompts_used: list[list[int]]  # the train-split indices each step read, in order
    start_adapter: str  # the start tensors, as the method itself saved them
    peak_rss_mb: float | None  # its own process's; None when it ran in the caller's (compare.isolate: false)
    reward_failures: int

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, **super().to_json()}

    def reward_curve(self) -> tuple[list[float], list[float]]:
        """(wall-clock s, mean training reward) of every step that scored rewards."""
        rows = [r for r in self.curve if r.get("reward_mean") is not None]
        return [r["wall_clock_s"] for r in rows], [r["reward_mean"] for r in rows]


@dataclass(kw_only=True)
class MethodResult(MethodRun):
    """A method's run with every snapshot scored by the one evaluator: result.json + scores.npz."""

    points: list[Point]  # the snapshots in time order, the start first
    # Per split, the (snapshots, examples) 0/1 array, rows in the order of `points` (scores.npz, not
    # result.json). Arrays have no plain ==, so records compare without them.
    correct: dict[str, np.ndarray] = field(compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        del out["correct"]
        return {**out, "scores": SCORES}

    @classmethod
    def _decoded(cls, data: dict[str, Any]) -> dict[str, Any]:
        return {**super()._decoded(data), "points": [Point.from_json(p) for p in data["points"]]}

    def test_accuracy_curve(self) -> tuple[list[float], list[float]]:
        """(snapshot time s, test accuracy) of every snapshot."""
        return [p.time_s for p in self.points], [p.test_accuracy for p in self.points]


@dataclass(kw_only=True)
class EssaResult(MethodResult):
    method: ClassVar[str] = "essa"
    validation_s_off_clock: float  # the trainer's validation passes, kept off its search clock
    trainer_choice: TrainerChoice
    search_dim: int
    sigma0: float  # the step size it searched with (essa.sigma0, or the probe's for auto)

    @classmethod
    def _decoded(cls, data: dict[str, Any]) -> dict[str, Any]:
        return {**super()._decoded(data), "trainer_choice": TrainerChoice.from_json(data["trainer_choice"])}


@dataclass(kw_only=True)
class GradientResult(MethodResult):
    """A gradient-trained arm's result: its learning rate and the settings it trained with."""

    lr: float
    settings: dict[str, Any]  # the grpo: (GRPO) or sft: (continued SFT) section it trained with


class GrpoResult(GradientResult):
    method: ClassVar[str] = "grpo"


class SftArmResult(GradientResult):
    """The continued-SFT arm (compare.sft_arm): the start adapter trained further on the sft split.
    Its prompts_used are sft-split indices; it has no training reward (its curve logs the loss);
    its lr is sft.lr, constant."""

    method: ClassVar[str] = "sft_arm"


@dataclass(kw_only=True)
class GradientTraining(MethodRun):
    """A gradient-trained arm, its snapshots not yet scored (job.json): what its scoring job reads."""

    result_type: ClassVar[type[GradientResult]]
    lr: float
    settings: dict[str, Any]
    snapshots: list[Snapshot]

    @classmethod
    def _decoded(cls, data: dict[str, Any]) -> dict[str, Any]:
        return {**super()._decoded(data), "snapshots": [Snapshot(**s) for s in data["snapshots"]]}

    def scored(self, points: list[Point], correct: dict[str, np.ndarray]) -> GradientResult:
        """The run's result once its snapshots are scored (peak_rss_mb stays training's)."""
        return _scored(self, self.result_type, points, correct)


class GrpoTraining(GradientTraining):
    method: ClassVar[str] = "grpo"
    result_type = GrpoResult


class SftArmTraining(GradientTraining):
    method: ClassVar[str] = "sft_arm"
    result_type = SftArmResult


def _scored(trained: MethodRun, result: type[S], points: list[Point], correct: dict[str, np.ndarray]) -> S:
    """`trained`'s result once its snapshots are scored (peak_rss_mb stays training's)."""
    kept = {f.name: getattr(trained, f.name) for f in dataclasses.fields(trained) if f.name != "snapshots"}
    return result(**kept, points=points, correct=correct)


@dataclass
class SftResult(Record):
    """The start adapter before any randomization: the SFT warm start's, or the one given (no times)."""

    adapter: str
    wall_clock_s: float | None
    peak_rss_mb: float | None


def write_result(run_dir: Path, result: MethodResult) -> None:
    """result.json (the numbers) and scores.npz (the per-example vectors, for paired comparisons)."""
    atomic_write_state(run_dir / SCORES, result.correct)
    atomic_write_json(run_dir / RESULT, result.to_json())


def load_result(run_dir: str | Path) -> EssaResult | GrpoResult | SftArmResult:
    """The result a method's run dir holds, its per-example scores included."""
    data = json.loads((Path(run_dir) / RESULT).read_text())
    kind = {"essa": EssaResult, "grpo": GrpoResult, "sft_arm": SftArmResult}[data["method"]]
    return kind.from_json({**data, "correct": load_scores(run_dir)})


def load_scores(run_dir: str | Path) -> dict[str, np.ndarray]:
    """The per-example correctness a method's run dir holds: {"validation": (snapshots, examples),
    "test": ...} 0/1 arrays, rows in the order of result.json's "points"."""
    return read_state(Path(run_dir) / SCORES)


# -- the comparison -------------------------------------------------------------------------------
@dataclass
class ValidationBest(Record):
    """A method's snapshot with the highest validation accuracy (ties: the earliest)."""

    time_s: float
    val_accuracy: float
    test_accuracy: float


@dataclass(kw_only=True)
class MethodSummary(Record):
    """A method's row of the comparison: accuracies from its snapshots, and how it trained."""

    start_test_accuracy: float
    final_test_accuracy: float
    final_val_accuracy: float
    final_time_s: float
    validation_best: ValidationBest
    steps: int
    wall_clock_s: float
    stopped_by: str
    peak_rss_mb: float | None
    reward_failures: int

    @classmethod
    def _decoded(cls, data: dict[str, Any]) -> dict[str, Any]:
        return {**super()._decoded(data), "validation_best": ValidationBest.from_json(data["validation_best"])}


@dataclass(kw_only=True)
class EssaSummary(MethodSummary):
    trainer_choice: TrainerChoice
    sigma0: float

    @classmethod
    def _decoded(cls, data: dict[str, Any]) -> dict[str, Any]:
        return {**super()._decoded(data), "trainer_choice": TrainerChoice.from_json(data["trainer_choice"])}


@dataclass(kw_only=True)
class GrpoSummary(MethodSummary):
    lr: float


@dataclass(kw_only=True)
class SftArmSummary(MethodSummary):
    lr: float


@dataclass(kw_only=True)
class SweepRun(GrpoSummary):
    """One GRPO learning rate's row; `selected`: the run compared with ESSA."""

    selected: bool


@dataclass
class Methods(Record):
    """ESSA's row, the row of the GRPO run compared with it and, with compare.sft_arm, the
    continued SFT's."""

    essa: EssaSummary
    grpo: GrpoSummary
    sft_arm: SftArmSummary | None = optional()

    @classmethod
    def _decoded(cls, data: dict[str, Any]) -> dict[str, Any]:
        rows = {"essa": EssaSummary.from_json(data["essa"]), "grpo": GrpoSummary.from_json(data["grpo"])}
        if data.get("sft_arm") is not None:
            rows["sft_arm"] = SftArmSummary.from_json(data["sft_arm"])
        return rows


@dataclass
class Sweep(Record):
    """Every GRPO learning rate tried, and how the one compared was chosen."""

    selection: str
    selected_lr: float
    runs: list[SweepRun]

    @classmethod
    def _decoded(cls, data: dict[str, Any]) -> dict[str, Any]:
        return {"runs": [SweepRun.from_json(r) for r in data["runs"]]}


@dataclass
class PairedTest(Record):
    """Snapshot `b` against snapshot `a` on the same test problems (delta = b - a). In JSON the
    statistics sit beside the names, with the sentence the report prints."""

    a: str
    b: str
    stats: PairedComparison

    @property
    def text(self) -> str:
        return self.stats.describe(self.a, self.b)

    def to_json(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, **self.stats.to_dict(), "text": self.text}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PairedTest:
        stats = {f.name: data[f.name] for f in dataclasses.fields(PairedComparison)}
        return cls(data["a"], data["b"], PairedComparison(**{**stats, "ci95": tuple(stats["ci95"])}))


@dataclass
class TimeToTarget(Record):
    """When each method first reached the other's final test accuracy (None: never, in the budget)."""

    essa_reaches_grpo_final_s: float | None
    grpo_final: float
    grpo_reaches_essa_final_s: float | None
    essa_final: float
    # ESSA's time to GRPO's final accuracy as a fraction of the time GRPO trained for it.
    essa_time_fraction_of_grpo: float | None


@dataclass
class Precision(Record):
    """What each method trained in, and what the one evaluator ran in."""

    essa: str
    grpo: str
    evaluation: str
    sft_arm: str | None = optional()  # with compare.sft_arm


@dataclass(kw_only=True)
class CompareSummary(Record):
    """The comparison's numbers (summary.json): ESSA against the GRPO run selected on validation."""

    model: str
    task: str
    baseline: str  # "GRPO", or "SVD-GRPO" with grpo.svd_only
    budget_s: float
    checkpoint_times_s: list[float]
    svd_vectors: str
    essa_decoding: str
    essa_sigma0: float | str  # the setting: a number, or "auto"
    precision: Precision
    test_examples: int
    sft_adapter: str
    sft_wall_clock_s: float | None
    sft_peak_rss_mb: float | None
    # run_compare writes no summary unless both hold (fairness.check_same_start, check_same_prompts).
    same_start_adapter: bool
    same_prompt_stream: bool
    methods: Methods
    grpo_sweep: Sweep
    paired_test: dict[str, PairedTest]
    time_to_target: TimeToTarget

    @classmethod
    def _decoded(cls, data: dict[str, Any]) -> dict[str, Any]:
        return {"precision": Precision.from_json(data["precision"]), "methods": Methods.from_json(data["methods"]),
                "grpo_sweep": Sweep.from_json(data["grpo_sweep"]),
                "paired_test": {k: PairedTest.from_json(v) for k, v in data["paired_test"].items()},
                "time_to_target": TimeToTarget.from_json(data["time_to_target"])}
