"""Weight-only INT8 / INT4 base layers: the base linears are quantized, the SVD-LoRA branch stays in float."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from adapters import make_random_adapter
from essa.backends.local import LocalBackend
from essa.config import DecodingConfig, load_config
from essa.errors import EssaError
from essa.population import PopulationLoraLinear
from essa.quantize import Int4WeightOnlyLinear, Int8Linear, quantize_base_
from essa.svd_space import SvdLoraSpace
from helpers import tiny_llama, tiny_tokenizer

torch.set_num_threads(1)

LAYER = {"int8": Int8Linear, "int4": Int4WeightOnlyLinear}


def quant_llama(seed=0):
    # int4 packs groups of 32 inputs: every linear's in_features must be a multiple of 32.
    return tiny_llama(seed=seed, hidden_size=64, heads=4, kv_heads=2, intermediate=128)


def row_logits(backend, population, ids, row=0):
    backend.population_model.set_population(population)
    with torch.no_grad(), backend.population_model.rows([row] * len(ids)):
        return backend.model(input_ids=ids).logits


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_backend_keeps_the_branch_float_and_close_to_fp32(tmp_path, method):
    model = quant_llama()
    space = SvdLoraSpace.from_adapter(make_random_adapter(model, tmp_path / "a", rank=4), 1.0, model=model)
    gen = DecodingConfig(max_new_tokens=6, batch_size=8)
    fp32 = LocalBackend(model, tiny_tokenizer(), space, gen)
    quant = LocalBackend(quant_llama(), tiny_tokenizer(), space, gen, quantize=method)
    layers = [m for m in quant.model.modules() if isinstance(m, PopulationLoraLinear)]
    assert layers and all(isinstance(m.base, LAYER[method]) for m in layers)
    assert all(m.v_a.dtype == torch.float32 for m in layers)
    assert isinstance(quant.model.lm_head, nn.Linear)  # the head stays float

    population = np.random.default_rng(0).normal(0, 0.5, size=(2, space.dim))
    ids = torch.randint(5, 90, (1, 9), generator=torch.Generator().manual_seed(0))
    tolerance = {"int8": 0.05, "int4": 0.5}[method]
    for cand in range(2):
        diff = row_logits(quant, population, ids, cand) - row_logits(fp32, population, ids, cand)
        assert 0 < diff.abs().max().item() < tolerance
    # The float branch still acts: two candidates give different outputs on the quantized base.
    assert (row_logits(quant, population, ids, 0) - row_logits(quant, population, ids, 1)).abs().max() > 1e-3
    assert len(quant.evaluate(population, ["hi", "2+2="])) == 2


def test_int8_layer_quantizes_each_token_on_its_own_scale():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    q = Int8Linear(linear)
    x = torch.randn(2, 3, 64)
    x[0, 0] *= 1000.0  # an outlier token must not flatten the others
    err = (q(x) - linear(x)).abs().amax(dim=-1) / linear(x).abs().amax(dim=-1)
    assert err.max() < 0.03
    assert q.qweight_t.dtype == torch.int8 and q(x).dtype == torch.float32


def relative_error(layer, reference, x):
    with torch.no_grad():
        y = reference(x)
        return float((layer(x) - y).abs().max() / y.abs().max())


def test_int4_keeps_weights_already_on_a_4bit_grid():
    """GGUF Q4_1 weights (w = q * scale + min per 32 inputs) lose only bf16 rounding in int4;
    the same weights moved off the grid lose about ten times more."""
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (48, 64), generator=gen).float()
    codes[:, ::32] = 0  # every group spans the full 0..15 range, as Q4_1 quantization gives
    codes[:, 1::32] = 15
    scale = torch.rand(48, 2, 1, generator=gen) * 0.01 + 0.001
    low = torch.randn(48, 2, 1, generator=gen) * 0.05
    on_grid, off_grid = nn.Linear(64, 48), nn.Linear(64, 48)
    with torch.no_grad():
        on_grid.weight.copy_((codes.reshape(48, 2, 32) * scale + low).reshape(48, 64))
        off_grid.weight.copy_(on_grid.weight + torch.randn(48, 64, generator=gen) * 0.003)
    x = torch.randn(7, 64, generator=gen)
    on_error = relative_error(Int4WeightOnlyLinear(on_grid), on_grid, x)
    assert on_error < 0.01
    assert relative_error(Int4WeightOnlyLinear(off_grid), off_grid, x) > 3 * on_error


def test_quantization_leaves_the_callers_model_in_float(tmp_path):
    model = quant_llama()
    space = SvdLoraSpace.from_adapter(make_random_adapter(model, tmp_path / "a", rank=4), 1.0, model=model)
    backend = LocalBackend(model, tiny_tokenizer(), space, DecodingConfig(), quantize="int8")
    assert backend.model is not model
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)


def test_int4_rejects_layers_it_cannot_group():
    with pytest.raises(EssaError, match="divisible by 32"):
        quantize_base_(tiny_llama(hidden_size=48, heads=4, kv_heads=2), "int4")


def test_unknown_quantization_is_rejected():
    with pytest.raises(EssaError, match="model.quantize"):
        load_config(overrides=["model.quantize=int3"])
    with pytest.raises(EssaError, match="unknown quantization"):
        LocalBackend(tiny_llama(), tiny_tokenizer(), None, DecodingConfig(), quantize="fp4")
