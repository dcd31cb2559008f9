"""What the methods of `essa compare` share: one start adapter (made here; every method, the
continued SFT included) and one prompt stream (ESSA and GRPO; the continued SFT reads the sft
split), verified after they ran; a comparison whose methods did not share them is void."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from essa.compare.results import MethodRun
from essa.config import Config, SearchConfig
from essa.errors import EssaError
from essa.schedule import prompt_stream, rechunk
from essa.svd_space import ADAPTER_WEIGHTS, SvdFactorPair, SvdLoraSpace


# -- the start adapter ----------------------------------------------------------------------------
def start_adapter(sft_adapter: Path, cfg: Config, root: Path) -> Path:
    """The adapter both methods start from: the SFT adapter, or (compare.svd_vectors: random) the
    same singular values with random singular vectors, saved in `root`."""
    compare = cfg.compare
    if compare.svd_vectors == "sft":
        return sft_adapter
    space = SvdLoraSpace.from_adapter(sft_adapter, 1.0)
    return randomize_singular_vectors(space, compare.seed).save_adapter(np.zeros(space.dim), root / "start_adapter")


def randomize_singular_vectors(space: SvdLoraSpace, seed: int) -> SvdLoraSpace:
    """The same factor shapes, singular values and trainable counts, with random orthonormal U and V."""
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for p in space.pairs:
        (r, n), (m, _) = p.a.shape, p.b.shape
        a = _orthonormal(r, r, gen) @ torch.diag(p.s_a) @ _orthonormal(n, r, gen).T
        b = _orthonormal(m, r, gen) @ torch.diag(p.s_b) @ _orthonormal(r, r, gen).T
        pairs.append(SvdFactorPair.decompose(p.name, a.to(p.a.dtype), b.to(p.b.dtype), p.trainable / p.rank,
                                             p.scale))
    return SvdLoraSpace(pairs, dict(space.adapter_config))


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """A (rows, cols) matrix with orthonormal columns, Haar-distributed (QR with sign fix)."""
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def same_adapter_tensors(dir_a: str | Path, dir_b: str | Path) -> bool:
    """True when two PEFT adapter dirs hold the same tensor names with bit-identical values."""
    from safetensors.torch import load_file

    a, b = load_file(str(Path(dir_a) / ADAPTER_WEIGHTS)), load_file(str(Path(dir_b) / ADAPTER_WEIGHTS))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- verified after the methods ran ---------------------------------------------------------------
# How an error names a method's run (by its record's `method`).
METHOD_NAMES = {"essa": "ESSA", "grpo": "GRPO", "sft_arm": "the continued SFT"}


def check_same_start(essa: MethodRun, *others: MethodRun) -> None:
    """Every method saved the tensors it started from: each must be bit-identical to ESSA's."""
    for other in others:
        if not same_adapter_tensors(essa.start_adapter, other.start_adapter):
            name = METHOD_NAMES.get(getattr(other, "method", ""), "another method")
            raise EssaError(f"ESSA and {name} started from different adapter tensors ({essa.start_adapter} vs "
                            f"{other.start_adapter}): the comparison is void")


def check_same_prompts(search: SearchConfig, n_train: int, per_step: int, essa: MethodRun,
                       grpo: MethodRun) -> None:
    """ESSA's generations and GRPO's steps (`per_step` prompts each) read the shared prompt stream,
    in order, and nothing else."""
    generations = max(essa.steps, -(-grpo.steps * per_step // min(search.prompts_per_generation, n_train)))
    stream = prompt_stream(search, n_train, generations)
    expected = {"ESSA": stream[:essa.steps], "GRPO": rechunk(stream, per_step)[:grpo.steps]}
    for (name, want), used in zip(expected.items(), (essa.prompts_used, grpo.prompts_used)):
        if used != want:
            step = next((k for k, (u, w) in enumerate(zip(used, want)) if u != w), min(len(used), len(want)))
            raise EssaError(f"{name} did not read the shared prompt stream (first difference at step {step}: "
                            f"{used[step] if step < len(used) else 'nothing'} instead of "
                            f"{want[step] if step < len(want) else 'nothing'}): the comparison is void")

