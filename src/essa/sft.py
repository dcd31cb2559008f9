"""LoRA SFT warm start: train one LoRA adapter on a task's `sft` split and save it with PEFT.

The prompt is the task's chat-formatted prompt (generation prompt included), tokenized exactly
as generation sees it; the loss covers only the completion (target + EOS). Training is seeded
and deterministic on CPU. The caller's model comes back unchanged: the LoRA layers are removed
after saving and the base weights are never updated.

`continue_sft` trains an existing adapter further with the same loss, batches and optimizer, for a
wall-clock budget with snapshots (the continued-SFT arm of `essa compare`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch
from torch import nn
from tqdm import tqdm

from essa import sft_checkpoint
from essa.config import LoraConfig, SftConfig
from essa.errors import EssaError
from essa.io import atomic_directory, atomic_write_json, atomic_write_text, ensure_writable_dir
from essa.schedule import Snapshot, SnapshotSchedule, snapshot_dir
from essa.sft_checkpoint import LoopState, trainable_parameters
from essa.svd_space import ADAPTER_CONFIG
from essa.tasks import Task, format_prompt

T = TypeVar("T")
IGNORE_INDEX = -100  # label value that transformers' causal-LM loss skips
WARMUP_FRACTION = 0.1  # linear warmup over this share of steps, then linear decay to zero
MAX_GRAD_NORM = 1.0
METRICS_FILE = "sft_metrics.json"
# continue_sft's files in its out_dir: the tensors it starts from, its per-step log (snapshots: schedule.snapshot_dir).
START_ADAPTER = "start_adapter"
TIMED_METRICS = "metrics.jsonl"


@dataclass
class SftResult:
    adapter_dir: Path
    steps: int
    final_loss: float
    wall_clock_s: float


@dataclass
class Encoded:
    """One tokenized training example: `labels` is -100 wherever no loss is taken."""

    input_ids: list[int]
    labels: list[int]


def run_sft(model: nn.Module, tokenizer: Any, task: Task, lora: LoraConfig, sft: SftConfig,
            out_dir: str | Path, progress: bool = True, resume: bool = False,
            settings: dict[str, Any] | None = None) -> SftResult:
    """Train a LoRA adapter on `task`'s sft split and write it as a PEFT adapter dir to `out_dir`.

    With `sft.patience` set, the validation loss is checked every `sft.eval_every` steps and
    training stops once it has not improved for `patience` checks; the best check's adapter is saved.
    Each new best is written to `out_dir` at once (its metrics say `"finished": false`), so a run
    stopped by hand or by a crash still leaves its best adapter. Every `sft.eval_every` steps the
    whole training state goes to `OUT_DIR.checkpoint.npz` beside `out_dir`; `resume` continues from it
    exactly (`settings`, the caller's description of the model and task, must match the saved one).
    """
    out_dir = Path(out_dir)
    check_targets(model, lora.targets)
    examples = task.checked_split("sft")
    ensure_writable_dir(out_dir.parent)  # fail on a bad path before spending time training
    encoded = encode_split(tokenizer, task, examples, sft.max_length)
    usable = [encoded[i] for i in _usable_rows(encoded, sft)]
    steps = total_steps(len(usable), sft)
    pad_id = _pad_id(tokenizer)
    device = next(model.parameters()).device
    validation = validation_batches(tokenizer, task, sft, pad_id, device) if sft.patience else None
    checkpointing = sft_checkpoint.Checkpointing(out_dir, sft_checkpoint.fingerprint(
        settings or {}, dataclasses.asdict(lora), dataclasses.asdict(sft), len(usable)), resume)

    with _seeded(sft.seed, device), _restored_state(model):
        peft_model = wrap_lora(model, lora)
        try:
            stopper = (EarlyStopping(lambda: validation_loss(peft_model, validation), sft.eval_every, sft.patience,
                                     on_best=lambda s: save_adapter(peft_model, out_dir, _partial_metrics(
                                         s, checkpointing.elapsed_s())))
                       if validation else None)

            def batches(done: int) -> Iterator[dict[str, torch.Tensor]]:  # the seeded order, past `done` steps
                order = itertools.islice(batch_stream(usable, sft.batch_size, sft.seed), done, None)
                return (collate(b, pad_id, device) for b in order)

            losses = train_loop(peft_model, batches, steps, sft.lr, progress=progress, stopper=stopper,
                                bf16_autocast=sft.bf16_autocast, checkpointing=checkpointing,
                                save_every=sft.eval_every)
            metrics = {
                "finished": True, "steps": len(losses), "planned_steps": steps, "examples": len(examples),
                "examples_used": len(usable),
                "truncated_examples": sum(len(e.input_ids) == sft.max_length for e in encoded),
                "final_loss": losses[-1], "mean_loss": sum(losses) / len(losses),
                "wall_clock_s": checkpointing.elapsed_s(), "losses": losses,
            }
            if stopper is not None:
                metrics.update(stopper.report())
            save_adapter(peft_model, out_dir, metrics)
            checkpointing.finish()
        finally:
            unload_lora(peft_model)  # even on failure, hand back the model without LoRA layers
    return SftResult(out_dir, len(losses), losses[-1], metrics["wall_clock_s"])


def is_finished(adapter_dir: str | Path) -> bool:
    """Whether `adapter_dir` holds an SFT adapter whose training ended (not a best check written
    mid-run); adapters of older essa versions, without the mark, count as finished."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        return False
    metrics = adapter_dir / METRICS_FILE
    return not metrics.is_file() or json.loads(metrics.read_text()).get("finished", True)


def _partial_metrics(stopper: EarlyStopping, elapsed_s: float) -> dict[str, Any]:
    """What an adapter written mid-run says about itself: its check, and that training went on."""
    return {"finished": False, "wall_clock_s": elapsed_s, **stopper.report()}


@dataclass
class TimedSftResult:
    """What `continue_sft` did, on its training clock."""

    steps: int
    elapsed_s: float
    snapshots: list[Snapshot]  # the start first (t = 0), the adapter after the last step last
    history: list[dict[str, Any]]  # one row per step: step, wall_clock_s, loss
    examples_used: list[list[int]]  # the sft-split indices each step trained on, in order
    start_adapter: str  # the tensors it started from, saved as the trainable model held them


def continue_sft(model: nn.Module, tokenizer: Any, task: Task, adapter_dir: str | Path, sft: SftConfig,
                 out_dir: str | Path, budget_s: float, times: list[float], max_steps: int | None = None,
                 bf16_autocast: bool = False, progress: bool = True) -> TimedSftResult:
    """The adapter in `adapter_dir` trained further on `task`'s sft split, as `run_sft` trains (same
    loss, seeded batches of sft.batch_size, AdamW, clipping) but at a constant sft.lr: a clock budget
    has no step count to warm up or decay over. Stops at the first step that ends past `budget_s`
    seconds of training (or at `max_steps`). At each of `times` on that clock the adapter is saved
    under out_dir/snapshots; the clock counts training steps only, so saving is off it.
    The caller's model comes back without LoRA layers and with its base weights unchanged."""
    out_dir = ensure_writable_dir(out_dir)
    encoded = encode_split(tokenizer, task, task.checked_split("sft"), sft.max_length)
    rows = _usable_rows(encoded, sft)
    pad_id = _pad_id(tokenizer)
    device = next(model.parameters()).device
    order = batch_stream(rows, sft.batch_size, sft.seed)
    with _seeded(sft.seed, device), _restored_state(model):
        policy = load_lora(model, adapter_dir)
        try:
            return _timed_loop(policy, order, lambda k: collate([encoded[i] for i in k], pad_id, device), sft.lr,
                               out_dir, budget_s, times, max_steps, bf16_autocast, progress)
        finally:
            unload_lora(policy)


def _timed_loop(policy: nn.Module, order: Iterator[list[int]], make_batch: Callable[[list[int]], Any], lr: float,
                out_dir: Path, budget_s: float, times: list[float], max_steps: int | None, bf16_autocast: bool,
                progress: bool) -> TimedSftResult:
    """`continue_sft`'s loop on the loaded trainable adapter: `order` gives each step's rows of the
    sft split, `make_batch` their tensors (on the clock, as all of a step's work is)."""
    start = _save_lora(policy, out_dir / START_ADAPTER)
    snapshots = [Snapshot(0.0, 0, start)]
    params = list(trainable_parameters(policy).values())
    optimizer = torch.optim.AdamW(params, lr=lr)
    schedule = SnapshotSchedule(times)
    history: list[dict[str, Any]] = []
    used: list[list[int]] = []
    elapsed, step = 0.0, 0
    policy.train()
    bar = tqdm(total=round(budget_s), desc="continued SFT", unit="s", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    try:
        for step, rows in enumerate(order, 1):
            t0 = time.perf_counter()
            loss = sft_step(policy, make_batch(rows), params, optimizer, step, bf16_autocast)
            elapsed += time.perf_counter() - t0
            used.append(rows)
            history.append({"step": step, "wall_clock_s": round(elapsed, 3), "loss": loss})
            if schedule.due(elapsed):
                snapshots.append(_snapshot(policy, out_dir, step, elapsed))
            bar.update(max(0, min(round(elapsed), bar.total) - bar.n))
            bar.set_postfix(step=step, loss=f"{loss:.4f}")
            if elapsed >= budget_s or (max_steps is not None and step >= max_steps):
                break
    finally:
        bar.close()
    if snapshots[-1].step != step:
        snapshots.append(_snapshot(policy, out_dir, step, elapsed))
    atomic_write_text(out_dir / TIMED_METRICS, "".join(json.dumps(r) + "\n" for r in history))
    return TimedSftResult(steps=step, elapsed_s=elapsed, snapshots=snapshots, history=history, examples_used=used,
                          start_adapter=start)


def _snapshot(policy: nn.Module, out_dir: Path, step: int, elapsed: float) -> Snapshot:
    return Snapshot(round(elapsed, 3), step, _save_lora(policy, snapshot_dir(out_dir, step)))


def _save_lora(policy: nn.Module, path: Path) -> str:
    """The adapter as a PEFT dir at `path` (all-or-nothing), as GRPO saves its snapshots."""
    with atomic_directory(path) as tmp:
        policy.save_pretrained(str(tmp), selected_adapters=["default"], save_embedding_layers=False)
    return str(path)


def encode_split(tokenizer: Any, task: Task, examples: list[Any], max_length: int) -> list[Encoded]:
    return [encode_example(tokenizer, format_prompt(tokenizer, task, ex), task.sft_target(ex), max_length)
            for ex in examples]


def with_targets(encoded: list[Encoded]) -> list[Encoded]:
    """The examples that keep at least one target token after truncation (the others teach nothing)."""
    return [e for e in encoded if _keeps_target(e)]


def _keeps_target(example: Encoded) -> bool:
    return any(x != IGNORE_INDEX for x in example.labels)


def _pad_id(tokenizer: Any) -> int:
    """The id batches are padded with (masked out of the loss): the pad token, else EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _usable_rows(encoded: list[Encoded], sft: SftConfig) -> list[int]:
    """Indices of the examples `with_targets` keeps; an error where none is left."""
    rows = [i for i, e in enumerate(encoded) if _keeps_target(e)]
    if not rows:
        raise EssaError(f"no SFT example keeps any target token within sft.max_length={sft.max_length}: "
                        "raise sft.max_length")
    return rows


class EarlyStopping:
    """Checks the validation loss every `every` steps; says stop once it has not improved for
    `patience` checks in a row, and keeps a copy of the trainable weights of the best check."""

    def __init__(self, evaluate: Callable[[], float], every: int, patience: int,
                 on_best: Callable[[EarlyStopping], None] | None = None) -> None:
        self.evaluate, self.every, self.patience, self.on_best = evaluate, every, patience, on_best
        self.history: list[tuple[int, float]] = []  # (step, validation loss)
        self.best_step, self.best_loss = 0, math.inf
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.stopped_early = False

    def due(self, step: int, steps: int) -> bool:
        return step % self.every == 0 or step == steps

    def should_stop(self, step: int, model: nn.Module) -> bool:
        """Check at `step`; True once `patience` checks in a row have not beaten the best."""
        loss = self.evaluate()
        self.history.append((step, loss))
        if loss < self.best_loss:
            self.best_step, self.best_loss = step, loss
            self.best_weights = {n: p.detach().clone() for n, p in trainable_parameters(model).items()}
            if self.on_best is not None:
                self.on_best(self)
        since_best = sum(1 for s, _ in self.history if s > self.best_step)
        self.stopped_early = since_best >= self.patience
        return self.stopped_early

    def restore_best(self, model: nn.Module) -> None:
        if self.best_weights is None:
            return
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in self.best_weights:
                    param.copy_(self.best_weights[name])

    def report(self) -> dict[str, Any]:
        return {"validation_losses": [[s, loss] for s, loss in self.history], "best_step": self.best_step,
                "best_validation_loss": self.best_loss, "stopped_early": self.stopped_early}


def validation_batches(tokenizer: Any, task: Task, sft: SftConfig, pad_id: int,
                       device: torch.device) -> list[dict[str, torch.Tensor]]:
    """The first `sft.validation_examples` of the task's validation split, encoded with their SFT
    targets, in batches; a clear error where the split has no targets (e.g. real IFEval)."""
    examples = task.checked_split("validation")[:sft.validation_examples]
    try:
        encoded = encode_split(tokenizer, task, examples, sft.max_length)
    except EssaError as exc:
        raise EssaError(f"early stopping (sft.patience) needs reference solutions for the validation split: "
                        f"{exc}") from exc
    encoded = with_targets(encoded)
    if not encoded:
        raise EssaError("early stopping: no validation example keeps a target token within sft.max_length")
    return [collate(encoded[i:i + sft.batch_size], pad_id, device) for i in range(0, len(encoded), sft.batch_size)]


@torch.no_grad()
def validation_loss(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean loss per labelled token over the validation batches (eval mode: no dropout)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        total += completion_loss(model, batch).item() * tokens
        count += tokens
    model.train(was_training)
    return total / max(count, 1)


def check_targets(model: nn.Module, targets: list[str]) -> None:
    """Every LoRA target must name at least one nn.Linear (by full name or last name parts)."""
    linear = [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear)]
    if missing:
        short = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise EssaError(f"LoRA target(s) {', '.join(missing)} match no linear layer of the model "
                        f"(its linear layers: {', '.join(short) or 'none'})")


def encode_example(tokenizer: Any, prompt: str, completion: str, max_length: int) -> Encoded:
    """Prompt ids + completion ids + EOS, cut to `max_length`; loss only on the completion part."""
    if tokenizer.eos_token_id is None:
        raise EssaError("the tokenizer has no EOS token; SFT needs one to teach the model to stop")
    # No added specials: the chat template writes its own, and generation tokenizes prompts the
    # same way, so the model trains on exactly the ids it will later continue.
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt_ids + target_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + target_ids)[:max_length]
    return Encoded(ids, labels)


def collate(items: list[Encoded], pad_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding gets attention 0 and label -100."""
    width = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, e in enumerate(items):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def total_steps(n_examples: int, sft: SftConfig) -> int:
    """ceil(epochs x batches per epoch), at least 1, capped by `max_steps`."""
    steps = max(1, math.ceil(sft.epochs * math.ceil(n_examples / sft.batch_size)))
    return steps if sft.max_steps is None else min(steps, sft.max_steps)


def batch_stream(items: list[T], batch_size: int, seed: int) -> Iterator[list[T]]:
    """Endless batches: each epoch is a fresh seeded shuffle, the last batch may be short."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(items), generator=gen).tolist()
        for i in range(0, len(order), batch_size):
            yield [items[j] for j in order[i:i + batch_size]]


def train_loop(model: nn.Module, batches: Callable[[int], Iterator[dict[str, torch.Tensor]]], steps: int,
               lr: float, progress: bool = True, stopper: EarlyStopping | None = None, bf16_autocast: bool = False,
               checkpointing: sft_checkpoint.Checkpointing | None = None, save_every: int = 0) -> list[float]:
    """AdamW on the trainable parameters for `steps` batches (fewer where `stopper` stops it, with
    its best weights put back); returns the loss of each step. `batches(k)` gives the batches after
    the first k steps. `checkpointing` restores a saved state first and saves one every
    `save_every` steps (after that step's validation check)."""
    params = list(trainable_parameters(model).values())
    optimizer = torch.optim.AdamW(params, lr=lr)
    state = LoopState(model, optimizer, [])
    warmup = int(WARMUP_FRACTION * steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, warmup, steps))
    if checkpointing is not None:
        checkpointing.restore(state, stopper)
    if state.step:  # where the schedule stood after the steps already done
        schedule.last_epoch = state.step
        for group, base in zip(optimizer.param_groups, schedule.base_lrs):
            group["lr"] = base * _lr_factor(state.step, warmup, steps)
    losses = state.losses
    model.train()
    bar = tqdm(total=steps, initial=state.step, desc="sft", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    try:
        for _, batch in zip(range(steps - state.step), batches(state.step)):
            losses.append(sft_step(model, batch, params, optimizer, len(losses) + 1, bf16_autocast))
            schedule.step()
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            bar.update()
            stop = False
            if stopper is not None and stopper.due(len(losses), steps):
                stop = stopper.should_stop(len(losses), model)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", val=f"{stopper.history[-1][1]:.4f}")
            if checkpointing and save_every and len(losses) % save_every == 0 and len(losses) < steps and not stop:
                checkpointing.save(state, stopper)
            if stop:
                break
    finally:
        bar.close()
    if stopper is not None:
        stopper.restore_best(model)
    return losses


def sft_step(model: nn.Module, batch: dict[str, torch.Tensor], params: list[nn.Parameter],
             optimizer: torch.optim.Optimizer, step: int, bf16_autocast: bool = False) -> float:
    """One optimizer step on the completion loss, gradients clipped to MAX_GRAD_NORM; its loss.
    `bf16_autocast`: the forward pass under bf16 autocast over the model's own weights."""
    device = batch["input_ids"].device.type
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16_autocast):
        loss = completion_loss(model, batch)
    if not torch.isfinite(loss):
        raise EssaError(f"SFT loss became {loss.item()} at step {step}: lower sft.lr")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def completion_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token loss on the labelled (completion) positions.

    The output head runs only from the first labelled position on (`logits_to_keep`): prompts are
    most of each sequence, and a 49k-vocab head on every prompt token would be wasted work.
    """
    labels = batch["labels"]
    labelled = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    first = max(int(labelled[0]) - 1, 0) if len(labelled) else 0
    keep = torch.arange(first, labels.shape[1] - 1, device=labels.device)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=keep).logits
    targets = labels[:, keep + 1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                             ignore_index=IGNORE_INDEX)


def _lr_factor(step: int, warmup: int, steps: int) -> float:
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (steps - step) / max(1, steps - warmup))


def wrap_lora(model: nn.Module, lora: LoraConfig) -> nn.Module:
    """Inject LoRA layers into `model` (in place) and return the PEFT wrapper."""
    import peft

    config = peft.LoraConfig(r=lora.rank, lora_alpha=lora.lora_alpha, target_modules=list(lora.targets),
                             lora_dropout=lora.dropout, task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        # PEFT reads a deprecated transformers attribute; the warning is not the user's to act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return peft.get_peft_model(model, config)


def load_lora(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """The PEFT adapter in `adapter_dir` injected into `model` (in place), trainable, with the rank,
    alpha, targets and dropout it was saved with; returns the PEFT wrapper."""
    import peft

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return peft.PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)


def save_adapter(peft_model: nn.Module, out_dir: Path, metrics: dict[str, Any]) -> None:
    """Write the PEFT adapter dir plus `sft_metrics.json`, all-or-nothing."""
    with atomic_directory(out_dir) as tmp:
        # Embedding saving is off: the vocabulary is never resized, and "auto" may query the hub.
        peft_model.save_pretrained(str(tmp), save_embedding_layers=False)
        atomic_write_json(tmp / METRICS_FILE, metrics)


def unload_lora(peft_model: nn.Module) -> nn.Module:
    """Remove the LoRA layers without merging them; returns the (unchanged) base model."""
    return peft_model.unload()


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch for LoRA init and dropout, restoring the caller's RNG state afterwards."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextmanager
def _restored_state(model: nn.Module) -> Iterator[None]:
    """Put back the base model's train/eval modes and requires_grad flags, which PEFT changes."""
    modes = {name: m.training for name, m in model.named_modules()}
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        yield
    finally:
        for name, m in model.named_modules():
            m.training = modes.get(name, m.training)
        for name, p in model.named_parameters():
            p.requires_grad_(grads.get(name, p.requires_grad))
