"""Test utilities: random (non-trivial) LoRA adapters and merged-weight reference models."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import peft
import torch

from essa.svd_space import SvdLoraSpace

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def make_random_adapter(model: torch.nn.Module, path: str | Path, rank: int = 4, lora_alpha: float = 8.0,
                        targets: list[str] | None = None, seed: int = 0, std: float = 0.3) -> Path:
    """Save a PEFT LoRA adapter for `model` with random A and B of standard deviation `std`
    (PEFT starts B at zero)."""
    cfg = peft.LoraConfig(r=rank, lora_alpha=lora_alpha, target_modules=targets or TARGETS,
                          lora_dropout=0.0, task_type="CAUSAL_LM")
    wrapped = peft.get_peft_model(copy.deepcopy(model), cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    wrapped.save_pretrained(str(path), save_embedding_layers=False)  # "auto" may query the hub
    return Path(path)


def merged_model(model: torch.nn.Module, space: SvdLoraSpace, z: np.ndarray) -> torch.nn.Module:
    """A copy of `model` with W + scale * B'A' merged into each adapted layer for candidate z."""
    merged = copy.deepcopy(model)
    modules = dict(merged.named_modules())
    factors = space.factors(z)
    with torch.no_grad():
        for pair in space.pairs:
            a, b = factors[pair.name]
            modules[pair.name].weight += pair.scale * (b.double() @ a.double()).float()
    return merged
