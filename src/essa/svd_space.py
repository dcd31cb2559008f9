"""The ESSA search space: singular values of each SVD-decomposed LoRA factor.

For every adapted linear layer with LoRA delta dW = scale * B A (B: m x r, A: r x n) each factor
is decomposed on its own, A = U_A diag(s_A) V_A^T and B = U_B diag(s_B) V_B^T. The singular
vectors are frozen; the top floor(alpha * r) singular values of each factor are trainable.

A candidate is a vector z of offsets. How an offset moves its singular value (`offsets`):
- "relative" (default): s' = s * exp(z). One step size fits every coordinate, however differently
  the factors are scaled (after a short SFT, A's singular values are ~0.5 and B's ~0.01-0.3, and a
  change of s_A moves dW in proportion to |B|); singular values stay positive.
- "additive" (the paper's form): s' = s + z.
Both are applied as A' = A + U_A diag(s' - s) V_A^T, so zero offsets give back the SFT factors
bit for bit.

Which singular values share one offset (`share`, a departure from the paper, which searches each
independently): "layers" gives the same module type and factor (q_proj's A, say) one offset in
every layer; "modules" gives the adapted modules of a layer (q, k, v and o, say) one offset;
"values" gives all trainable singular values of a factor one offset (with relative
offsets: the factor is scaled); "factors" gives A and B the same offsets (with relative offsets
and "values" as well, one offset z scales a module's LoRA delta B A by exp(2z), and no coordinate
is spent on moving A up and B down, which leaves B A unchanged). With "layers", `layer_groups`
splits the layers into that many contiguous blocks, each with its own offsets (early and late
layers of the demo's adapter want different scales:
docs/history/2026-12-02-es-signal-arithmetic.md). Sharing trades
expressiveness for a search space small enough for a small population to find its way in.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from essa.errors import EssaError
from essa.io import atomic_directory

OFFSET_MODES = ("relative", "additive")
SHARE_AXES = ("layers", "modules", "values", "factors")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_LAYER_INDEX = re.compile(r"\.\d+\.")  # "model.layers.7.self_attn" -> "model.layers.*.self_attn"


@dataclass
class SvdFactorPair:
    """Frozen SVD of one module's LoRA factors, computed in float64."""

    name: str  # module path in the base model, e.g. "model.layers.0.self_attn.q_proj"
    a: torch.Tensor  # original A (r, n), float32 as stored
    b: torch.Tensor  # original B (m, r)
    u_a: torch.Tensor  # (r, r)
    s_a: torch.Tensor  # (r,)
    v_a: torch.Tensor  # (n, r)
    u_b: torch.Tensor  # (m, r)
    s_b: torch.Tensor  # (r,)
    v_b: torch.Tensor  # (r, r)
    trainable: int  # floor(alpha * r) leading singular values of each factor
    scale: float  # LoRA scaling (lora_alpha / r, or / sqrt(r) for rsLoRA)

    @property
    def rank(self) -> int:
        return int(self.s_a.numel())

    @classmethod
    def decompose(cls, name: str, a: torch.Tensor, b: torch.Tensor, alpha: float, scale: float) -> SvdFactorPair:
        u_a, s_a, vh_a = torch.linalg.svd(a.double(), full_matrices=False)
        u_b, s_b, vh_b = torch.linalg.svd(b.double(), full_matrices=False)
        rank = a.shape[0]
        return cls(name, a, b, u_a, s_a, vh_a.T, u_b, s_b, vh_b.T, math.floor(alpha * rank + 1e-9), scale)

    def changes(self, z_a: torch.Tensor, z_b: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """s' - s of the trainable singular values of A and B for offsets z (..., k), float64."""
        k = self.trainable
        if mode == "relative":
            return self.s_a[:k] * torch.expm1(z_a), self.s_b[:k] * torch.expm1(z_b)
        return z_a, z_b

    def offset_factors(self, d_a: torch.Tensor, d_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A', B') for changes d = s' - s of the trainable singular values (float64 in, stored dtype out)."""
        k = self.trainable
        delta_a = (self.u_a[:, :k] * d_a) @ self.v_a[:, :k].T
        delta_b = (self.u_b[:, :k] * d_b) @ self.v_b[:, :k].T
        return (self.a.double() + delta_a).to(self.a.dtype), (self.b.double() + delta_b).to(self.b.dtype)


class SvdLoraSpace:
    """All adapted modules of one adapter, and the map offsets -> LoRA factors -> adapter dir.

    Internally every trainable singular value has its own slot, laid out module by module as
    [A's k values, B's k values]; `group[i]` is the search coordinate that slot i reads, so a
    candidate z has `dim` = number of groups entries (all slots distinct without sharing).
    """

    def __init__(self, pairs: list[SvdFactorPair], adapter_config: dict[str, Any], offsets: str = "relative",
                 share: tuple[str, ...] | list[str] = (), layer_groups: int = 1):
        if not pairs:
            raise EssaError("the adapter has no LoRA factors: nothing to search")
        if offsets not in OFFSET_MODES:
            raise EssaError(f"offsets must be one of {', '.join(OFFSET_MODES)} (got {offsets!r})")
        if not set(share) <= set(SHARE_AXES):
            raise EssaError(f"share takes {', '.join(SHARE_AXES)} (got {list(share)!r})")
        self.pairs = pairs
        self.adapter_config = adapter_config
        self.offsets = offsets
        self.share = tuple(a for a in SHARE_AXES if a in share)
        self.layer_groups = _check_layer_groups(pairs, self.share, layer_groups)
        self.starts = np.cumsum([0] + [2 * p.trainable for p in pairs])
        self.group = _group_index(pairs, self.share, self.layer_groups)

    @property
    def dim(self) -> int:
        return int(self.group.max()) + 1

    @property
    def slots(self) -> int:
        """Trainable singular values in all (the search dimension without sharing)."""
        return int(self.starts[-1])

    @property
    def rank(self) -> int:
        return self.pairs[0].rank

    def describe(self) -> str:
        k = self.pairs[0].trainable
        share = [f"layers (in {self.layer_groups} blocks)" if a == "layers" and self.layer_groups > 1 else a
                 for a in self.share]
        axes = ", ".join(share[:-1]) + " and " + share[-1] if len(share) > 1 else "".join(share)
        shared = f", shared across {axes}" if self.share else ""
        return (f"SVD-LoRA search space: {len(self.pairs)} modules x 2 factors x {k} trainable singular values "
                f"(rank {self.rank}), {self.offsets} offsets{shared} = {self.dim} dimensions")

    @classmethod
    def from_adapter(cls, adapter_dir: str | Path, alpha: float, model: torch.nn.Module | None = None,
                     offsets: str = "relative", share: tuple[str, ...] | list[str] = (),
                     layer_groups: int = 1) -> SvdLoraSpace:
        """Build the space from a PEFT LoRA adapter dir; with `model`, check it fits that model.

        `alpha` is essa.alpha, in (0, 1] (SearchConfig checks it); `offsets`, `share` and
        `layer_groups` as in the module docstring."""
        config, tensors = read_peft_adapter(adapter_dir)
        factors = _group_factors(tensors, adapter_dir)
        rank = int(config.get("r", 0))
        scale = _lora_scale(config, rank)
        if model is not None:
            check_adapter_fits_model(factors, model, adapter_dir)
            # Adapters saved from this space name the model it is loaded with (a portable name,
            # see models.name_model_portably), even when the source adapter named a local path.
            if model.__dict__.get("name_or_path"):
                config = {**config, "base_model_name_or_path": model.__dict__["name_or_path"]}
        pairs = []
        for name, (a, b) in factors.items():
            if a.shape[0] != rank or b.shape[1] != rank:
                raise EssaError(f"adapter {adapter_dir}: module {name} has rank {a.shape[0]} but "
                                f"adapter_config.json says r={rank}")
            if math.floor(alpha * rank + 1e-9) < 1:
                raise EssaError(f"essa.alpha={alpha} leaves no trainable singular value at rank {rank}")
            pairs.append(SvdFactorPair.decompose(name, a, b, alpha, scale))
        return cls(pairs, config, offsets=offsets, share=share, layer_groups=layer_groups)

    def changes(self, population: np.ndarray) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(lambda, dim) candidates -> per module the changes s' - s of its trainable singular
        values (d_A, d_B), each (lambda, k), float64."""
        population = np.atleast_2d(np.asarray(population, dtype=np.float64))
        if population.ndim != 2 or population.shape[1] != self.dim:
            raise EssaError(f"candidates have shape {population.shape}, the search space has {self.dim} dimensions")
        slots = torch.from_numpy(population[:, self.group])
        out = []
        for i, p in enumerate(self.pairs):
            lo, k = int(self.starts[i]), p.trainable
            out.append(p.changes(slots[:, lo:lo + k], slots[:, lo + k:lo + 2 * k], self.offsets))
        return out

    def factors(self, z: np.ndarray) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """One candidate (dim,) -> {module name: (A', B')} in the adapter's dtype."""
        z = np.asarray(z, dtype=np.float64)
        if z.shape != (self.dim,):
            raise EssaError(f"candidate has shape {z.shape}, the search space needs ({self.dim},)")
        return {p.name: p.offset_factors(d_a[0], d_b[0]) for p, (d_a, d_b) in zip(self.pairs, self.changes(z))}

    def singular_values(self, population: np.ndarray) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(lambda, dim) candidates -> per module full singular values (S_A, S_B), each (lambda, r), float64."""
        out = []
        for p, (d_a, d_b) in zip(self.pairs, self.changes(population)):
            s_a = p.s_a.expand(len(d_a), -1).clone()
            s_b = p.s_b.expand(len(d_b), -1).clone()
            s_a[:, :p.trainable] += d_a
            s_b[:, :p.trainable] += d_b
            out.append((s_a, s_b))
        return out

    def project(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The nearest point of this space to other LoRA factors of the same modules (e.g. a
        gradient-trained adapter from the same start): each factor's trainable singular values are
        refit by least squares on the frozen singular vectors (s_i = u_i^T A v_i), the rest keep
        their start values (a refit value may change sign, which only additive offsets reach). What the
        projection loses is what no offset vector can reach."""
        missing = sorted({p.name for p in self.pairs} - set(factors))
        if missing:
            raise EssaError(f"the factors to project lack {len(missing)} module(s) of this space, e.g. {missing[0]}")
        out = {}
        for p in self.pairs:
            a, b = (t.double() for t in factors[p.name])
            if a.shape != p.a.shape or b.shape != p.b.shape:
                raise EssaError(f"module {p.name}: factors {tuple(b.shape)} x {tuple(a.shape)} do not match this "
                                f"space's {tuple(p.b.shape)} x {tuple(p.a.shape)}")
            k = p.trainable
            fit_a = torch.einsum("ri,rc,ci->i", p.u_a[:, :k], a, p.v_a[:, :k])
            fit_b = torch.einsum("mi,mr,ri->i", p.u_b[:, :k], b, p.v_b[:, :k])
            out[p.name] = p.offset_factors(fit_a - p.s_a[:k], fit_b - p.s_b[:k])
        return out

    def save_adapter(self, z: np.ndarray, out_dir: str | Path) -> Path:
        """Write the candidate as a standard PEFT adapter dir (atomically)."""
        return self.save_factors(self.factors(z), out_dir)

    def save_factors(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], out_dir: str | Path) -> Path:
        """Write {module name: (A, B)} as a standard PEFT adapter dir with this adapter's config."""
        tensors = {}
        for name, (a, b) in factors.items():
            tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = a.contiguous()
            tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = b.contiguous()
        with atomic_directory(out_dir) as tmp:
            save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(self.adapter_config, indent=2) + "\n")
        return Path(out_dir)


def _layer_of(name: str) -> int | None:
    """The layer index in a module path ("model.layers.7.self_attn.q_proj" -> 7), None outside layers."""
    found = _LAYER_INDEX.search(name)
    return None if found is None else int(found.group(0).strip("."))


def _adapted_layers(pairs: list[SvdFactorPair]) -> list[int]:
    return sorted({_layer_of(p.name) for p in pairs} - {None})


def _check_layer_groups(pairs: list[SvdFactorPair], share: tuple[str, ...], layer_groups: int) -> int:
    if not isinstance(layer_groups, int) or layer_groups < 1:
        raise EssaError(f"layer_groups must be an integer >= 1 (got {layer_groups!r})")
    if layer_groups == 1:
        return 1
    if "layers" not in share:
        raise EssaError("layer_groups > 1 needs layers in share (without it every layer has its own offsets)")
    layers = _adapted_layers(pairs)
    if layer_groups > len(layers):
        raise EssaError(f"layer_groups={layer_groups} but the adapter spans {len(layers)} layers")
    return layer_groups


def _group_index(pairs: list[SvdFactorPair], share: tuple[str, ...], layer_groups: int = 1) -> np.ndarray:
    """The search coordinate of every singular-value slot, numbered in order of first use."""
    layers = _adapted_layers(pairs)
    rank = {layer: i for i, layer in enumerate(layers)}
    ids: dict[tuple, int] = {}
    out = []
    for p in pairs:
        layer = _layer_of(p.name)
        if "layers" in share:  # contiguous blocks of the adapted layers, sizes differing by at most one
            layer = None if layer is None else rank[layer] * layer_groups // len(layers)
        if "modules" in share:
            module = (layer, None)
        elif "layers" in share:
            module = (layer, _LAYER_INDEX.sub(".*.", p.name))
        else:
            module = p.name
        for factor in ("A", "B"):
            for j in range(p.trainable):
                key = (module, None if "factors" in share else factor, None if "values" in share else j)
                out.append(ids.setdefault(key, len(ids)))
    return np.asarray(out, dtype=np.int64)


def read_peft_adapter(adapter_dir: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    adapter_dir = Path(adapter_dir)
    cfg_path, weights_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    if not cfg_path.is_file() or not weights_path.is_file():
        raise EssaError(f"{adapter_dir} is not a PEFT adapter dir (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    try:
        config = json.loads(cfg_path.read_text())
        tensors = load_file(str(weights_path))
    except Exception as exc:  # noqa: BLE001 - corrupt user file: report it in one line
        raise EssaError(f"cannot read adapter {adapter_dir}: {type(exc).__name__}: {exc}") from exc
    if config.get("peft_type", "LORA") != "LORA":
        raise EssaError(f"adapter {adapter_dir} is a {config.get('peft_type')} adapter; ESSA needs LoRA")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise EssaError(f"adapter {adapter_dir} uses per-module rank/alpha patterns, which are not supported")
    _refuse_weights_beyond_lora_factors(config, tensors, adapter_dir)
    return config, tensors


def read_lora_factors(adapter_dir: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (A, B)} of a PEFT LoRA adapter dir, in model order."""
    _, tensors = read_peft_adapter(adapter_dir)
    return _group_factors(tensors, adapter_dir)


# Settings under which an adapter holds trained weights besides the LoRA factors A and B. ESSA
# searches, runs and exports only A and B, so such weights would be silently dropped.
_EXTRA_WEIGHTS = {
    "use_dora": "DoRA magnitude vectors (use_dora: true)",
    "modules_to_save": "fully trained modules_to_save",
    "lora_bias": "LoRA biases (lora_bias: true)",
}


def _refuse_weights_beyond_lora_factors(config: dict[str, Any], tensors: dict[str, torch.Tensor],
                                        adapter_dir: Any) -> None:
    found = [f"{what} {config[key]!r}" if key == "modules_to_save" else what
             for key, what in _EXTRA_WEIGHTS.items() if config.get(key)]
    if config.get("bias", "none") != "none":
        found.append(f"trained biases (bias: {config['bias']})")
    others = [key for key in tensors if not _is_lora_factor(key)]
    if others:
        found.append(f"{len(others)} tensor(s) that are not LoRA factors, e.g. {others[0]}")
    if found:
        raise EssaError(f"adapter {adapter_dir} holds weights ESSA would drop: {'; '.join(found)}. ESSA needs a "
                        "plain LoRA adapter (only lora_A / lora_B weights of linear layers)")


def _is_lora_factor(key: str) -> bool:
    # PEFT saves "<module>.lora_A.weight" (older versions "<module>.lora_A.<adapter name>.weight").
    parts = key.split(".")
    return parts[-1] == "weight" and ("lora_A" in parts[-3:-1] or "lora_B" in parts[-3:-1])


def _group_factors(tensors: dict[str, torch.Tensor], adapter_dir: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Pair lora_A / lora_B tensors by module name (PEFT key layout, with or without adapter name)."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in key:
                name = key.split(marker)[0].removeprefix(_PEFT_PREFIX)
                found.setdefault(name, {})[part] = value.float()
    factors = {}
    for name in sorted(found, key=_natural_key):
        parts = found[name]
        if set(parts) != {"lora_A", "lora_B"}:
            raise EssaError(f"adapter {adapter_dir}: module {name} lacks lora_A or lora_B weights")
        factors[name] = (parts["lora_A"], parts["lora_B"])
    return factors


def _natural_key(name: str) -> list[Any]:
    # "layers.10" sorts after "layers.9": modules in model order.
    return [int(t) if t.isdigit() else t for t in name.split(".")]


def _lora_scale(config: dict[str, Any], rank: int) -> float:
    if rank <= 0:
        raise EssaError("adapter_config.json has no positive rank 'r'")
    alpha = float(config.get("lora_alpha", rank))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def check_adapter_fits_model(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], model: torch.nn.Module,
                             adapter_dir: Any) -> None:
    modules = dict(model.named_modules())
    for name, (a, b) in factors.items():
        module = modules.get(name)
        if not isinstance(module, torch.nn.Linear):
            raise EssaError(f"adapter {adapter_dir} targets '{name}', which is not a linear layer of this "
                            f"model (was the adapter trained on another model?)")
        if a.shape[1] != module.in_features or b.shape[0] != module.out_features:
            raise EssaError(f"adapter {adapter_dir}: module {name} factors are {tuple(b.shape)} x {tuple(a.shape)} "
                            f"but the model's layer is {module.out_features} x {module.in_features}")
