"""SVD-LoRA search space and the population-batched runtime against merged-weight references."""

from __future__ import annotations

import json
import sys
import threading

import numpy as np
import peft
import pytest
import torch
from safetensors.torch import load_file

from adapters import make_random_adapter, merged_model
from essa.backends.local import LocalBackend
from essa.config import DecodingConfig, SearchConfig
from essa.errors import EssaError
from essa import decoding, population
from essa.population import PopulationLoraLinear, PopulationModel
from essa.svd_space import SvdLoraSpace
from helpers import tiny_llama, tiny_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def base():
    return tiny_llama(seed=0)


@pytest.fixture(scope="module")
def adapter_dir(base, tmp_path_factory):
    return make_random_adapter(base, tmp_path_factory.mktemp("adapter") / "sft", rank=4)


def random_population(space: SvdLoraSpace, n: int, seed: int = 1, scale: float = 0.5) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, scale, size=(n, space.dim))


def test_dimension_follows_alpha(base, adapter_dir):
    full = SvdLoraSpace.from_adapter(adapter_dir, alpha=1.0, model=base)
    half = SvdLoraSpace.from_adapter(adapter_dir, alpha=0.5, model=base)
    n_modules = 2 * 4  # 2 layers x q, k, v, o
    assert len(full.pairs) == n_modules
    assert full.dim == n_modules * 2 * 4
    assert half.dim == n_modules * 2 * 2
    assert "dimensions" in full.describe()


@pytest.mark.parametrize("offsets, share", [("relative", ()), ("additive", ()), ("relative", ("layers", "values"))])
def test_zero_offsets_reproduce_sft_factors_exactly(base, adapter_dir, offsets, share):
    space = SvdLoraSpace.from_adapter(adapter_dir, alpha=1.0, model=base, offsets=offsets, share=share)
    stored = load_file(str(adapter_dir / "adapter_model.safetensors"))
    for name, (a, b) in space.factors(np.zeros(space.dim)).items():
        assert torch.equal(a, stored[f"base_model.model.{name}.lora_A.weight"])
        assert torch.equal(b, stored[f"base_model.model.{name}.lora_B.weight"])


@pytest.mark.parametrize("offsets", ["relative", "additive"])
def test_offsets_move_only_trainable_singular_values(base, adapter_dir, offsets):
    """Every module's A and B: the first k singular values move by their own offsets, the others
    and all singular vectors stay (A' = U_A diag(s') V_A^T exactly)."""
    space = SvdLoraSpace.from_adapter(adapter_dir, alpha=0.5, model=base, offsets=offsets)
    z = random_population(space, 1)[0]
    slots = torch.as_tensor(z[space.group])
    factors = space.factors(z)
    assert len(factors) == len(space.pairs) > 1
    for i, pair in enumerate(space.pairs):
        lo, k = int(space.starts[i]), pair.trainable
        assert 0 < k < pair.rank
        moved = factors[pair.name]
        for (u, s, v), new, offset in zip(((pair.u_a, pair.s_a, pair.v_a), (pair.u_b, pair.s_b, pair.v_b)), moved,
                                          (slots[lo:lo + k], slots[lo + k:lo + 2 * k])):
            expected = s.clone()
            expected[:k] = s[:k] * torch.exp(offset) if offsets == "relative" else s[:k] + offset
            assert torch.allclose(new.double(), (u * expected) @ v.T, atol=1e-5), pair.name


def test_relative_offsets_keep_singular_values_positive_and_scale_with_them(base, adapter_dir):
    space = SvdLoraSpace.from_adapter(adapter_dir, alpha=1.0, model=base, offsets="relative")
    z = np.full(space.dim, -4.0)  # additive offsets this large would flip signs
    for pair, (s_a, s_b) in zip(space.pairs, space.singular_values(z[None])):
        assert (s_a > 0).all() and (s_b > 0).all()
        assert torch.allclose(s_a[0], pair.s_a * np.exp(-4.0))
    additive = SvdLoraSpace.from_adapter(adapter_dir, alpha=1.0, model=base, offsets="additive")
    assert any((s_a < 0).any() for s_a, _ in additive.singular_values(z[None]))


def test_shared_offsets_are_the_unshared_space_with_tied_coordinates(base, adapter_dir):
    free = SvdLoraSpace.from_adapter(adapter_dir, alpha=0.5, model=base)
    by_type = SvdLoraSpace.from_adapter(adapter_dir, alpha=0.5, model=base, share=["layers"])
    per_factor = SvdLoraSpace.from_adapter(adapter_dir, alpha=0.5, model=base, share=["layers", "values"])
    assert (free.dim, by_type.dim, per_factor.dim) == (2 * 4 * 2 * 2, 4 * 2 * 2, 4 * 2)
    assert "shared across layers and values" in per_factor.describe()
    z = random_population(per_factor, 1)[0]
    # Layer 1's q_proj A reads the same coordinate as layer 0's: expand by hand in the free space.
    names = [p.name for p in free.pairs]
    expanded = np.concatenate([np.repeat(z[2 * (i % 4):2 * (i % 4) + 2], 2) for i in range(len(names))])
    for p, ((a1, b1), (a2, b2)) in zip(free.pairs, zip(per_factor.factors(z).values(), free.factors(expanded).values())):
        assert torch.equal(a1, a2) and torch.equal(b1, b2), p.name


def test_shared_factors_scale_each_module_type_delta(base, adapter_dir):
    space = SvdLoraSpace.from_adapter(adapter_dir, alpha=1.0, model=base, share=["layers", "values", "factors"])
    assert space.dim == 4  # q, k, v, o
    assert "shared across layers, values and factors" in space.describe()
    z = np.array([0.3, -0.2, 0.0, 0.5])
    types = list(dict.fromkeys(p.name.rsplit(".", 1)[-1] for p in space.pairs))  # coordinates in order of first use
    for pair, (a, b) in zip(space.pairs, space.factors(z).values()):
        c = z[types.index(pair.name.rsplit(".", 1)[-1])]
        assert torch.allclose(b @ a, np.exp(2 * c) * (pair.b @ pair.a), atol=1e-6), pair.name


def test_layer_groups_give_each_block_of_layers_its_own_module_scales(base, adapter_dir):
    space = SvdLoraSpace.from_adapter(adapter_dir, alpha=1.0, model=base, share=["layers", "values", "factors"],
                                      layer_groups=2)
    assert space.dim == 2 * 4  # 2 blocks (of one layer each) x q, k, v, o
    assert "shared across layers (in 2 blocks), values and factors" in space.describe()
    z = np.array([0.3, -0.2, 0.0, 0.5, -0.4, 0.1, 0.2, -0.1])
    types = list(dict.fromkeys(p.name.rsplit(".", 1)[-1] for p in space.pairs))
    for pair, (a, b) in zip(space.pairs, space.factors(z).values()):
        layer = int(pair.name.split(".layers.")[1].split(".")[0])
        c = z[4 * layer + types.index(pair.name.rsplit(".", 1)[-1])]
        assert torch.allclose(b @ a, np.exp(2 * c) * (pair.b @ pair.a), atol=1e-6), pair.name


def test_shared_modules_scale_each_layer_block_delta(base, adapter_dir):
    space = SvdLoraSpace.from_adapter(adapter_dir, alpha=1.0, model=base,
                                      share=["layers", "modules", "values", "factors"], layer_groups=2)
    assert space.dim == 2  # one scale per block of layers
    assert "shared across layers (in 2 blocks), modules, values and factors" in space.describe()
    z = np.array([0.3, -0.2])
    for pair, (a, b) in zip(space.pairs, space.factors(z).values()):
        layer = int(pair.name.split(".layers.")[1].split(".")[0])
        assert torch.allclose(b @ a, np.exp(2 * z[layer]) * (pair.b @ pair.a), atol=1e-6), pair.name
    per_layer = SvdLoraSpace.from_adapter(adapter_dir, alpha=1.0, model=base, share=["modules", "values"])
    assert per_layer.dim == 2 * 2  # 2 layers x (A, B)


def test_layer_groups_need_shared_layers_and_enough_layers(adapter_dir):
    with pytest.raises(EssaError, match="needs layers in share"):
        SvdLoraSpace.from_adapter(adapter_dir, 1.0, share=["values"], layer_groups=2)
    with pytest.raises(EssaError, match="spans 2 layers"):
        SvdLoraSpace.from_adapter(adapter_dir, 1.0, share=["layers"], layer_groups=3)
    with pytest.raises(EssaError, match="essa.layer_groups"):
        SearchConfig(share=["values"], layer_groups=2)


def test_projection_keeps_points_of_the_space_and_drops_what_it_cannot_reach(base, adapter_dir):
    space = SvdLoraSpace.from_adapter(adapter_dir, alpha=1.0, model=base)
    inside = space.factors(random_population(space, 1)[0])
    for name, (a, b) in space.project(inside).items():
        assert torch.allclose(a, inside[name][0], atol=1e-6) and torch.allclose(b, inside[name][1], atol=1e-6)
    # Swapping two of A's singular directions: only the diagonal of U^T A' V survives the projection.
    pair = space.pairs[0]
    rotated = pair.u_a[:, [1, 0, 2, 3]] @ torch.diag(pair.s_a) @ pair.v_a.T
    off = dict(inside, **{pair.name: (rotated.float(), pair.b)})
    a, b = space.project(off)[pair.name]
    expected = (pair.u_a * torch.diag(pair.u_a.T @ rotated @ pair.v_a)) @ pair.v_a.T
    assert torch.allclose(a.double(), expected, atol=1e-6) and torch.equal(b, pair.b)
    with pytest.raises(EssaError, match="lack 1 module"):
        space.project({n: f for n, f in inside.items() if n != pair.name})


def test_bad_offset_mode_or_share_axis_is_refused(adapter_dir):
    with pytest.raises(EssaError, match="offsets must be one of"):
        SvdLoraSpace.from_adapter(adapter_dir, 1.0, offsets="multiplicative")
    with pytest.raises(EssaError, match="share takes"):
        SvdLoraSpace.from_adapter(adapter_dir, 1.0, share=["heads"])


@pytest.mark.parametrize("offsets, share", [("relative", ()), ("additive", ()), ("relative", ("layers",))])
def test_mixed_population_logits_match_merged_weights(base, adapter_dir, offsets, share):
    space = SvdLoraSpace.from_adapter(adapter_dir, alpha=1.0, model=base, offsets=offsets, share=share)
    population = random_population(space, 3)
    ids = torch.randint(5, 90, (6, 7), generator=torch.Generator().manual_seed(0))
    candidate_of_row = [2, 0, 1, 1, 2, 0]
    runtime = PopulationModel(tiny_llama(seed=0), space)
    runtime.set_population(population)
    with torch.no_grad(), runtime.rows(candidate_of_row):
        logits = runtime.model(input_ids=ids).logits
    for row, cand in enumerate(candidate_of_row):
        reference = merged_model(base, space, population[cand])
        with torch.no_grad():
            ref = reference(input_ids=ids[row:row + 1]).logits[0]
        assert (logits[row] - ref).abs().max().item() < 1e-4


def test_each_thread_runs_the_rows_it_selected(base, adapter_dir):
    """The essa decoder runs batches on several threads: one thread's row selection must not leak into another's."""
    space = SvdLoraSpace.from_adapter(adapter_dir, alpha=1.0, model=base)
    runtime = PopulationModel(tiny_llama(seed=0), space)
    runtime.set_population(random_population(space, 2, seed=4))
    ids = torch.randint(5, 90, (2, 6), generator=torch.Generator().manual_seed(2))
    expected = []
    for cand in (0, 1):
        with torch.no_grad(), runtime.rows([cand, cand]):
            expected.append(runtime.model(input_ids=ids).logits)
    both_selected = threading.Barrier(2)
    got = [None, None]

    def work(cand):
        runtime.select_rows([cand, cand])
        both_selected.wait()  # the other thread has made its own selection by now
        with torch.no_grad():
            got[cand] = runtime.model(input_ids=ids).logits

    threads = [threading.Thread(target=work, args=(cand,)) for cand in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not torch.allclose(expected[0], expected[1])
    for cand in (0, 1):
        assert torch.equal(got[cand], expected[cand])
    runtime.clear_rows()  # clears every thread's selection: this thread runs the plain model
    with torch.no_grad():
        plain = runtime.model(input_ids=ids).logits
        assert torch.equal(plain, base(input_ids=ids).logits)


def test_selecting_rows_copies_the_row_index_to_the_device_once(base, adapter_dir, monkeypatch):
    """The decoder selects rows before every forward pass: a copy to a GPU per layer would wait for it each time."""
    space = SvdLoraSpace.from_adapter(adapter_dir, alpha=1.0, model=base)
    runtime = PopulationModel(tiny_llama(seed=0), space)
    runtime.set_population(random_population(space, 2, seed=4))
    copies, to = [], torch.Tensor.to

    def counted(self, *args, **kwargs):
        if sys._getframe(1).f_code.co_filename in (population.__file__, decoding.__file__):
            copies.append(args)
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", counted)
    runtime.select_rows([1, 0, 1])
    monkeypatch.undo()
    assert len(runtime.layers) == 8 and len(copies) == 1
    ids = torch.randint(5, 90, (3, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mixed = runtime.model(input_ids=ids).logits
        for row, cand in enumerate([1, 0, 1]):
            with runtime.rows([cand]):
                assert torch.allclose(mixed[row], runtime.model(input_ids=ids[row:row + 1]).logits[0], atol=1e-5)
    runtime.remove()


def test_batched_generation_equals_each_candidate_alone(base, adapter_dir):
    tok = tiny_tokenizer()
    gen = DecodingConfig(max_new_tokens=10, batch_size=16)
    space = SvdLoraSpace.from_adapter(adapter_dir, alpha=1.0, model=base)
    population = random_population(space, 4, seed=3)
    prompts = ["hello there", "2+2=", "a much longer prompt than the others", "x"]
    together = LocalBackend(tiny_llama(seed=0), tok, space, gen).evaluate(population, prompts)
    for cand in range(len(population)):
        alone = LocalBackend(merged_model(base, space, population[cand]), tok, None, gen)
        assert together[cand] == [alone.evaluate(None, [p])[0][0] for p in prompts]
    # Candidates really differ: otherwise the comparison above proves nothing.
    assert len({tuple(c) for c in together}) > 1


def test_exported_adapter_loads_in_peft_with_same_logits(base, adapter_dir, tmp_path):
    space = SvdLoraSpace.from_adapter(adapter_dir, alpha=1.0, model=base)
    z = random_population(space, 1, seed=5)[0]
    out = space.save_adapter(z, tmp_path / "exported")
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(seed=0), str(out)).eval()
    runtime = PopulationModel(tiny_llama(seed=0), space)
    runtime.set_population(z[None])
    ids = torch.randint(5, 90, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), runtime.rows([0, 0]):
        ours = runtime.model(input_ids=ids).logits
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_remove_restores_plain_linears(base, adapter_dir):
    space = SvdLoraSpace.from_adapter(adapter_dir, alpha=1.0, model=base)
    model = tiny_llama(seed=0)
    runtime = PopulationModel(model, space)
    assert sum(isinstance(m, PopulationLoraLinear) for m in model.modules()) == len(space.pairs)
    runtime.remove()
    assert not any(isinstance(m, PopulationLoraLinear) for m in model.modules())


@pytest.mark.parametrize("alpha", [0.0, -0.5, 1.5])
def test_alpha_outside_unit_interval_is_rejected(alpha):
    with pytest.raises(EssaError, match=r"essa.alpha must be in \(0, 1\]"):
        SearchConfig(alpha=alpha)


def test_alpha_leaving_no_trainable_singular_value_is_rejected(adapter_dir):
    with pytest.raises(EssaError, match="no trainable singular value at rank 4"):
        SvdLoraSpace.from_adapter(adapter_dir, alpha=0.2)


def test_adapter_for_other_targets_is_rejected(adapter_dir, tmp_path):
    other = tiny_llama(seed=0, hidden_size=48, heads=4, kv_heads=2)
    with pytest.raises(EssaError, match="model's layer is"):
        SvdLoraSpace.from_adapter(adapter_dir, alpha=1.0, model=other)
    gate_adapter = make_random_adapter(other, tmp_path / "gate", targets=["gate_proj"])
    renamed = tiny_llama(seed=0)
    renamed.model.layers[0].mlp.gate_proj = torch.nn.Identity()
    with pytest.raises(EssaError, match="not a linear layer"):
        SvdLoraSpace.from_adapter(gate_adapter, alpha=1.0, model=renamed)


def test_adapter_rank_disagreeing_with_its_config_is_rejected(adapter_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_model.safetensors").write_bytes((adapter_dir / "adapter_model.safetensors").read_bytes())
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["r"] = 8
    (bad / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(EssaError, match="rank 4"):
        SvdLoraSpace.from_adapter(bad, alpha=1.0)


def test_not_an_adapter_dir_is_rejected(tmp_path):
    with pytest.raises(EssaError, match="not a PEFT adapter"):
        SvdLoraSpace.from_adapter(tmp_path, alpha=1.0)


def _peft_adapter(path, **options):
    import copy

    cfg = peft.LoraConfig(**{"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM",
                             **options})
    peft.get_peft_model(copy.deepcopy(tiny_llama(seed=0)), cfg).save_pretrained(str(path))
    return path


@pytest.mark.parametrize("options, message", [
    ({"use_dora": True}, "DoRA magnitude vectors"),
    ({"modules_to_save": ["lm_head"]}, "fully trained modules_to_save ['lm_head']"),
    ({"lora_bias": True}, "LoRA biases"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, "not LoRA factors, e.g. base_model.model.model.embed_tokens"),
])
def test_adapters_with_weights_beyond_the_factors_are_refused(tmp_path, options, message):
    """DoRA, modules_to_save, LoRA biases and embedding LoRA carry trained weights the SVD space
    would drop at run time and on export: refused, naming what would be lost."""
    adapter = _peft_adapter(tmp_path / "adapter", **options)
    with pytest.raises(EssaError, match="holds weights ESSA would drop") as err:
        SvdLoraSpace.from_adapter(adapter, alpha=1.0, model=tiny_llama(seed=0))
    assert message in str(err.value)


def test_adapter_training_base_biases_is_refused(tmp_path):
    adapter = _peft_adapter(tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["bias"] = "lora_only"  # a model with biased linears would save them next to the factors
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(EssaError, match=r"trained biases \(bias: lora_only\)"):
        SvdLoraSpace.from_adapter(adapter, alpha=1.0)
    assert SvdLoraSpace.from_adapter(_peft_adapter(tmp_path / "plain"), alpha=1.0).dim == 2 * 2 * 2 * 2
