"""Measure this machine's generation and forward-backward throughputs for `essa plan --calibrate`.

Both are tokens per second of one process on the configured model (the bundled one by default):
generation counts generated tokens of a batched greedy `generate`; forward-backward counts the
tokens of one LoRA training step (what a gradient method pays per rollout token).
"""

from __future__ import annotations

import sys
import time

import peft
import torch

from essa.config import ModelConfig, TaskConfig
from essa.models import load_model
from essa.tasks import format_prompt, get_task


def measure_throughputs(model: ModelConfig | None = None, batch: int = 16,
                        new_tokens: int = 32) -> tuple[float, float]:
    """(generation tokens/s, forward-backward tokens/s) on `model`, from one short run each."""
    base, tokenizer = load_model(model or ModelConfig())
    task = get_task(TaskConfig(test_size=batch))
    prompts = [format_prompt(tokenizer, task, ex) for ex in task.split("test")]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    print(f"[essa] calibrating on {batch} prompts x {new_tokens} tokens", file=sys.stderr, flush=True)
    return _generation_rate(base, tokenizer, inputs, new_tokens), _forward_backward_rate(base, inputs)


@torch.inference_mode()
def _generation_rate(model: torch.nn.Module, tokenizer, inputs: dict, new_tokens: int) -> float:
    t0 = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    generated = (out.shape[1] - inputs["input_ids"].shape[1]) * out.shape[0]
    return generated / (time.perf_counter() - t0)


def _forward_backward_rate(model: torch.nn.Module, inputs: dict) -> float:
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    wrapped = peft.get_peft_model(model, config)
    try:
        t0 = time.perf_counter()
        loss = wrapped(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        elapsed = time.perf_counter() - t0
    finally:
        wrapped.unload()
    return int(inputs["attention_mask"].sum()) / elapsed
