"""Linear weights pre-packed in oneDNN's blocked layout, swapped in while the essa decoder runs.

`nn.Linear` in fp32 on CPU multiplies through a BLAS call (MKL). At decoding's shapes (a hundred
or so rows against a 576 x 1536 weight, or a 49k-token output head) oneDNN's linear with a weight
packed once for its own kernels ran the same products 1.3-1.8x faster on an AMD EPYC, and MKL's own
pre-packed GEMM was not faster, so the gain is oneDNN's kernels more than the packing saved;
bf16, which already runs through oneDNN, gains less
(docs/history/2026-12-04-decoder-packed-weights.md). The products are the
same up to summation order.

Packing keeps a second copy of every packed weight, so it is done once and kept: `PackedLinears`
re-packs a weight only when the model's weight changed (a new tensor or an in-place update).
Only plain fp32 and bf16 `nn.Linear`s on CPU are packed; anything else (fp16, quantized, GPU) runs as is.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


PACKED_DTYPES = (torch.float32, torch.bfloat16)


def packing_available() -> bool:
    """Whether this PyTorch build has oneDNN's packed linear (x86 and aarch64 CPU builds do)."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


def packable(module: nn.Module) -> bool:
    """A plain fp32 or bf16 `nn.Linear` on CPU (subclasses, e.g. quantized or LoRA layers, keep their own forward)."""
    return (type(module) is nn.Linear and module.weight.dtype in PACKED_DTYPES
            and module.weight.device.type == "cpu")


class PackedLinear(nn.Module):
    """Runs `linear` with its weight packed for oneDNN; `weight` and the sizes stay the original's."""

    def __init__(self, linear: nn.Linear, rows_hint: int):
        super().__init__()
        self.linear = linear
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows_hint)
        self.source = _weight_key(linear.weight)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.linear.bias, "none", [], "")


class PackedLinears:
    """The packed forms of a model's packable linears, kept between uses and swapped in by `swapped_in()`."""

    def __init__(self, model: nn.Module, rows_hint: int):
        self.model = model
        self.rows_hint = rows_hint
        self._packed: dict[int, PackedLinear] = {}  # id(nn.Linear) -> its packed form

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Within the block the model's packable linears run packed; afterwards they are restored."""
        sites = [(parent, name, child) for parent in self.model.modules()
                 for name, child in parent.named_children() if packable(child)]
        self._packed = {id(child): self._fresh(child) for _, _, child in sites}
        try:
            for parent, name, child in sites:
                setattr(parent, name, self._packed[id(child)])
            yield
        finally:
            for parent, name, child in sites:
                setattr(parent, name, child)

    def _fresh(self, linear: nn.Linear) -> PackedLinear:
        packed = self._packed.get(id(linear))
        if packed is None or packed.linear is not linear or packed.source != _weight_key(linear.weight):
            packed = PackedLinear(linear, self.rows_hint)
        return packed


def _weight_key(weight: torch.Tensor) -> tuple[int, int]:
    """Changes when the weight is replaced or updated in place (an inference tensor cannot be updated)."""
    return weight.data_ptr(), -1 if weight.is_inference() else weight._version
