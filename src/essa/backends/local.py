"""Local transformers/PyTorch backend: the population runtime driven by HF `generate`."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import transformers
from tqdm.auto import tqdm

from essa.backends import Backend, BackendInputs
from essa.config import Config, DecodingConfig
from essa.population import PopulationModel
from essa.quantize import quantize_base_
from essa.svd_space import SvdLoraSpace


class LocalBackend(Backend):
    """Evaluates a whole population in batched `generate` calls on one model in this process.

    Rows are (candidate, prompt) pairs, sorted by prompt length so a batch pads little; each
    row carries its own candidate's singular values. With `space=None` it runs the plain model.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, space: SvdLoraSpace | None,
                 decoding: DecodingConfig, progress: bool = False, quantize: str = "none"):
        if quantize != "none":
            model = copy.deepcopy(model)  # the caller keeps its float model
        self.model = model
        self.tokenizer = tokenizer
        self.space = space
        self.decoding = decoding
        self.progress = progress
        self.population_model = PopulationModel(model, space) if space is not None else None
        quantize_base_(model, quantize)  # after wrapping: the SVD-LoRA branch stays in float

    @classmethod
    def from_config(cls, cfg: Config, inputs: BackendInputs, progress: bool = False) -> LocalBackend:
        return cls(inputs.model, inputs.tokenizer, inputs.space, cfg.decoding, progress=progress,
                   quantize=cfg.model.quantize)

    def close(self) -> None:
        """Unwrap the model's layers again, so the caller gets its plain model back."""
        if self.population_model is not None:
            self.population_model.remove()
            self.population_model = None

    def evaluate(self, population: np.ndarray | None, prompts: list[str], seed: int = 0) -> list[list[str]]:
        n_cand = 1 if population is None else len(population)
        if self.population_model is not None:
            if population is None:
                population = np.zeros((1, self.space.dim))
            self.population_model.set_population(population)
        lengths = [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=False)["input_ids"]]
        rows = sorted(((lengths[p], p, c) for c in range(n_cand) for p in range(len(prompts))))
        out: list[list[str]] = [[""] * len(prompts) for _ in range(n_cand)]
        size = self.decoding.batch_size
        chunks = [rows[i:i + size] for i in range(0, len(rows), size)]
        for i, chunk in enumerate(tqdm(chunks, desc="generate", unit="batch", leave=False,
                                      disable=not self.progress or len(chunks) < 2)):
            texts = self.generate([prompts[p] for _, p, _ in chunk], [c for _, _, c in chunk], seed + i)
            for (_, p, c), text in zip(chunk, texts):
                out[c][p] = text
        return out

    @torch.inference_mode()
    def generate(self, prompts: list[str], candidate_of_row: list[int], seed: int = 0) -> list[str]:
        """One batched generate call; row i runs candidate `candidate_of_row[i]`."""
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        torch.manual_seed(seed)
        if self.population_model is None:
            ids = self.model.generate(**batch, generation_config=self._generation_config())
        else:
            with self.population_model.rows(candidate_of_row):
                ids = self.model.generate(**batch, generation_config=self._generation_config())
        new = ids[:, batch["input_ids"].shape[1]:]
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)

    def _generation_config(self) -> transformers.GenerationConfig:
        g = self.decoding
        sample = g.temperature > 0
        return transformers.GenerationConfig(
            max_new_tokens=g.max_new_tokens,
            do_sample=sample,
            temperature=g.temperature if sample else None,
            top_p=g.top_p if sample else None,
            top_k=None,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
