"""INT8 / INT4 base layers for the CPU population runtime.

Only the base model's linear layers change; the SVD-LoRA branch stays in float, so ESSA still
searches the same float singular values. Both use PyTorch's own CPU kernels (no extra package):

- int8: weights int8 with one scale per output channel, activations quantized per token on the
  fly, int8 x int8 -> int32 products (`torch._int_mm`). Faster than fp32 matmuls at population
  batch sizes. (PyTorch's weight-only int8 kernel is slower than fp32 there, and its dynamic
  per-tensor quantization loses most of a 135M model's accuracy.)
- int4: weight-only, groups of 32 inputs with a scale and a minimum each (w = q * scale + min,
  q in 0..15); `torch._weight_int4pack_mm_for_cpu`, fast with bf16 activations. This is the
  layout of GGUF's Q4_1, the format the bundled SmolLM2 ships in.

The output head stays in float: its error lands directly on the token scores.
"""

from __future__ import annotations

import torch
from torch import nn

from essa.config import QUANTIZE_METHODS
from essa.errors import EssaError

INT4_GROUP = 32
_INT4_INNER_K_TILES = 2


class _QuantizedLinear(nn.Module):
    """Shared by both formats: flatten the leading dims, multiply, restore them, add the float bias."""

    in_features: int
    out_features: int
    bias: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x.reshape(-1, self.in_features))
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def _matmul(self, flat: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Int8Linear(_QuantizedLinear):
    """y = x W^T + b in int8 arithmetic: W int8 per output channel, x quantized per token on the fly.

    Per-token (per-row) activation scales keep the large activation outliers of small LLMs from
    flattening every other token, which per-tensor dynamic quantization does.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # (in, out) with column-major storage: the layout torch._int_mm runs fastest on CPU.
        qweight = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("qweight_t", qweight.contiguous().t())
        self.register_buffer("scales", scale)
        self.bias = linear.bias

    def _matmul(self, flat: torch.Tensor) -> torch.Tensor:
        flat = flat.float()
        row_scale = flat.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12).div_(127.0)
        q = torch.round(flat / row_scale).to(torch.int8)
        return torch._int_mm(q, self.qweight_t).float().mul_(row_scale).mul_(self.scales)


class Int4WeightOnlyLinear(_QuantizedLinear):
    """y = x W^T + b with W in 4-bit groups of 32 inputs (scale and minimum per group)."""

    def __init__(self, linear: nn.Linear, group_size: int = INT4_GROUP):
        super().__init__()
        if linear.in_features % group_size:
            raise EssaError(f"int4 needs in_features divisible by {group_size} (a layer has {linear.in_features})")
        w = linear.weight.detach().float()
        groups = w.reshape(w.shape[0], -1, group_size)
        low, high = groups.amin(dim=2), groups.amax(dim=2)
        scale = ((high - low) / 15.0).clamp(min=1e-12)
        q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
        self.in_features, self.out_features, self.group_size = linear.in_features, linear.out_features, group_size
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(
            q.reshape(w.shape), _INT4_INNER_K_TILES))
        # The kernel computes (q - 8) * scale + zero per group: zero = min + 8 * scale.
        zero = low + 8.0 * scale
        self.register_buffer("scale_and_zero", torch.stack([scale.T, zero.T], dim=2).to(torch.bfloat16).contiguous())
        self.bias = linear.bias

    def _matmul(self, flat: torch.Tensor) -> torch.Tensor:
        # The kernel is fast with bf16 activations only (fp32 takes a reference path ~50x slower).
        return torch._weight_int4pack_mm_for_cpu(flat.to(torch.bfloat16), self.packed, self.group_size,
                                                 self.scale_and_zero)


_LAYERS = {"int8": Int8Linear, "int4": Int4WeightOnlyLinear}


def quantize_base_(model: nn.Module, method: str) -> nn.Module:
    """Replace every nn.Linear of `model` but the output head by its `method` version.

    Called after the population layers are installed, it swaps each wrapped base layer and
    leaves the SVD-LoRA branch (plain float buffers) as it is.
    """
    if method == "none":
        return model
    if method not in _LAYERS:
        raise EssaError(f"unknown quantization '{method}' (choose one of {', '.join(QUANTIZE_METHODS)})")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and module is not head]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _LAYERS[method](linear))
    return model
