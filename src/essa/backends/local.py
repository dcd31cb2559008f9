"""Local transformers/PyTorch backend: the population runtime in this process."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import transformers
from tqdm.auto import tqdm

from essa.backends import Backend, BackendInputs, row_seed
from essa.config import DECODING_ENGINES, Config, DecodingConfig
from essa.decoding import BatchDecoder, DecodeResult, DecodeSettings
from essa.models import before_eos, eos_token_ids
from essa.population import PopulationModel
from essa.quantize import quantize_base_
from essa.svd_space import SvdLoraSpace


class LocalBackend(Backend):
    """Evaluates a whole population on one model in this process; each batch row carries its own
    candidate's singular values. With `space=None` it runs the plain model.

    `decoding.engine: essa` decodes with `essa.decoding.BatchDecoder` (shared prompt prefix per
    candidate, finished rows leave the batch, one seeded random stream per row); `generate` is the
    reference path through HF `generate`, rows sorted by prompt length.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, space: SvdLoraSpace | None,
                 decoding: DecodingConfig, progress: bool = False, quantize: str = "none"):
        if decoding.engine not in DECODING_ENGINES:
            raise ValueError(f"unknown decoding engine {decoding.engine!r}")
        if quantize != "none":
            model = copy.deepcopy(model)  # the caller keeps its float model
        self.model = model
        self.tokenizer = tokenizer
        self.space = space
        self.decoding = decoding
        self.progress = progress
        self.population_model = PopulationModel(model, space) if space is not None else None
        quantize_base_(model, quantize)  # after wrapping: the SVD-LoRA branch stays in float
        select = self.population_model.select_rows if self.population_model is not None else None
        self.decoder = BatchDecoder(model, self._decode_settings(), select_rows=select,
                                    pad_token_id=tokenizer.pad_token_id)
        # The decoder's result of the latest evaluation (tokens and work counters; engine essa only).
        self.last_decode: DecodeResult | None = None

    @classmethod
    def from_config(cls, cfg: Config, inputs: BackendInputs, progress: bool = False) -> LocalBackend:
        return cls(inputs.model, inputs.tokenizer, inputs.space, cfg.decoding, progress=progress,
                   quantize=cfg.model.quantize)

    def close(self) -> None:
        """Unwrap the model's layers again, so the caller gets its plain model back."""
        if self.population_model is not None:
            self.population_model.remove()
            self.population_model = None

    def evaluate(self, population: np.ndarray | None, prompts: list[str], seed: int = 0,
                 candidate_offset: int = 0, prompt_offset: int = 0) -> list[list[str]]:
        n_cand = 1 if population is None else len(population)
        if self.population_model is not None:
            if population is None:
                population = np.zeros((1, self.space.dim))
            self.population_model.set_population(population)
        ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        rows = [(c, p) for c in range(n_cand) for p in range(len(prompts))]
        out: list[list[str]] = [[""] * len(prompts) for _ in range(n_cand)]
        self.last_decode = None
        try:
            if self.decoding.engine == "essa":
                seeds = [row_seed(seed, c + candidate_offset, p + prompt_offset) for c, p in rows]
                texts = self._decode(ids, rows, seeds)
            else:
                texts = self._generate_all(prompts, ids, rows, seed)
        finally:
            if self.population_model is not None:
                self.population_model.clear_rows()
        for (c, p), text in zip(rows, texts):
            out[c][p] = text
        return out

    def generated_lengths(self) -> list[int] | None:
        """Token counts of the last evaluation's completions (essa decoder only)."""
        return None if self.last_decode is None else [len(t) for t in self.last_decode.tokens]

    # -- the essa decoder ---------------------------------------------------------------------
    def _decode(self, ids: list[list[int]], rows: list[tuple[int, int]], seeds: list[int]) -> list[str]:
        result = self.decoder.decode([ids[p] for _, p in rows], [c for c, _ in rows], seeds, progress=self.progress)
        self.last_decode = result
        return self.tokenizer.batch_decode(result.tokens, skip_special_tokens=True)

    def _decode_settings(self) -> DecodeSettings:
        g = self.decoding
        return DecodeSettings(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                              eos_token_ids=self._eos_token_ids(),
                              batch_size=g.batch_size, pack_weights=g.pack_weights,
                              parallel_batches=g.parallel_batches)

    # -- the reference path: HF generate ------------------------------------------------------
    def _generate_all(self, prompts: list[str], ids: list[list[int]], rows: list[tuple[int, int]],
                      seed: int) -> list[str]:
        order = sorted(range(len(rows)), key=lambda k: (len(ids[rows[k][1]]), rows[k][1], rows[k][0]))
        texts = [""] * len(rows)
        size = self.decoding.batch_size
        chunks = [order[i:i + size] for i in range(0, len(order), size)]
        for i, chunk in enumerate(tqdm(chunks, desc="generate", unit="batch", leave=False,
                                      disable=not self.progress or len(chunks) < 2)):
            outs = self.generate([prompts[rows[k][1]] for k in chunk], [rows[k][0] for k in chunk], seed + i)
            for k, text in zip(chunk, outs):
                texts[k] = text
        return texts

    @torch.inference_mode()
    def generate(self, prompts: list[str], candidate_of_row: list[int], seed: int = 0) -> list[str]:
        """One batched HF `generate` call; row i runs candidate `candidate_of_row[i]`."""
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        torch.manual_seed(seed)
        if self.population_model is None:
            ids = self.model.generate(**batch, generation_config=self._generation_config())
        else:
            with self.population_model.rows(candidate_of_row):
                ids = self.model.generate(**batch, generation_config=self._generation_config())
        eos = set(self._eos_token_ids())
        new = [before_eos(row, eos) for row in ids[:, batch["input_ids"].shape[1]:].tolist()]
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
            eos_token_id=list(self._eos_token_ids()),
        )

    def _eos_token_ids(self) -> tuple[int, ...]:
        """The ids both engines stop on: the model's generation config's and the tokenizer's EOS."""
        return eos_token_ids(self.tokenizer, getattr(self.model, "generation_config", None))

