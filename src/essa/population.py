"""Population-batched SVD-LoRA runtime: many candidates in one batched forward pass.

With the SVD form of the factors the adapter branch of one layer is

    scale * U_B diag(s_B) (V_B^T U_A) diag(s_A) V_A^T x

The three matrices V_A, (V_B^T U_A) and U_B are shared by the whole population; only the two
diagonal scalings differ between candidates. `PopulationLoraLinear` therefore takes a per-row
table of singular values, so each batch row can belong to a different candidate at plain LoRA
cost: no merged weights, no adapter files, no reloads.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from torch import nn

from essa.svd_space import SvdFactorPair, SvdLoraSpace


class PopulationLoraLinear(nn.Module):
    """A frozen base linear layer plus an SVD-LoRA branch whose singular values vary per batch row."""

    def __init__(self, base: nn.Linear, pair: SvdFactorPair):
        super().__init__()
        self.base = base
        dtype, device = base.weight.dtype, base.weight.device
        self.register_buffer("v_a", pair.v_a.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("mid_t", (pair.v_b.T @ pair.u_a).T.contiguous().to(device=device, dtype=dtype),
                             persistent=False)
        self.register_buffer("u_b_t", pair.u_b.T.contiguous().to(device=device, dtype=dtype), persistent=False)
        self.scale = pair.scale
        # (rows, r) singular values for the current batch; None runs the plain base layer.
        self.row_s_a: torch.Tensor | None = None
        self.row_s_b: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.row_s_a is None:
            return y
        if x.shape[0] != self.row_s_a.shape[0]:
            raise RuntimeError(f"batch has {x.shape[0]} rows but {self.row_s_a.shape[0]} candidate rows are set")
        h = (x @ self.v_a) * self.row_s_a[:, None, :]
        h = (h @ self.mid_t) * self.row_s_b[:, None, :]
        return y + h @ self.u_b_t


class PopulationModel:
    """A causal LM whose adapted layers are `PopulationLoraLinear`s, plus per-row candidate control.

    The model object is modified in place (its target linears are wrapped); `remove()` restores it.
    """

    def __init__(self, model: nn.Module, space: SvdLoraSpace):
        self.model = model
        self.space = space
        self.layers: list[PopulationLoraLinear] = []
        modules = dict(model.named_modules())
        for pair in space.pairs:
            parent_name, _, child = pair.name.rpartition(".")
            parent = modules[parent_name] if parent_name else model
            layer = PopulationLoraLinear(getattr(parent, child), pair)
            setattr(parent, child, layer)
            self.layers.append(layer)
        self._tables: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def set_population(self, population: np.ndarray) -> None:
        """Precompute each candidate's singular values; rows pick from these by candidate index."""
        dtype = self.layers[0].v_a.dtype
        device = self.layers[0].v_a.device
        self._tables = [
            (s_a.to(device=device, dtype=dtype), (s_b * layer.scale).to(device=device, dtype=dtype))
            for layer, (s_a, s_b) in zip(self.layers, self.space.singular_values(population))
        ]

    @contextmanager
    def rows(self, candidate_of_row: list[int] | np.ndarray) -> Iterator[None]:
        """Within the block, batch row i runs candidate `candidate_of_row[i]` of the population."""
        if self._tables is None:
            raise RuntimeError("call set_population() before rows()")
        index = torch.as_tensor(np.asarray(candidate_of_row), dtype=torch.long)
        for layer, (s_a, s_b) in zip(self.layers, self._tables):
            layer.row_s_a = s_a.index_select(0, index.to(s_a.device))
            layer.row_s_b = s_b.index_select(0, index.to(s_b.device))
        try:
            yield
        finally:
            for layer in self.layers:
                layer.row_s_a = layer.row_s_b = None

    def remove(self) -> nn.Module:
        """Unwrap the layers again and return the plain model."""
        modules = dict(self.model.named_modules())
        for pair, layer in zip(self.space.pairs, self.layers):
            parent_name, _, child = pair.name.rpartition(".")
            parent = modules[parent_name] if parent_name else self.model
            setattr(parent, child, layer.base)
        self.layers = []
        return self.model
