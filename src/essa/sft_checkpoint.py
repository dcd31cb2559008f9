"""An interrupted SFT's state, so `essa sft --resume` continues it as if it had never stopped.

Written every `sft.eval_every` steps (after that step's validation check) beside the adapter dir
(`ADAPTER_DIR.checkpoint.npz`) as plain data (`atomic_write_state`: arrays and JSON, never
pickle): the trainable weights, AdamW's moments and step counts, the steps done and their losses,
the training seconds so far, the early-stopping record with its best weights, and the torch
random state (dropout). The batch order needs nothing saved: it is a seeded stream that the
resumed run fast-forwards. A `fingerprint` of every setting that shapes the trajectory (the
model, the task, the LoRA and SFT settings but `sft.patience`) must match, so a checkpoint is
never continued under other settings.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from essa.errors import EssaError
from essa.io import atomic_write_state, read_state

CHECKPOINT_SUFFIX = ".checkpoint.npz"
log = logging.getLogger("essa.sft")


def checkpoint_path(adapter_dir: Path) -> Path:
    """Beside the adapter dir, named after it (the adapter dir itself is replaced whole on saving)."""
    return adapter_dir.with_name(adapter_dir.name + CHECKPOINT_SUFFIX)


@dataclass
class LoopState:
    """What the SFT loop carries from step to step."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    losses: list[float]

    @property
    def step(self) -> int:
        return len(self.losses)


class Checkpointing:
    """One SFT run's checkpoint file: refused without `resume` where one exists, loaded with it."""

    def __init__(self, adapter_dir: Path, settings: dict[str, Any], resume: bool) -> None:
        self.path, self.settings, self.resume = checkpoint_path(adapter_dir), settings, resume
        self.started, self.earlier_s = time.perf_counter(), 0.0  # earlier_s: training before a resume
        if self.path.exists() and not resume:
            raise EssaError(f"{self.path} holds an interrupted SFT; pass --resume to continue it, or choose another "
                            "output_dir")

    def elapsed_s(self) -> float:
        """Training seconds of the whole run, across resumes."""
        return self.earlier_s + time.perf_counter() - self.started

    def save(self, state: LoopState, stopper: Any | None) -> None:
        save(self.path, state, stopper, self.settings, self.elapsed_s())

    def restore(self, state: LoopState, stopper: Any | None) -> None:
        if self.resume and self.path.exists():
            self.earlier_s = restore(self.path, state, stopper, self.settings)
            log.info("SFT resumed at step %d", state.step)

    def finish(self) -> None:
        """The run ended and its adapter is saved: the checkpoint has nothing left to continue."""
        self.path.unlink(missing_ok=True)


def fingerprint(context: dict[str, Any], lora: dict[str, Any], sft: dict[str, Any],
                examples_used: int) -> dict[str, Any]:
    """The settings a checkpoint belongs to: the caller's `context` (model and task), the LoRA and
    SFT settings (`sft.patience` may change: it only decides when to stop) and the data's size."""
    sft = {k: v for k, v in sft.items() if k != "patience"}
    return json.loads(json.dumps({**context, "lora": lora, "sft": sft, "examples_used": examples_used},
                                 default=str))


def save(path: Path, state: LoopState, stopper: Any | None, settings: dict[str, Any], elapsed_s: float) -> None:
    """Write `state` (and the early-stopping record) to `path`, all-or-nothing."""
    params = trainable_parameters(state.model)
    moments = {}
    for name, param in params.items():
        slot = state.optimizer.state.get(param, {})
        if slot:
            moments[name] = {"step": float(slot["step"]), "exp_avg": _array(slot["exp_avg"]),
                             "exp_avg_sq": _array(slot["exp_avg_sq"])}
    tree = {
        "settings": settings, "losses": state.losses, "elapsed_s": elapsed_s,
        "weights": {name: _array(p) for name, p in params.items()}, "moments": moments,
        "rng": torch.get_rng_state().numpy(),
        "stopper": None if stopper is None else {
            "history": [[s, loss] for s, loss in stopper.history], "best_step": stopper.best_step,
            "best_loss": stopper.best_loss if np.isfinite(stopper.best_loss) else None,
            "best_weights": None if stopper.best_weights is None
            else {n: _array(w) for n, w in stopper.best_weights.items()}},
    }
    atomic_write_state(path, tree)


def restore(path: Path, state: LoopState, stopper: Any | None, settings: dict[str, Any]) -> float:
    """Load `path` into `state` and `stopper`; refuses a checkpoint of other settings. Returns the
    training seconds the checkpoint had spent."""
    tree = read_state(path)
    if tree.get("settings") != settings:
        changed = sorted(_differences(tree.get("settings") or {}, settings))
        raise EssaError(f"{path} belongs to an SFT with other settings ({', '.join(changed)}); resume it with "
                        "the settings it was started with, or start again in another output_dir")
    params = trainable_parameters(state.model)
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(torch.from_numpy(tree["weights"][name]).to(param.dtype))
    for name, slot in tree["moments"].items():
        param = params[name]
        state.optimizer.state[param] = {
            "step": torch.tensor(slot["step"], dtype=torch.float32),
            "exp_avg": torch.from_numpy(slot["exp_avg"]).to(param.dtype),
            "exp_avg_sq": torch.from_numpy(slot["exp_avg_sq"]).to(param.dtype)}
    state.losses[:] = list(tree["losses"])
    torch.set_rng_state(torch.from_numpy(tree["rng"]))
    record = tree["stopper"]
    if stopper is not None and record is not None:
        stopper.history = [(int(s), float(loss)) for s, loss in record["history"]]
        stopper.best_step = int(record["best_step"])
        stopper.best_loss = float("inf") if record["best_loss"] is None else float(record["best_loss"])
        stopper.best_weights = (None if record["best_weights"] is None else
                                {n: torch.from_numpy(w).to(params[n].dtype) for n, w in record["best_weights"].items()})
    return float(tree["elapsed_s"])


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters training updates (the LoRA factors), by name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _array(tensor: torch.Tensor) -> np.ndarray:
    """float32 on the host: lossless for float32 and bfloat16 alike (numpy has no bfloat16)."""
    return tensor.detach().to("cpu", torch.float32).numpy().copy()


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    keys = set(old) | set(new)
    out = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out
