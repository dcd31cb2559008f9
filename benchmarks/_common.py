"""What the benchmark scripts share: progress lines, a random LoRA adapter, argument checks and
the entry point that prints the result as one JSON line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import peft
import torch

from essa.errors import EssaError

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def log(msg: str) -> None:
    """A timestamped progress line on stderr (stdout is kept for the JSON result)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def require_positive(parser: argparse.ArgumentParser, args: argparse.Namespace,
                     names: Iterable[str]) -> None:
    """Exit with a usage error unless every named integer option is >= 1 (or unset: None)."""
    for name in names:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")


def build_random_adapter(model: torch.nn.Module, path: Path, rank: int, lora_alpha: float,
                         b_std: float, seed: int) -> Path:
    """Save a PEFT LoRA adapter with random A (unit-norm rows on average) and small random B.

    The model is wrapped by PEFT only long enough to save, then unwrapped in place.
    """
    cfg = peft.LoraConfig(r=rank, lora_alpha=lora_alpha, target_modules=TARGETS,
                          lora_dropout=0.0, task_type="CAUSAL_LM")
    wrapped = peft.get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_A" in name:
                param.copy_(torch.randn(param.shape, generator=gen) / param.shape[1] ** 0.5)
            elif "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * b_std)
    wrapped.save_pretrained(str(path))
    wrapped.unload()
    return path


def json_main(run: Callable[[argparse.Namespace], dict[str, Any]], args: argparse.Namespace) -> int:
    """Run a benchmark and print its result as one JSON line; an EssaError is one line on stderr."""
    try:
        result = run(args)
    except EssaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0
