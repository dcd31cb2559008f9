"""SVD-GRPO: gradient steps move only the singular-value offsets ESSA searches."""

from __future__ import annotations

import numpy as np
import peft
import torch
from adapters import make_random_adapter
from helpers import tiny_llama, tiny_tokenizer
from safetensors.torch import load_file

from essa.config import load_config
from essa.grpo import run_grpo
from essa.svd_grpo import offsets_vector, restrict_to_singular_values
from essa.svd_space import SvdLoraSpace
from essa.tasks import Example, Task

torch.set_num_threads(1)


class VowelTask(Task):
    """Graded reward (share of vowels), so GRPO groups have non-zero advantages."""

    name = "vowels"

    def split(self, name):
        offset = {"sft": 0, "train": 100, "validation": 200, "test": 300}[name]
        return [Example(prompt=f"say {offset + i}", answer=None) for i in range(8 if name == "train" else 2)]

    def reward(self, completion, example):
        return sum(c in "aeiou" for c in completion) / max(len(completion), 1)


def factors(path):
    tensors = load_file(str(path / "adapter_model.safetensors"))
    return {k: v.double() for k, v in tensors.items()}


def test_svd_grpo_changes_only_the_searched_singular_values(tmp_path):
    """The snapshot holds the factors the trained policy computes with (its parametrized weights),
    so a gradient that reached anything but the offsets would show up here."""
    model = tiny_llama(seed=0)
    adapter = make_random_adapter(model, tmp_path / "sft", rank=4)
    cfg = load_config(overrides=["decoding.max_new_tokens=4", "essa.prompts_per_generation=2", "essa.alpha=0.5",
                                 "grpo.num_generations=2", "grpo.lr=0.05", "grpo.svd_only=true",
                                 "compare.budget_s=600", "compare.max_steps=3"])
    result = run_grpo(model, tiny_tokenizer(), VowelTask(), adapter, cfg, tmp_path / "out", progress=False)
    assert result.steps == 3
    space = SvdLoraSpace.from_adapter(adapter, alpha=0.5, offsets="additive")
    start, last = factors(adapter), factors(tmp_path / "out" / "snapshots" / "step00003")
    moved = 0.0
    for pair in space.pairs:
        prefix = f"base_model.model.{pair.name}"
        for factor, u, v in (("lora_A", pair.u_a, pair.v_a), ("lora_B", pair.u_b, pair.v_b)):
            delta = last[f"{prefix}.{factor}.weight"] - start[f"{prefix}.{factor}.weight"]
            in_basis = u.T @ delta @ v  # the change seen in the frozen singular vectors
            diag = torch.diagonal(in_basis).clone()
            # Only the top floor(alpha r) = 2 singular values moved; vectors and the rest did not.
            assert torch.allclose(in_basis - torch.diag(diag), torch.zeros_like(in_basis), atol=1e-6)
            assert torch.allclose(diag[2:], torch.zeros(2, dtype=diag.dtype), atol=1e-6)
            assert torch.allclose(delta, u @ in_basis @ v.T, atol=1e-6)  # nothing outside the span
            moved = max(moved, float(diag.abs().max()))
    assert moved > 1e-4
    # The caller's model comes back without LoRA layers.
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)


def test_restricted_policy_runs_the_factors_of_its_offset_vector(tmp_path):
    model = tiny_llama(seed=0)
    adapter = make_random_adapter(model, tmp_path / "sft", rank=4)
    space = SvdLoraSpace.from_adapter(adapter, alpha=0.5, offsets="additive")
    policy = peft.PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    offsets = restrict_to_singular_values(policy, space)
    assert [p.numel() for p in offsets] == [2] * (2 * len(space.pairs))
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == {
        n for n, p in policy.named_parameters() if n.endswith(".offset")}
    z = np.random.default_rng(0).normal(0, 0.3, space.dim)
    with torch.no_grad():
        for param, value in zip(offsets, np.split(z, len(offsets))):
            param.copy_(torch.from_numpy(value))
    assert np.allclose(offsets_vector(offsets), z, atol=1e-6)  # float32 parameters
    modules = dict(policy.base_model.model.named_modules())
    for name, (a, b) in space.factors(z).items():
        assert torch.allclose(modules[name].lora_A["default"].weight, a, atol=1e-6)
        assert torch.allclose(modules[name].lora_B["default"].weight, b, atol=1e-6)
