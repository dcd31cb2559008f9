"""SVD-GRPO: the gradient baseline restricted to ESSA's search space.

The policy's LoRA factors keep their frozen SVD; the only trainable parameters are offsets of the
top floor(alpha r) singular values of each factor, ESSA's search space in the paper's additive
form (essa.offsets: additive, no sharing; ESSA's own default offsets are relative). Each
factor weight is reparametrized as A' = A + U_A[:, :k] diag(d_A) V_A[:, :k]^T (likewise B), so
zero offsets give the SFT factors exactly and the optimizer (TRL's AdamW, weight decay 0) moves
only d. The paper reports that this restriction makes gradient training fail; `essa compare
grpo.svd_only=true` checks it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from essa.errors import EssaError
from essa.svd_space import SvdLoraSpace


class SingularValueOffsets(nn.Module):
    """Parametrization weight -> weight + U diag(offset) V^T with frozen U, V and trainable offset."""

    def __init__(self, u: torch.Tensor, v: torch.Tensor):
        super().__init__()
        self.register_buffer("u", u)
        self.register_buffer("v", v)
        self.offset = nn.Parameter(torch.zeros(u.shape[1], dtype=u.dtype, device=u.device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.u * self.offset) @ self.v.T


def restrict_to_singular_values(policy: nn.Module, space: SvdLoraSpace) -> list[nn.Parameter]:
    """Freeze every parameter of the PEFT `policy` and make the singular-value offsets trainable.

    Returns the offset parameters in the search space's layout (per module: d_A, then d_B).
    """
    for param in policy.parameters():
        param.requires_grad_(False)
    modules = dict(policy.base_model.model.named_modules())
    offsets = []
    for pair in space.pairs:
        layer = modules.get(pair.name)
        if layer is None or not hasattr(layer, "lora_A"):
            raise EssaError(f"SVD-GRPO: the policy has no LoRA layer at {pair.name}")
        k = pair.trainable
        for factor, u, v in (("lora_A", pair.u_a, pair.v_a), ("lora_B", pair.u_b, pair.v_b)):
            linear = getattr(layer, factor)["default"]
            dtype, device = linear.weight.dtype, linear.weight.device
            offsets_module = SingularValueOffsets(u[:, :k].to(device, dtype).contiguous(),
                                                  v[:, :k].to(device, dtype).contiguous())
            parametrize.register_parametrization(linear, "weight", offsets_module)
            offsets.append(offsets_module.offset)
    return offsets


def policy_factors(policy: nn.Module, space: SvdLoraSpace) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (A, B)} as the PEFT `policy` runs them now (parametrized weights included)."""
    modules = dict(policy.base_model.model.named_modules())
    out = {}
    for pair in space.pairs:
        layer = modules[pair.name]
        with torch.no_grad():
            a, b = (getattr(layer, factor)["default"].weight for factor in ("lora_A", "lora_B"))
        out[pair.name] = (a.detach().to("cpu", pair.a.dtype).clone(), b.detach().to("cpu", pair.b.dtype).clone())
    return out


def offsets_vector(offsets: list[nn.Parameter]) -> np.ndarray:
    """The current offsets as one search-space vector z (float64)."""
    return torch.cat([p.detach().double().cpu() for p in offsets]).numpy()
