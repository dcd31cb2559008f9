"""Completions per second of the essa decoder against HF `generate` (and vLLM) on the demo's shape.

One ESSA generation of the demo: `--candidates` candidates around an SFT adapter (relative offsets
of size `--sigma` in the demo's search space) x `--prompts` train prompts of the demo task, greedy,
stop at EOS, `--max-new-tokens`. Each engine decodes the same rows; repetitions are interleaved
and medians reported:
- generate: `LocalBackend` with `decoding.engine: generate` (HF `generate`, rows sorted by prompt
  length, batches of `--batch-size`), the reference path;
- essa: the same backend with `decoding.engine: essa` (shared prompt prefix per candidate, finished
  rows leave the batch, fp32/bf16 linears with oneDNN-packed weights: `decoding.pack_weights`, batches
  decoded at once on threads that share the CPU threads: `decoding.parallel_batches`);
- essa_one_batch: the same with `decoding.parallel_batches: 1` (one batch after another on all threads);
- essa_unpacked: that with `decoding.pack_weights: false` too (what the decoding loop alone saves);
- vllm (`--vllm`, needs vLLM: run this script with .venv-vllm/bin/python): `VllmBackend`, one LoRA
  adapter per candidate.

Agreement is the share of rows whose completion is identical to generate's. For each differing
row the logit margin at the first differing token is reported, from one teacher-forced forward
pass of that candidate: (logit of generate's token) - (logit of essa's token); a near-zero margin
is a near-tie that fp32 summation order can flip. The FLOP-limit fraction is the essa decoder's
model FLOPs per second (2 x (linear weights) per token, plus the output head for decoded tokens and
the last prompt token of each row, plus attention: 4 x hidden size per attended key and layer) over
a limit the machine did not exceed: the larger of the fastest large matmul measured in this process
(2048 x 2048 x 2048, best of 5; also reported alone as `matmul_peak_fraction`) and the nominal peak.
The nominal peak is cores x 2 FMA units x SIMD lanes (AVX-512: 16, AVX2 or AMD's 256-bit AVX-512: 8
fp32) x 2 FLOPs x the clock the OS reports (lscpu's maximum, else /proc/cpuinfo's current MHz); in
bf16 with AVX-512 BF16 twice that (each bf16 dot-product instruction does two multiply-adds per fp32
lane), and no figure with AMX, whose tile peak is of another order. A VM can report a clock below the
one its cores run at, so the nominal figure alone is no limit (an EPYC Zen 4 VM reported 2.6 GHz, a
nominal 166 GFLOP/s, and ran a matmul at 200.5). The last stdout line is one JSON object.

    python benchmarks/decode_throughput.py --adapter runs/demo/sft/adapter [--threads 2] [--repeats 3]

`--step-rows 16,32,64,128` measures something else instead: the time of one decode step of the
plain model (cache of `--step-cache` positions, median of 12 steps) at each number of rows, which
says what a step with few live rows costs against a full one (whether refilling freed slots pays).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np
import torch
from _common import json_main, log, require_positive

from essa.backends.local import LocalBackend
from essa.config import DecodingConfig, ModelConfig, load_config
from essa.decoding import new_decode_cache
from essa.models import load_model
from essa.svd_space import SvdLoraSpace
from essa.tasks import format_prompt, get_task


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapter", help="an SFT adapter of the demo task (runs/demo/sft/adapter); not with --step-rows")
    p.add_argument("--config", default=None, help="a run's config.yaml for the task, search space and generation "
                   "shape (default: the demo's packaged settings)")
    p.add_argument("--candidates", type=int, default=None, help="default: the config's essa.popsize")
    p.add_argument("--prompts", type=int, default=None, help="default: the config's essa.prompts_per_generation")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the config's decoding.max_new_tokens")
    p.add_argument("--batch-size", type=int, default=None, help="default: the config's decoding.batch_size")
    p.add_argument("--sigma", type=float, default=None, help="offsets of the candidates (default: the config's "
                   "essa.sigma0; 0.2 where that is auto)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vllm", action="store_true", help="also time a vLLM engine (needs vLLM installed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-rows", default=None, help="instead: time single decode steps at these row counts (16,32,...)")
    p.add_argument("--step-cache", type=int, default=75, help="cache positions for --step-rows")
    args = p.parse_args(argv)
    if args.step_rows is None and args.adapter is None:
        p.error("--adapter is required (unless --step-rows)")
    if args.step_rows is not None:
        try:
            args.step_rows = [int(x) for x in args.step_rows.split(",")]
        except ValueError:
            p.error(f"--step-rows takes comma-separated integers (got {args.step_rows!r})")
        if min(args.step_rows) < 1:
            p.error("--step-rows must be positive")
    require_positive(p, args, ("candidates", "prompts", "max_new_tokens", "batch_size", "repeats", "threads"))
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.step_rows is not None:
        return _step_times(args)
    torch.manual_seed(args.seed)
    cfg = _settings(args)
    model, tokenizer = load_model(ModelConfig(name=cfg.model.name, dtype=args.dtype, threads=args.threads))
    task = get_task(cfg.task)
    prompts = [format_prompt(tokenizer, task, ex) for ex in task.checked_split("train")[:args.prompts]]
    space = SvdLoraSpace.from_adapter(args.adapter, cfg.essa.alpha, model=model, offsets=cfg.essa.offsets,
                                      share=cfg.essa.share, layer_groups=cfg.essa.layer_groups)
    population = np.random.default_rng(args.seed).normal(0.0, args.sigma, (args.candidates, space.dim))
    decoding = dataclasses.replace(cfg.decoding, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    variants = {"generate": {"engine": "generate"},
                "essa_unpacked": {"engine": "essa", "pack_weights": False, "parallel_batches": 1},
                "essa_one_batch": {"engine": "essa", "pack_weights": True, "parallel_batches": 1},
                "essa": {"engine": "essa", "pack_weights": True, "parallel_batches": None}}
    engines = {name: LocalBackend(model, tokenizer, space, dataclasses.replace(decoding, **settings))
               for name, settings in variants.items()}
    if args.vllm:
        engines["vllm"] = _vllm_backend(args, tokenizer, space, decoding)
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    texts: dict[str, list[list[str]]] = {}
    try:
        for backend in engines.values():
            backend.evaluate(population[:2], prompts[:4])  # warm-up
        for rep in range(args.repeats):
            for name, backend in engines.items():
                t0 = time.perf_counter()
                texts[name] = backend.evaluate(population, prompts)
                seconds[name].append(time.perf_counter() - t0)
                log(f"repeat {rep + 1}/{args.repeats} {name}: {seconds[name][-1]:.1f} s")
        work = engines["essa"].last_decode
        margins = _flip_margins(engines["essa"], tokenizer, population, prompts, texts["generate"], texts["essa"])
    finally:
        for backend in engines.values():
            backend.close()
    rows = args.candidates * args.prompts
    per_s = {name: rows / statistics.median(s) for name, s in seconds.items()}
    flops = _model_flops(model, work)
    nominal, nominal_how = _peak_flops(args.threads, args.dtype)
    matmul_peak = _matmul_peak(getattr(torch, args.dtype))
    limit, limit_how = flop_limit(nominal, matmul_peak)
    rate = flops / statistics.median(seconds["essa"])
    agree = _same_rows(texts["essa"], texts["generate"])
    result = {
        "completions_per_s": {k: round(v, 2) for k, v in per_s.items()},
        "speedup_vs_generate": round(per_s["essa"] / per_s["generate"], 3),
        "speedup_one_batch_vs_generate": round(per_s["essa_one_batch"] / per_s["generate"], 3),
        "speedup_unpacked_vs_generate": round(per_s["essa_unpacked"] / per_s["generate"], 3),
        "speedup_vs_vllm": round(per_s["essa"] / per_s["vllm"], 3) if "vllm" in per_s else None,
        "completion_agreement": round(float(np.mean(agree)), 4),
        "completion_agreement_unpacked": round(float(np.mean(_same_rows(texts["essa_unpacked"],
                                                                         texts["generate"]))), 4),
        "packed_vs_unpacked_agreement": round(float(np.mean(_same_rows(texts["essa_one_batch"],
                                                                       texts["essa_unpacked"]))), 4),
        "parallel_vs_one_batch_agreement": round(float(np.mean(_same_rows(texts["essa"],
                                                                          texts["essa_one_batch"]))), 4),
        "rows": rows, "differing_rows": int(len(agree) - sum(agree)),
        "differing_row_logit_margins": margins,
        "flop_limit_fraction": round(rate / limit, 3), "flop_limit_gflop_s": round(limit / 1e9, 1),
        "flop_limit": limit_how, "model_gflop_per_generation": round(flops / 1e9, 1),
        "matmul_peak_fraction": round(rate / matmul_peak, 3), "matmul_peak_gflop_s": round(matmul_peak / 1e9, 1),
        "nominal_peak_gflop_s": round(nominal / 1e9, 1) if nominal else None, "nominal_peak": nominal_how,
        "tokens": {"prefix": work.prefix_tokens, "prefilled": work.prefill_tokens, "decoded": work.decoded_tokens},
        "seconds": {k: [round(x, 2) for x in v] for k, v in seconds.items()},
        "settings": {k: v for k, v in vars(args).items()} | {"torch": torch.__version__, "cpu": _cpu_name()},
    }
    return result


def _same_rows(ours: list[list[str]], theirs: list[list[str]]) -> list[bool]:
    """Per row (candidate x prompt), whether two engines' completions are identical."""
    return [a == b for x, y in zip(ours, theirs) for a, b in zip(x, y)]


def _settings(args: argparse.Namespace) -> Any:
    """The run's settings (the demo's by default); options left unset take the generation shape from them."""
    from essa.cli import demo_defaults

    cfg = demo_defaults() if args.config is None else load_config(args.config)
    sigma = 0.2 if cfg.essa.sigma0 == "auto" else cfg.essa.sigma0
    for option, value in (("candidates", cfg.essa.popsize), ("prompts", cfg.essa.prompts_per_generation),
                          ("max_new_tokens", cfg.decoding.max_new_tokens),
                          ("batch_size", cfg.decoding.batch_size), ("sigma", sigma)):
        if getattr(args, option) is None:
            setattr(args, option, value)
    return cfg


@torch.inference_mode()
def _step_times(args: argparse.Namespace) -> dict[str, Any]:
    """Median seconds of one decode step of the plain model at each row count (random tokens)."""
    model, _ = load_model(ModelConfig(dtype=args.dtype, threads=args.threads))
    generator = torch.Generator().manual_seed(args.seed)
    step_ms = {}
    for rows in args.step_rows:
        cache = new_decode_cache(model.config, args.step_cache + 16)  # the essa decoder's cache
        ids = torch.randint(100, 1000, (rows, args.step_cache), generator=generator)
        mask = torch.ones_like(ids)
        model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
        seconds = []
        for step in range(12):
            mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype)], dim=1)
            positions = torch.full((rows, 1), args.step_cache + step)
            token = torch.randint(100, 1000, (rows, 1), generator=generator)
            t = time.perf_counter()
            model(input_ids=token, attention_mask=mask, position_ids=positions, past_key_values=cache,
                  use_cache=True, logits_to_keep=1)
            seconds.append(time.perf_counter() - t)
        step_ms[rows] = round(1e3 * statistics.median(seconds), 1)
        log(f"{rows} rows: {step_ms[rows]} ms per step")
    return {"step_ms_by_rows": step_ms, "ms_per_row": {r: round(t / r, 2) for r, t in step_ms.items()},
            "settings": {"dtype": args.dtype, "threads": args.threads, "cache": args.step_cache,
                         "torch": torch.__version__, "cpu": _cpu_name()}}


def _vllm_backend(args: argparse.Namespace, tokenizer: Any, space: SvdLoraSpace, decoding: DecodingConfig) -> Any:
    from essa.backends.vllm_backend import VllmBackend
    from essa.models import engine_model_source

    t0 = time.perf_counter()
    engine = VllmBackend(engine_model_source(ModelConfig().name), tokenizer, space, decoding,
                         max_loras=args.candidates, threads=args.threads, dtype=args.dtype)
    log(f"vLLM engine started in {time.perf_counter() - t0:.1f} s")
    return engine


@torch.inference_mode()
def _flip_margins(backend: LocalBackend, tokenizer: Any, population: np.ndarray, prompts: list[str],
                  reference: list[list[str]], ours: list[list[str]]) -> list[float]:
    """For each row where the two engines differ: the reference token's logit minus ours at the
    first token where they part, from one teacher-forced forward pass of that row's candidate."""
    margins = []
    backend.population_model.set_population(population)
    for c, (ref_row, our_row) in enumerate(zip(reference, ours)):
        for p, (ref, mine) in enumerate(zip(ref_row, our_row)):
            if ref == mine:
                continue
            a = tokenizer(ref, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            b = tokenizer(mine, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            k = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
            ids = torch.tensor([tokenizer(prompts[p], add_special_tokens=False)["input_ids"] + a[:k]])
            with backend.population_model.rows([c]):
                logits = backend.model(input_ids=ids).logits[0, -1].float()
            margins.append(round(float(logits[a[k]] - logits[b[k]]), 5))
    backend.population_model.clear_rows()
    return margins


def _model_flops(model: torch.nn.Module, work: Any) -> float:
    """FLOPs of the work one essa evaluation did (see the module docstring)."""
    cfg = model.config
    head = cfg.vocab_size * cfg.hidden_size
    linear = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n
                 and "lm_head" not in n)
    rows_with_logits = work.decoded_tokens + len(work.tokens)  # each decode step, and each prompt's last token
    return (2.0 * linear * work.forward_tokens + 2.0 * head * rows_with_logits
            + 4.0 * cfg.hidden_size * cfg.num_hidden_layers * work.attended_keys)


def _peak_flops(threads: int, dtype: str) -> tuple[float | None, str]:
    info = open("/proc/cpuinfo").read()
    # AMD Zen 4 runs AVX-512 on 256-bit units: 8 fp32 lanes per FMA, as AVX2.
    wide = "avx512f" in info and "AuthenticAMD" not in info
    lanes = 16 if wide else 8 if "avx2" in info else 4
    per_lane, unit = 2, "FLOPs"
    if dtype == "bfloat16":
        if "amx_bf16" in info:
            return None, "not computed: bf16 on AMX tiles"
        if "avx512_bf16" in info:
            per_lane, unit = 4, "FLOPs (bf16 pairs)"
    ghz = _max_ghz()
    peak = threads * 2 * lanes * per_lane * ghz * 1e9
    return peak, (f"{threads} cores x 2 FMA units x {lanes} fp32 lanes x {per_lane} {unit} x {ghz:.2f} GHz "
                  f"(the clock the OS reports) = {peak / 1e9:.0f} GFLOP/s")


def flop_limit(nominal: float | None, matmul_peak: float) -> tuple[float, str]:
    """The FLOP/s a rate is reported against, and what it is: the larger of the measured matmul peak
    and the nominal peak. Either alone can be below what the machine does: the nominal one where the OS
    reports a clock below the real one, the matmul where it ran slow (a busy machine)."""
    if nominal is None or matmul_peak >= nominal:
        why = "no nominal peak" if nominal is None else f"above the nominal {nominal / 1e9:.0f} GFLOP/s"
        return matmul_peak, f"measured: the fastest 2048^3 matmul here ({why})"
    return nominal, f"nominal (the fastest 2048^3 matmul here: {matmul_peak / 1e9:.0f} GFLOP/s)"


def _matmul_peak(dtype: torch.dtype, n: int = 2048) -> float:
    """FLOP/s of the fastest of 5 large square matmuls on this process's threads."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


def _max_ghz() -> float:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        found = re.search(r"CPU max MHz:\s*([\d.]+)", out)
        if found:
            return float(found.group(1)) / 1000.0
    except OSError:
        pass
    mhz = [float(x) for x in re.findall(r"cpu MHz\s*:\s*([\d.]+)", open("/proc/cpuinfo").read())]
    return max(mhz) / 1000.0


def _cpu_name() -> str:
    found = re.search(r"model name\s*:\s*(.+)", open("/proc/cpuinfo").read())
    return found.group(1).strip() if found else "unknown"


def main(argv: list[str] | None = None) -> int:
    return json_main(run, _parse(argv))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
