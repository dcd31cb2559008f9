"""INT8 base weights: the base linears are quantized, the SVD-LoRA branch stays in float."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapters import make_random_adapter
from essa.backends.local import LocalBackend
from essa.config import GenerationConfig, load_config
from essa.errors import EssaError
from essa.population import PopulationLoraLinear
from essa.svd_space import SvdLoraSpace
from helpers import tiny_llama, tiny_tokenizer

torch.set_num_threads(1)


def row_logits(backend, population, ids, row=0):
    backend.population_model.set_population(population)
    with torch.no_grad(), backend.population_model.rows([row] * len(ids)):
        return backend.model(input_ids=ids).logits


def test_int8_backend_quantizes_base_and_keeps_branch_float(tmp_path):
    model = tiny_llama(seed=0)
    space = SvdLoraSpace.from_adapter(make_random_adapter(model, tmp_path / "a", rank=4), 1.0, model=model)
    gen = GenerationConfig(max_new_tokens=6, batch_size=8)
    fp32 = LocalBackend(model, tiny_tokenizer(), space, gen)
    int8 = LocalBackend(tiny_llama(seed=0), tiny_tokenizer(), space, gen, quantize="int8")
    layers = [m for m in int8.model.modules() if isinstance(m, PopulationLoraLinear)]
    assert layers and all(type(m.base).__module__.startswith("torch.ao.nn.quantized") for m in layers)
    assert all(m.v_a.dtype == torch.float32 for m in layers)

    population = np.random.default_rng(0).normal(0, 0.5, size=(2, space.dim))
    ids = torch.randint(5, 90, (1, 9), generator=torch.Generator().manual_seed(0))
    for cand in range(2):
        close = row_logits(int8, population, ids, cand) - row_logits(fp32, population, ids, cand)
        assert close.abs().max().item() < 0.05
    # The float branch still acts: two candidates give different outputs on the INT8 base.
    assert (row_logits(int8, population, ids, 0) - row_logits(int8, population, ids, 1)).abs().max() > 1e-3
    assert len(int8.evaluate(population, ["hi", "2+2="])) == 2


def test_int8_leaves_the_callers_model_in_float(tmp_path):
    model = tiny_llama(seed=0)
    space = SvdLoraSpace.from_adapter(make_random_adapter(model, tmp_path / "a", rank=4), 1.0, model=model)
    backend = LocalBackend(model, tiny_tokenizer(), space, GenerationConfig(), quantize="int8")
    assert backend.model is not model
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)


def test_unknown_quantization_is_rejected():
    with pytest.raises(EssaError, match="model.quantize"):
        load_config(overrides=["model.quantize=int3"])
    with pytest.raises(EssaError, match="unknown quantization"):
        LocalBackend(tiny_llama(), tiny_tokenizer(), None, GenerationConfig(), quantize="fp4")
