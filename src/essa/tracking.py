"""Experiment tracking: `tracking.report_to` sends each ESSA generation to TensorBoard, Weights &
Biases or Trackio (several at once), as TRL's `report_to` does.

A `Tracker` logs numbers against a step (the generation) and, where the tracker has tables, rows
of completion samples. `RunTracking` connects the trackers to a training run through the
trainer's `on_generation` callback: after each generation it logs every number of the records
the trainer added to its history (fitness statistics, sigma, validation accuracy, wall clock and
whatever else a record holds), so new per-generation fields reach the trackers without a change
here. Completion samples come from a `SampleRecorder`, the task itself that also keeps the
completions it scored in the last generation (with the local and vLLM backends; Ray workers
score in their own processes, so a Ray run logs no samples).

Every tracker runs offline: TensorBoard writes event files, Trackio a local database
(`TRACKIO_DIR`, default ~/.cache/huggingface/trackio), and wandb with `tracking.offline: true`
(or `WANDB_MODE=offline`) a local run directory that `wandb sync` uploads later.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import numbers
import sys
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

from essa.errors import EssaError
from essa.tasks import Example, Task

if TYPE_CHECKING:
    from essa.config import Config
    from essa.trainer import TrainState

TENSORBOARD_DIR = "tensorboard"
SAMPLE_COLUMNS = ["generation", "prompt", "completion", "reward"]


class Tracker(ABC):
    """One experiment tracker. Subclasses implement `log_scalars` (and `log_table` if the tracker
    shows tables); `close` has a default."""

    name: ClassVar[str]
    package: ClassVar[str]  # the module it needs, checked before a run writes anything
    supports_tables: ClassVar[bool] = False

    @classmethod
    def check(cls) -> None:
        """EssaError when the tracker's package is not installed."""
        if importlib.util.find_spec(cls.package) is None:
            raise EssaError(f"tracking.report_to={cls.name} needs the {cls.package} package: "
                            f"pip install 'essa[{cls.name}]'")

    @abstractmethod
    def log_scalars(self, values: dict[str, float], step: int) -> None:
        """Log named numbers at `step` (the generation)."""

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """Log rows of a table at `step`. Default: the tracker has no tables, nothing is logged."""

    def close(self) -> None:
        """Flush and close the tracker's run."""


class TensorBoardTracker(Tracker):
    """Event files under tracking.logging_dir (default OUTPUT_DIR/tensorboard); tables as Markdown text."""

    name = "tensorboard"
    package = "tensorboard"
    supports_tables = True

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(cfg.tracking.logging_dir or run_dir / TENSORBOARD_DIR)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
        lines += ["| " + " | ".join(_markdown_cell(v) for v in row) + " |" for row in rows]
        self.writer.add_text(name, "\n".join(lines), global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """A Weights & Biases run in OUTPUT_DIR/wandb; offline with tracking.offline (or WANDB_MODE=offline)."""

    name = "wandb"
    package = "wandb"
    supports_tables = True

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        import wandb

        self._wandb = wandb
        with _stdout_to_stderr():
            self.run = wandb.init(project=cfg.tracking.project, name=run_name(cfg, run_dir), dir=str(run_dir),
                                  config=cfg.to_dict(), mode="offline" if cfg.tracking.offline else None,
                                  reinit="create_new")

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        self.run.log({name: self._wandb.Table(columns=columns, data=rows)}, step=step)

    def close(self) -> None:
        with _stdout_to_stderr():
            self.run.finish()


class TrackioTracker(Tracker):
    """A Trackio run in its local database (TRACKIO_DIR); the dashboard: `trackio show`."""

    name = "trackio"
    package = "trackio"
    supports_tables = True

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        import trackio

        self._trackio = trackio
        with _stdout_to_stderr():
            self.run = trackio.init(project=cfg.tracking.project, name=run_name(cfg, run_dir), config=cfg.to_dict(),
                                    embed=False, auto_log_cpu=False, auto_log_gpu=False)

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        self.run.log({name: self._trackio.Table(columns=columns, data=rows)}, step=step)

    def close(self) -> None:
        with _stdout_to_stderr():
            # The module-level finish also forgets the current run (ours), so that trackio's exit
            # hook does not finish it a second time, printing on the CLI's stdout.
            self._trackio.finish()


# The tracker registry: `tracking.report_to` names these.
_TRACKERS: dict[str, type[Tracker]] = {
    "tensorboard": TensorBoardTracker,
    "wandb": WandbTracker,
    "trackio": TrackioTracker,
}


def register_tracker(name: str, cls: type[Tracker]) -> None:
    """Make a `Tracker` subclass available as `tracking.report_to: NAME`."""
    _TRACKERS[name] = cls


def tracker_names() -> list[str]:
    return list(_TRACKERS)


def check_trackers(cfg: Config) -> None:
    """EssaError, before anything is written, when a chosen tracker's package is missing."""
    for name in cfg.tracking.report_to:
        _TRACKERS[name].check()


def run_name(cfg: Config, run_dir: Path) -> str:
    return cfg.tracking.run_name or Path(run_dir).resolve().name


class SampleRecorder(Task):
    """`task` unchanged, also keeping what its `reward_batch` scored since the last `take()`.

    Calls on prompts in `skip` (the validation split) are not kept: the samples are rollouts of
    the generation's candidates, one call per candidate.
    """

    def __init__(self, task: Task, skip: set[str]) -> None:
        self.task = task
        self.name = task.name
        self.system_prompt = task.system_prompt
        self.skip = skip
        self.calls: list[tuple[list[Example], list[str], list[float]]] = []

    def split(self, name: str) -> list[Example]:
        return self.task.split(name)

    def reward(self, completion: str, example: Example) -> float:
        return self.task.reward(completion, example)

    def reward_batch(self, completions: list[str], examples: list[Example]) -> list[float]:
        values = self.task.reward_batch(completions, examples)
        if examples and examples[0].prompt not in self.skip:
            self.calls.append((list(examples), list(completions), [float(v) for v in values]))
        return values

    def messages(self, example: Example) -> list[dict[str, Any]]:
        return self.task.messages(example)

    def prompt_text(self, tokenizer: Any, example: Example) -> str:
        return self.task.prompt_text(tokenizer, example)

    def extra_metrics(self, completion: str, example: Example) -> dict[str, float]:
        return self.task.extra_metrics(completion, example)

    def sft_target(self, example: Example) -> str:
        return self.task.sft_target(example)

    def take(self, limit: int) -> list[tuple[Example, str, float]]:
        """Up to `limit` (example, completion, reward) rows of the best-scoring call kept, then forget all."""
        calls, self.calls = self.calls, []
        if not calls or limit <= 0:
            return []
        examples, completions, rewards = max(calls, key=lambda call: _mean(call[2]))
        return list(zip(examples, completions, rewards))[:limit]


class RunTracking:
    """The trackers of one training run: `on_generation` for the trainer, `finish` at the end."""

    def __init__(self, cfg: Config, run_dir: str | Path, task: Task) -> None:
        self.trackers: list[Tracker] = []
        try:
            for name in cfg.tracking.report_to:
                self.trackers.append(_TRACKERS[name](cfg, Path(run_dir)))
        except Exception:
            self.close()
            raise
        self.samples = cfg.tracking.log_completions if any(t.supports_tables for t in self.trackers) else 0
        self.recorder: SampleRecorder | None = None
        self.task = task
        if self.samples:
            skip = {ex.prompt for ex in task.split("validation")}
            self.task = self.recorder = SampleRecorder(task, skip)
        self._logged: int | None = None  # the last generation whose records were logged

    def on_generation(self, state: TrainState) -> None:
        """Log the records of generations not logged yet (on a resumed run: from the resumed one on)."""
        if not self.trackers:
            return
        if self._logged is None:
            # A fresh run also logs its start validation (generation 0); a resumed one only what is new.
            self._logged = state.generation - 1 if state.generation > 1 else -1
        for record in state.history:
            step = int(record.get("generation", 0))
            if step > self._logged:
                self._log_scalars(numeric_fields(record, prefix="essa/"), step)
        self._logged = state.generation
        if self.recorder is not None:
            rows = [[state.generation, ex.prompt, completion, reward]
                    for ex, completion, reward in self.recorder.take(self.samples)]
            if rows:
                for tracker in self.trackers:
                    if tracker.supports_tables:
                        tracker.log_table("completions", SAMPLE_COLUMNS, rows, state.generation)

    def finish(self, summary: dict[str, Any], step: int) -> None:
        """Log the run's final numbers (validation accuracy of each final choice, ...) at `step`."""
        self._log_scalars(numeric_fields(summary, prefix="final/"), step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []

    def _log_scalars(self, values: dict[str, float], step: int) -> None:
        if values:
            for tracker in self.trackers:
                tracker.log_scalars(values, step)


def numeric_fields(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a record (nested mappings flattened with "/"), without its generation number."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "generation":
            continue
        if isinstance(value, dict):
            out.update(numeric_fields(value, prefix=f"{prefix}{key}/"))
        elif isinstance(value, numbers.Real):  # bools count as 0 / 1
            out[f"{prefix}{key}"] = float(value)
    return out


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else -math.inf


def _markdown_cell(value: Any) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", "<br>")


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Trackers print banners; stdout belongs to the CLI's JSON result."""
    with contextlib.redirect_stdout(sys.stderr):
        yield
