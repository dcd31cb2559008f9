"""The real bundled SmolLM2-135M-Instruct: SVD space, population runtime and PEFT agree on it."""

from __future__ import annotations

import numpy as np
import peft
import pytest
import torch

from adapters import make_random_adapter
from essa.backends.local import LocalBackend
from essa.config import DecodingConfig, ModelConfig, TaskConfig
from essa.models import load_model
from essa.population import PopulationModel
from essa.svd_space import SvdLoraSpace
from essa.tasks import format_prompt, get_task

pytestmark = pytest.mark.bundled


@pytest.fixture(scope="module")
def bundled():
    return load_model(ModelConfig())


@pytest.fixture(scope="module")
def adapter_dir(bundled, tmp_path_factory):
    model, _ = bundled
    # Small factors keep the adapted model close to the base, so its text stays sensible.
    path = make_random_adapter(model, tmp_path_factory.mktemp("bundled") / "adapter", rank=8, lora_alpha=16)
    return path


def test_svd_space_on_bundled_model(bundled, adapter_dir):
    model, _ = bundled
    space = SvdLoraSpace.from_adapter(adapter_dir, alpha=1.0, model=model)
    assert space.dim == 30 * 4 * 2 * 8  # layers x {q,k,v,o} x {A,B} x rank
    assert SvdLoraSpace.from_adapter(adapter_dir, alpha=0.5, model=model).dim == 30 * 4 * 2 * 4


def test_population_runtime_matches_peft_on_bundled_model(bundled, adapter_dir):
    model, tokenizer = bundled
    space = SvdLoraSpace.from_adapter(adapter_dir, alpha=1.0, model=model)
    z = np.random.default_rng(0).normal(0, 0.05, size=space.dim)
    exported = space.save_adapter(z, adapter_dir.parent / "exported")
    ids = tokenizer(["What is 17 + 25?"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        runtime = PopulationModel(model, space)
        try:
            runtime.set_population(np.stack([np.zeros(space.dim), z]))
            with runtime.rows([1]):
                ours = model(input_ids=ids).logits
        finally:
            runtime.remove()
        base = model(input_ids=ids).logits
        reference = peft.PeftModel.from_pretrained(model, str(exported))
        try:
            theirs = reference(input_ids=ids).logits
        finally:
            reference.unload()
    # 30 layers of fp32 arithmetic in a different order (SVD form vs B @ A) on logits of size ~20:
    # agreement to a few 1e-4, while the adapter itself moves the logits by far more.
    assert (ours - theirs).abs().max().item() < 1e-3
    assert (theirs - base).abs().max().item() > 0.1


def test_population_generation_on_bundled_model(bundled, adapter_dir):
    model, tokenizer = bundled
    task = get_task(TaskConfig(test_size=2))
    prompts = [format_prompt(tokenizer, task, ex) for ex in task.split("test")]
    space = SvdLoraSpace.from_adapter(adapter_dir, alpha=1.0, model=model)
    backend = LocalBackend(model, tokenizer, space, DecodingConfig(max_new_tokens=8, batch_size=8))
    try:
        completions = backend.evaluate(np.zeros((2, space.dim)), prompts)
    finally:
        backend.close()
    assert len(completions) == 2 and all(len(c) == 2 for c in completions)
    assert completions[0] == completions[1]  # identical candidates, identical greedy text
    assert all(text.strip() for text in completions[0])
