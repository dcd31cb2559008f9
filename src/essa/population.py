"""Population-batched SVD-LoRA runtime: many candidates in one batched forward pass.

With the SVD form of the factors the adapter branch of one layer is

    scale * U_B diag(s_B) (V_B^T U_A) diag(s_A) V_A^T x

The three matrices V_A, (V_B^T U_A) and U_B are shared by the whole population; only the two
diagonal scalings differ between candidates. `PopulationLoraLinear` therefore takes a per-row
table of singular values, so each batch row can belong to a different candidate at plain LoRA
cost: no merged weights, no adapter files, no reloads.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from torch import nn

from essa.decoding import host_to_device
from essa.svd_space import SvdFactorPair, SvdLoraSpace


class PopulationLoraLinear(nn.Module):
    """A frozen base linear layer plus an SVD-LoRA branch whose singular values vary per batch row.

    In a half-precision model the singular-value tables and the branch after its first projection
    stay in float32: bf16 spaces values near 0.5 about 0.002 apart, which would erase the small
    offsets candidates differ by. That costs little, as the branch has rank r.
    """

    def __init__(self, base: nn.Linear, pair: SvdFactorPair):
        super().__init__()
        self.base = base
        dtype, device = base.weight.dtype, base.weight.device
        branch = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
        self.register_buffer("v_a", pair.v_a.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("mid_t", (pair.v_b.T @ pair.u_a).T.contiguous().to(device=device, dtype=branch),
                             persistent=False)
        self.register_buffer("u_b_t", pair.u_b.T.contiguous().to(device=device, dtype=branch), persistent=False)
        self.scale = pair.scale
        # Per thread, the (rows, r) singular values of its current batch: the essa decoder runs
        # batches on several threads at once. A thread without an entry runs the plain base layer.
        self._rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def set_rows(self, s_a: torch.Tensor, s_b: torch.Tensor) -> None:
        """The calling thread's batch rows use these (rows, r) singular values."""
        self._rows[threading.get_ident()] = (s_a, s_b)

    def clear_rows(self) -> None:
        """Every thread runs the plain base layer again."""
        self._rows.clear()

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
        tables = self._rows.get(threading.get_ident())
        if tables is None:
            return y
        row_s_a, row_s_b = tables
        rows = row_s_a.shape[0]
        if x.dim() < 2 or x.shape[0] != rows:
            raise RuntimeError(f"input of shape {tuple(x.shape)} does not have the {rows} candidate rows that are set "
                               "as its first dimension")
        # (rows, r) -> (rows, 1, ..., 1, r): one table row per batch row, whatever lies in between.
        shape = (rows,) + (1,) * (x.dim() - 2) + (-1,)
        h = (x @ self.v_a).to(self.mid_t.dtype) * row_s_a.view(shape)
        h = (h @ self.mid_t) * row_s_b.view(shape)
        return y + (h @ self.u_b_t).to(y.dtype)


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
        """Precompute each candidate's singular values; rows pick from these by candidate index.

        Each layer keeps its table on its own device (a model may be split across devices).
        """
        self._tables = [
            (s_a.to(device=layer.mid_t.device, dtype=layer.mid_t.dtype),
             (s_b * layer.scale).to(device=layer.mid_t.device, dtype=layer.mid_t.dtype))
            for layer, (s_a, s_b) in zip(self.layers, self.space.singular_values(population))
        ]

    def select_rows(self, candidate_of_row: list[int] | np.ndarray) -> None:
        """From now on batch row i runs candidate `candidate_of_row[i]` of the population (in the calling thread)."""
        if self._tables is None:
            raise RuntimeError("call set_population() before selecting rows")
        index = torch.as_tensor(np.asarray(candidate_of_row), dtype=torch.long)
        on: dict[torch.device, torch.Tensor] = {}  # one copy per device, not one per layer (each would wait)
        for layer, (s_a, s_b) in zip(self.layers, self._tables):
            if s_a.device not in on:
                on[s_a.device] = host_to_device(index, s_a.device)
            rows = on[s_a.device]
            layer.set_rows(s_a.index_select(0, rows), s_b.index_select(0, rows))

    def clear_rows(self) -> None:
        """Back to the plain base model in every layer, for every thread."""
        for layer in self.layers:
            layer.clear_rows()

    @contextmanager
    def rows(self, candidate_of_row: list[int] | np.ndarray) -> Iterator[None]:
        """Within the block, batch row i runs candidate `candidate_of_row[i]` of the population."""
        self.select_rows(candidate_of_row)
        try:
            yield
        finally:
            self.clear_rows()

    def remove(self) -> nn.Module:
        """Unwrap the layers again and return the plain model."""
        modules = dict(self.model.named_modules())
        for pair, layer in zip(self.space.pairs, self.layers):
            parent_name, _, child = pair.name.rpartition(".")
            parent = modules[parent_name] if parent_name else self.model
            setattr(parent, child, layer.base)
        self.layers = []
        return self.model
