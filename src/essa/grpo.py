"""GRPO baseline: TRL's GRPOTrainer on the same LoRA adapter, task reward and prompts as ESSA.

The policy is the SFT adapter loaded trainable with PEFT (CPU or the model's device). Its precision
follows ESSA's: where the model's inference dtype is bf16 (model.dtype bfloat16, or auto on a GPU
or an AMX CPU) GRPO trains with bf16 autocast, rollouts included; otherwise in the model's own
dtype (fp32 for auto). Prompts are the task's chat-formatted strings (`format_prompt`), exactly
the text ESSA generates from, and the reward is the task's reward through `essa.evaluate.score`,
the same path ESSA's fitness takes.
Training stops when a wall-clock budget is spent; at given times on that clock the current adapter
is saved as a snapshot, so it can be evaluated later without the evaluation touching the clock.

Settings: the `grpo:` section (`essa.config.GrpoConfig`); budget, snapshot times and step cap
come from the `compare:` section.
"""

from __future__ import annotations

import gc
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from essa.config import Config, GrpoConfig
from essa.errors import EssaError
from essa.evaluate import score
from essa.io import atomic_directory, atomic_write_text, ensure_writable_dir
from essa.models import resolve_dtype
from essa.schedule import STREAM_STEPS, Snapshot, SnapshotSchedule, prompt_stream, rechunk, snapshot_dir
from essa.tasks import RewardStats, Task, format_prompt

log = logging.getLogger("essa.grpo")
METRICS = "metrics.jsonl"
TRL_LOG = "trl_log.jsonl"
START_ADAPTER = "start_adapter"


@dataclass
class GrpoResult:
    steps: int
    elapsed_s: float
    snapshots: list[Snapshot]
    history: list[dict[str, Any]]
    # Train-split indices of the prompts of each optimizer step, in order.
    prompts_used: list[list[int]] = field(default_factory=list)
    start_adapter: str = ""
    reward_failures: int = 0


def run_grpo(model: Any, tokenizer: Any, task: Task, adapter_dir: str | Path, cfg: Config, out_dir: str | Path,
             checkpoint_cb: Callable[[Snapshot], None] | None = None, *,
             schedule: list[list[int]] | None = None, progress: bool = True) -> GrpoResult:
    """GRPO (`cfg.grpo`) from `adapter_dir` until compare.budget_s seconds of training (or
    compare.max_steps steps) are spent.

    `schedule[k]` lists the train-split indices of step k's prompts; by default ESSA's prompt
    stream cut into steps of `cfg.grpo_prompts_per_step`, so both methods read the same prompts.
    At each of compare's checkpoint times (seconds on the training clock) the adapter is saved
    under `out_dir/snapshots` and `checkpoint_cb` is called; the time both take is kept off the clock.
    The caller's model is left without LoRA layers (unloaded, not merged) when this returns.
    """
    import peft
    from trl import GRPOConfig, GRPOTrainer

    grpo_cfg, max_steps = cfg.grpo, cfg.compare.max_steps
    out_dir = ensure_writable_dir(out_dir)
    train = task.checked_split("train")
    per_step = cfg.grpo_prompts_per_step
    if schedule is None:
        schedule = rechunk(prompt_stream(cfg.essa, len(train), max_steps or STREAM_STEPS), per_step)
    _check_schedule(schedule, per_step, len(train))
    steps = len(schedule) if max_steps is None else min(max_steps, len(schedule))
    prompts = [format_prompt(tokenizer, task, ex) for ex in train]
    dataset = _dataset(schedule[:steps], prompts)

    reward = TaskReward(task, train, prompts, grpo_cfg.num_generations)
    total = per_step * grpo_cfg.num_generations
    micro = grpo_cfg.micro_batch_size or total  # divides total: the config checks it
    device = next(model.parameters()).device.type
    bf16 = trains_in_bf16(cfg)
    args = GRPOConfig(**_trl_args(cfg, grpo_cfg, out_dir, micro, total // micro, steps, device == "cpu", bf16))
    with warnings.catch_warnings():
        # PEFT reads a deprecated transformers attribute; the warning is not the user's to act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        policy = peft.PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    if bf16:
        # TRL's bf16 autocasts the loss forward only: accelerate wraps the model's forward, and
        # PEFT's generate calls the base model around it. The rollouts get the same autocast here.
        policy.generate = torch.autocast(device_type=device, dtype=torch.bfloat16)(policy.generate)
    saver = _svd_only_saver(policy, adapter_dir, cfg.essa.alpha) if grpo_cfg.svd_only else None
    clock = BudgetCallback(cfg.compare.budget_s, cfg.compare.checkpoint_times(), out_dir, reward, checkpoint_cb,
                           progress, saver=saver)
    trainer = GRPOTrainer(model=policy, reward_funcs=reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[clock])
    # Our callback reports progress; the stock ones print every log dict.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    try:
        with warnings.catch_warnings():
            # transformers renames gradient_checkpointing; TRL still passes the old name.
            warnings.filterwarnings("ignore", category=FutureWarning)
            trainer.train()
        clock.final_snapshot(policy, trainer.state.global_step)
    finally:
        clock.close()
        policy.unload()
        del trainer
        gc.collect()
        model.eval()
    return GrpoResult(steps=clock.steps, elapsed_s=clock.last_elapsed, snapshots=clock.snapshots,
                      history=clock.history, prompts_used=reward.batches, start_adapter=str(out_dir / START_ADAPTER),
                      reward_failures=reward.stats.failures)


def _svd_only_saver(policy: Any, adapter_dir: str | Path, alpha: float) -> Callable[[Any, Path], None]:
    """Restrict `policy` to the singular-value offsets. Snapshots hold the LoRA factors the policy
    actually computes with (its parametrized weights), not factors rebuilt from the offsets."""
    from essa.svd_grpo import policy_factors, restrict_to_singular_values
    from essa.svd_space import SvdLoraSpace

    space = SvdLoraSpace.from_adapter(adapter_dir, alpha, offsets="additive")  # the paper's SVD-GRPO
    restrict_to_singular_values(policy, space)
    log.info("SVD-GRPO: %d trainable singular-value offsets", space.dim)
    return lambda model, path: space.save_factors(policy_factors(model, space), path)


def _check_schedule(schedule: list[list[int]], per_step: int, n_train: int) -> None:
    for k, batch in enumerate(schedule):
        if len(batch) != per_step:
            raise EssaError(f"prompt schedule step {k} has {len(batch)} prompts; GRPO needs {per_step} per step")
        if any(not 0 <= i < n_train for i in batch):
            raise EssaError(f"prompt schedule step {k} names a prompt outside the train split")


def _dataset(schedule: list[list[int]], prompts: list[str]) -> Any:
    from datasets import Dataset

    flat = [i for batch in schedule for i in batch]
    return Dataset.from_dict({"prompt": [prompts[i] for i in flat], "train_index": flat})


def trains_in_bf16(cfg: Config) -> bool:
    """Whether GRPO trains with bf16 autocast: exactly when the model's inference dtype is bf16
    (model.dtype bfloat16, or auto on a GPU or an AMX CPU), so its rollouts run in the precision
    ESSA's fitness does."""
    return resolve_dtype(cfg.model.dtype) == "bfloat16"


def precision(cfg: Config) -> str:
    """GRPO's training precision in words, for reports."""
    weights = resolve_dtype(cfg.model.dtype, training=True)
    return f"{weights} weights, bfloat16 autocast (rollouts and loss)" if trains_in_bf16(cfg) else weights


def _trl_args(cfg: Config, g: GrpoConfig, out_dir: Path, micro: int, accumulation: int, steps: int,
              on_cpu: bool, bf16: bool) -> dict[str, Any]:
    """GRPOConfig keywords: the device, TRL's bf16 mixed precision only when `bf16` (TRL defaults it
    on), one optimizer step per rollout batch, no checkpoints or trackers (snapshots are ours)."""
    return {
        "output_dir": str(out_dir / "trl"), "use_cpu": on_cpu, "bf16": bf16, "fp16": False,
        "learning_rate": g.lr, "lr_scheduler_type": "constant", "warmup_steps": 0, "beta": g.beta,
        "num_generations": g.num_generations, "per_device_train_batch_size": micro,
        "gradient_accumulation_steps": accumulation, "max_steps": steps, "num_train_epochs": 1,
        "max_completion_length": cfg.decoding.max_new_tokens, "temperature": g.temperature, "top_p": g.top_p,
        "loss_type": g.loss_type, "gradient_checkpointing": g.gradient_checkpointing, "shuffle_dataset": False,
        "logging_steps": 1, "save_strategy": "no", "report_to": "none", "disable_tqdm": True,
        "seed": g.seed, "data_seed": g.seed, "dataloader_num_workers": 0, "log_completions": False,
    }


class TaskReward:
    """The task's reward as a TRL reward function; records which train prompts each step used."""

    __name__ = "task_reward"

    def __init__(self, task: Task, train: list[Any], prompts: list[str], group_size: int):
        self.task = task
        self.train = train
        self.prompts = prompts
        self.group_size = group_size
        self.stats = RewardStats()
        self.batches: list[list[int]] = []
        self.last: dict[str, float] = {}

    def __call__(self, prompts: list[str], completions: list[str], train_index: list[int],
                 **_: Any) -> list[float]:
        for text, i in zip(prompts, train_index):
            if text != self.prompts[i]:  # the trainer must hand back the prompt the index names
                raise EssaError(f"GRPO prompt does not match train example {i}")
        # TRL samples each prompt's group as consecutive rows: one step's prompts are every
        # group_size-th row (a prompt may appear twice in a step: the stream crosses generations).
        step = [int(i) for i in train_index[::self.group_size]]
        if [int(i) for i in train_index] != [i for i in step for _ in range(self.group_size)]:
            raise EssaError("GRPO rollouts are not in groups of consecutive rows; cannot tell which prompts it read")
        rewards = score(self.task, [list(completions)], [self.train[i] for i in train_index], self.stats)[0]
        self.batches.append(step)
        self.last = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
                     "reward_max": float(rewards.max()), "completions": len(completions)}
        return rewards.tolist()


class BudgetCallback(TrainerCallback):
    """Training clock, wall-clock budget, snapshots at fixed clock times, and per-step metrics."""

    def __init__(self, budget_s: float, times: list[float], out_dir: Path, reward: TaskReward,
                 checkpoint_cb: Callable[[Snapshot], None] | None, progress: bool = False,
                 saver: Callable[[Any, Path], None] | None = None):
        self.budget_s = budget_s
        self._save = saver or _save_peft
        self.bar = tqdm(total=round(budget_s), desc="GRPO", unit="s", disable=not progress, dynamic_ncols=True)
        self.schedule = SnapshotSchedule(times)
        self.out_dir = out_dir
        self.reward = reward
        self.checkpoint_cb = checkpoint_cb
        self.snapshots: list[Snapshot] = []
        self.history: list[dict[str, Any]] = []
        self.steps = 0
        self.last_elapsed = 0.0  # the clock when the last step ended
        self._t0: float | None = None
        self._paused = 0.0
        self._trl_logs: list[dict[str, Any]] = []

    def elapsed(self) -> float:
        return 0.0 if self._t0 is None else time.perf_counter() - self._t0 - self._paused

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **_: Any) -> None:
        # What GRPO starts from, saved as the trainer holds it (compared against ESSA's start).
        self._save(model, self.out_dir / START_ADAPTER)
        self.snapshots.append(Snapshot(0.0, 0, str(self.out_dir / START_ADAPTER)))
        self._t0 = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **_: Any) -> None:
        self.steps = state.global_step
        elapsed = self.last_elapsed = self.elapsed()
        self.history.append({"step": state.global_step, "wall_clock_s": round(elapsed, 3), **self.reward.last,
                             "prompts": len(self.reward.batches[-1]) if self.reward.batches else 0})
        if self.schedule.due(elapsed):
            self._snapshot(model, state.global_step, elapsed)
        if elapsed >= self.budget_s:
            control.should_training_stop = True
        self._write_metrics()
        self.bar.update(max(0, min(round(elapsed), self.bar.total) - self.bar.n))
        self.bar.set_postfix(step=state.global_step, reward=f"{self.reward.last.get('reward_mean', 0.0):.3f}")

    def close(self) -> None:
        self.bar.close()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any) -> None:
        if logs:
            self._trl_logs.append({"step": state.global_step, **{k: v for k, v in logs.items()
                                                                  if isinstance(v, (int, float))}})
            atomic_write_text(self.out_dir / TRL_LOG, "".join(_json(r) for r in self._trl_logs))

    def final_snapshot(self, model: Any, step: int) -> None:
        if self.snapshots and self.snapshots[-1].step == step:
            return
        self._snapshot(model, step, self.last_elapsed)

    def _snapshot(self, model: Any, step: int, elapsed: float) -> None:
        t0 = time.perf_counter()
        path = snapshot_dir(self.out_dir, step)
        self._save(model, path)
        snap = Snapshot(round(elapsed, 3), step, str(path))
        self.snapshots.append(snap)
        if self.checkpoint_cb is not None:
            self.checkpoint_cb(snap)
        self._paused += time.perf_counter() - t0
        log.info("GRPO snapshot at %.1f s (step %d): %s", elapsed, step, path)

    def _write_metrics(self) -> None:
        atomic_write_text(self.out_dir / METRICS, "".join(_json(r) for r in self.history))


def _save_peft(model: Any, path: Path) -> None:
    with atomic_directory(path) as tmp:
        model.save_pretrained(str(tmp), selected_adapters=["default"], save_embedding_layers=False)


def _json(record: dict[str, Any]) -> str:
    import json

    return json.dumps(record) + "\n"
