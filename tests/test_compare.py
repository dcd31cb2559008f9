"""`essa compare` on a tiny model: same start, same prompts, matched budgets, validation-only selection."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from adapters import make_random_adapter
from helpers import make_tiny_model_dir, tiny_llama
from safetensors.torch import load_file

import essa.models
from essa.cli import main
from essa.compare import (
    check_same_prompts,
    check_same_start,
    compare_defaults,
    grpo_run_dir,
    jobs,
    load_compare_config,
    load_result,
    load_scores,
    orchestration,
    randomize_singular_vectors,
    run_compare,
    select_grpo_run,
    time_to_target,
    validation_best,
    write_result,
)
from essa.compare.report import comparison_table
from essa.compare.results import (
    CompareSummary,
    EssaResult,
    GrpoResult,
    GrpoTraining,
    MethodResult,
    MethodRun,
    Point,
    Precision,
    SftResult,
    ValidationBest,
)
from essa.config import SearchConfig
from essa.errors import EssaError
from essa.io import atomic_write_state
from essa.schedule import prompt_stream, rechunk
from essa.svd_space import SvdLoraSpace

torch.set_num_threads(1)

VOWEL_TASK = '''
from essa.tasks import Example, Task


class VowelTask(Task):
    """Graded reward (share of vowels), so GRPO groups have non-zero advantages."""

    name = "vowels"

    def split(self, name):
        offset = {"sft": 0, "train": 100, "validation": 200, "test": 300}[name]
        size = 10 if name == "train" else 3
        return [Example(prompt=f"say {offset + i}", answer=None) for i in range(size)]

    def reward(self, completion, example):
        return sum(c in "aeiou" for c in completion) / max(len(completion), 1)


def make(cfg):
    return VowelTask()
'''

TINY = [
    "task.sft_size=16", "task.train_size=12", "task.validation_size=3", "task.test_size=3", "lora.rank=2",
    "sft.batch_size=8", "decoding.max_new_tokens=4", "essa.popsize=4", "essa.prompts_per_generation=2",
    "essa.sigma0=0.5", "compare.checkpoints=2", "grpo.num_generations=2", "grpo.micro_batch_size=null",
    "grpo.lr=0.05", "grpo.lr_sweep=[]", "grpo.prompts_per_step=null",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="module")
def vowel_task(tmp_path_factory):
    path = tmp_path_factory.mktemp("task") / "vowels.py"
    path.write_text(VOWEL_TASK)
    return f"{path}:make"


def result(root, method, lr=0.05):
    run_dir = root / "essa" if method == "essa" else grpo_run_dir(root, lr)
    return json.loads((run_dir / "result.json").read_text())


def test_compare_isolated_runs_end_to_end_from_identical_start_and_prompts(model_dir, vowel_task, tmp_path):
    adapter = make_random_adapter(tiny_llama(seed=0), tmp_path / "sft", rank=2)
    root = tmp_path / "cmp"
    cfg = load_compare_config(None, [
        f"model.name={model_dir}", f"task.name={vowel_task}", f"adapter={adapter}", f"output_dir={root}",
        # The 6 capped steps end the run; the budget is there only if a loaded machine is too slow
        # for them (GRPO must get to update).
        "compare.budget_s=60", "compare.max_steps=6", *TINY])
    assert cfg.compare.isolate and cfg.compare.budget_s == 60 and cfg.grpo.lr == 0.05
    summary = run_compare(cfg, progress=False)

    for name in ("reward_vs_wallclock.png", "test_accuracy_vs_wallclock.png"):
        assert (root / name).read_bytes()[:4] == b"\x89PNG", name
    assert "| final test accuracy |" in (root / "comparison.md").read_text()
    assert "![held-out test accuracy vs wall-clock]" in (root / "report.md").read_text()
    assert json.loads((root / "comparison.json").read_text())["methods"] == summary.to_json()["methods"]

    # Identical start: the tensors each method saved as its starting point are bit-equal.
    start_e, start_g = (load_file(str(d / "start_adapter" / "adapter_model.safetensors"))
                        for d in (root / "essa", grpo_run_dir(root, 0.05)))
    assert start_e.keys() == start_g.keys() and len(start_e) == 2 * 2 * 4
    assert all(torch.equal(start_e[k], start_g[k]) for k in start_e)
    assert summary.same_start_adapter is True

    # Identical prompts: both consume ESSA's schedule over the train split, in order.
    essa, grpo_res = result(root, "essa"), result(root, "grpo")
    schedule = prompt_stream(cfg.essa, 10, 6)
    assert essa["prompts_used"] == schedule[:essa["steps"]] and essa["steps"] >= 1
    assert grpo_res["prompts_used"] == schedule[:grpo_res["steps"]] and grpo_res["steps"] >= 1
    assert all(0 <= i < 10 for batch in essa["prompts_used"] + grpo_res["prompts_used"] for i in batch)

    # Both trained within their budgets / step caps, and each has its own peak memory.
    for res, row in ((essa, summary.methods.essa), (grpo_res, summary.methods.grpo)):
        assert row.stopped_by in ("budget", "max_steps")
        assert res["steps"] == 6 or res["wall_clock_s"] >= 60
        assert row.peak_rss_mb > 50
        assert res["points"][0]["time_s"] == 0.0 and len(res["points"]) >= 2
        times = [p["time_s"] for p in res["points"]]
        assert times == sorted(times)
    # GRPO really updated the adapter it started from.
    last = load_file(str(max((grpo_run_dir(root, 0.05) / "snapshots").iterdir()) / "adapter_model.safetensors"))
    assert any(not torch.equal(last[k], start_g[k]) for k in start_g)
    # Every snapshot's per-example scores are kept beside result.json, one row per point.
    for run_dir, res in ((root / "essa", essa), (grpo_run_dir(root, 0.05), grpo_res)):
        scores = load_scores(run_dir)
        assert res["scores"] == "scores.npz" and set(scores) == {"validation", "test"}
        assert scores["test"].shape == (len(res["points"]), 3) == scores["validation"].shape
        assert [p["test_accuracy"] for p in res["points"]] == pytest.approx(scores["test"].mean(axis=1))
    assert set(summary.paired_test) >= {"essa_final_vs_grpo_final", "essa_final_vs_start", "grpo_final_vs_start"}
    # ESSA's snapshots are optimizer means: the first is the zero start.
    means = np.load(root / "essa" / "snapshots.npz")
    # compare.yaml shares offsets across layers, values and factors: one per module type.
    assert np.all(means["t0"] == 0) and means["t0"].shape == (essa["search_dim"],) == (4,)
    # ... and each snapshot after the start is also a PEFT adapter, named like GRPO's
    snapshot_dirs = sorted((root / "essa" / "snapshots").iterdir())
    assert [d.name for d in snapshot_dirs] == [f"step{p['step']:05d}" for p in essa["points"][1:]]
    last = SvdLoraSpace.from_adapter(snapshot_dirs[-1], 1.0)
    start = SvdLoraSpace.from_adapter(root / "essa" / "start_adapter", 1.0)
    assert any(not torch.allclose(a.s_a, b.s_a) for a, b in zip(last.pairs, start.pairs))  # the mean moved


def scored_as(out, val, test):
    """A job's result whose snapshots after the start score the 0/1 vectors `val` and `test`."""
    correct = {split: out.correct[split].copy() for split in ("validation", "test")}
    correct["validation"][1:], correct["test"][1:] = val, test
    points = [dataclasses.replace(p, val_accuracy=float(correct["validation"][k].mean()),
                                  test_accuracy=float(correct["test"][k].mean())) for k, p in enumerate(out.points)]
    return dataclasses.replace(out, correct=correct, points=points)


def test_lr_sweep_runs_every_rate_from_one_start_and_stream_and_selects_on_validation_only(
        model_dir, vowel_task, tmp_path, monkeypatch):
    """Two GRPO learning rates whose snapshots are given scores where validation and test disagree:
    lr 0.01 is better on validation, lr 0.05 on test. The comparison takes lr 0.01."""
    fake = {"essa": ([0, 1, 0], [1, 0, 1]), 0.01: ([1, 1, 0], [0, 0, 0]), 0.05: ([1, 0, 0], [1, 1, 1])}
    real_essa, real_grpo, real_evaluator = jobs.essa_job, jobs.grpo_scoring_job, jobs._evaluator

    def job(real, key):
        def run(cfg, **kwargs):
            out = scored_as(real(cfg, **kwargs), *fake[key(cfg)])
            write_result(Path(kwargs["run_dir"]), out)  # the files hold what the summary reads
            return out
        return run

    evaluated_in = []

    def evaluator(cfg, adapter_dir, alpha, loaded):
        evaluated_in.append(next(loaded[0].parameters()).dtype)
        return real_evaluator(cfg, adapter_dir, alpha, loaded)

    monkeypatch.setattr(jobs, "essa_job", job(real_essa, lambda cfg: "essa"))
    monkeypatch.setattr(jobs, "grpo_scoring_job", job(real_grpo, lambda cfg: cfg.grpo.lr))
    monkeypatch.setattr(jobs, "_evaluator", evaluator)
    monkeypatch.setattr(essa.models, "cpu_has_fast_bf16", lambda: True)  # model.dtype auto: bf16 inference
    adapter = make_random_adapter(tiny_llama(seed=0), tmp_path / "sft", rank=2)
    root = tmp_path / "cmp"
    cfg = load_compare_config(None, [
        f"model.name={model_dir}", f"task.name={vowel_task}", f"adapter={adapter}", f"output_dir={root}",
        "compare.budget_s=1", "compare.max_steps=2", "compare.isolate=false", *TINY, "grpo.lr_sweep=[1e-2,5e-2]"])
    assert cfg.model.dtype == "auto"
    summary = run_compare(cfg, progress=False)

    # Every rate ran in its own dir, with its own learning rate, from the same start and stream.
    essa_res = result(root, "essa")
    start = load_file(str(root / "essa" / "start_adapter" / "adapter_model.safetensors"))
    for lr in (0.01, 0.05):
        res = result(root, "grpo", lr)
        assert res["lr"] == res["settings"]["lr"] == lr and res["settings"]["lr_sweep"] == []
        trl_log = [json.loads(line) for line in (grpo_run_dir(root, lr) / "trl_log.jsonl").read_text().splitlines()]
        assert {r["learning_rate"] for r in trl_log if "learning_rate" in r} == {lr}
        theirs = load_file(str(grpo_run_dir(root, lr) / "start_adapter" / "adapter_model.safetensors"))
        assert all(torch.equal(start[k], theirs[k]) for k in start)
        assert res["prompts_used"] == essa_res["prompts_used"][:res["steps"]] and res["steps"] == 2

    # Validation decides: lr 0.01 is compared, although lr 0.05 is far better on test.
    sweep = summary.grpo_sweep
    assert sweep.selected_lr == summary.methods.grpo.lr == 0.01
    assert [(r.lr, r.selected, r.final_test_accuracy) for r in sweep.runs] == [
        (0.01, True, 0.0), (0.05, False, 1.0)]
    assert summary.time_to_target.grpo_final == 0.0  # the selected run's, not the test-best one's
    assert summary.methods.grpo.final_val_accuracy == pytest.approx(2 / 3)

    # Paired statistics agree with the per-example vectors kept on disk.
    e, g = load_scores(root / "essa")["test"], load_scores(grpo_run_dir(root, 0.01))["test"]
    best_e = int(np.argmax(load_scores(root / "essa")["validation"].mean(axis=1)))
    best_g = int(np.argmax(load_scores(grpo_run_dir(root, 0.01))["validation"].mean(axis=1)))
    pairs = {"essa_final_vs_grpo_final": (g[-1], e[-1]), "essa_final_vs_start": (e[0], e[-1]),
             "grpo_final_vs_start": (g[0], g[-1]), "essa_validation_best_vs_start": (e[0], e[best_e]),
             "grpo_validation_best_vs_start": (g[0], g[best_g])}
    assert set(summary.paired_test) == set(pairs)
    for key, (a, b) in pairs.items():
        row = summary.paired_test[key].stats
        assert row.n == 3 and row.delta == pytest.approx(b.mean() - a.mean())
        assert row.gained - row.lost == round(row.delta * row.n)
        assert (row.gained, row.lost) == (int((b > a).sum()), int((a > b).sum()))
        assert row.ci95[0] <= row.delta <= row.ci95[1] and 0 <= row.mcnemar_p <= 1
    assert summary.paired_test["essa_final_vs_grpo_final"].stats.delta == pytest.approx(2 / 3)
    assert json.loads((root / "comparison.json").read_text())["paired_test"] == summary.to_json()["paired_test"]
    # summary.json holds the whole summary: read back, it is the same record.
    assert CompareSummary.from_json(json.loads((root / "summary.json").read_text())) == summary

    # One precision: bf16 inference, so GRPO trained with bf16 autocast; every snapshot evaluated in bf16.
    assert summary.precision == Precision(essa="bfloat16", evaluation="bfloat16",
                                          grpo="float32 weights, bfloat16 autocast (rollouts and loss)")
    assert set(evaluated_in) == {torch.bfloat16} and len(evaluated_in) >= 1 + 2 * 2

    report = (root / "report.md").read_text()
    assert "## GRPO learning rates" in report and "| 0.01 | 2 |" in report and "| 0.05 | 2 |" in report
    assert "GRPO final 0.000 -> ESSA final 0.667" in report and "beyond noise" in report
    assert "Precision: ESSA searched in bfloat16" in report
    assert "## Paired comparisons" in (root / "comparison.md").read_text()


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_grpo_rollouts_and_loss_run_in_the_precision_essa_searches_in(model_dir, vowel_task, tmp_path, monkeypatch,
                                                                       fast_bf16):
    """model.dtype auto: bf16 inference on a CPU with bf16 matrix instructions, where GRPO's rollouts
    (no grad) and loss (grad) both run under bf16 autocast over fp32 weights; fp32 throughout elsewhere."""
    from essa.grpo import precision, run_grpo
    from essa.models import load_model
    from essa.tasks import get_task

    monkeypatch.setattr(essa.models, "cpu_has_fast_bf16", lambda: fast_bf16)
    adapter = make_random_adapter(tiny_llama(seed=0), tmp_path / "sft", rank=2)
    cfg = load_compare_config(None, [f"model.name={model_dir}", f"task.name={vowel_task}", *TINY,
                                     "compare.max_steps=1"])
    model, tokenizer = load_model(cfg.model, training=True)
    seen = set()
    model.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda module, args, out: seen.add((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), out.dtype)))
    run_grpo(model, tokenizer, get_task(cfg.task), adapter, cfg, tmp_path / "grpo", progress=False)
    dtype = torch.bfloat16 if fast_bf16 else torch.float32
    assert seen == {(False, fast_bf16, dtype), (True, fast_bf16, dtype)}
    assert next(model.parameters()).dtype == torch.float32  # autocast, not a cast of the weights
    assert precision(cfg) == ("float32 weights, bfloat16 autocast (rollouts and loss)" if fast_bf16 else "float32")


def test_compare_command_with_sft_random_singular_vectors_and_svd_grpo(model_dir, tmp_path, capsys):
    root = tmp_path / "cmp"
    config = tmp_path / "cmp.yaml"
    config.write_text(yaml.safe_dump({"model": {"name": str(model_dir)}, "output_dir": str(root),
                                      "compare": {"isolate": False, "svd_vectors": "random", "seed": 3}}))
    code = main(["compare", "--config", str(config), "--quiet", "compare.budget_s=0.5", "compare.max_steps=2",
                 *TINY, "grpo.svd_only=true"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["svd_vectors"] == "random" and summary["sft_wall_clock_s"] is not None
    assert summary["methods"]["essa"]["peak_rss_mb"] is None  # not separable in one process
    assert summary["same_start_adapter"] is True and summary["same_prompt_stream"] is True
    # Both started from the randomized adapter: SFT singular values, other singular vectors.
    sft = SvdLoraSpace.from_adapter(root / "sft" / "adapter", 1.0)
    start = SvdLoraSpace.from_adapter(root / "essa" / "start_adapter", 1.0)
    for p, q in zip(sft.pairs, start.pairs):
        assert torch.allclose(p.s_a, q.s_a, atol=1e-5) and torch.allclose(p.s_b, q.s_b, atol=1e-5)
        assert not torch.allclose(p.a, q.a, atol=1e-3)
    saved = yaml.safe_load((root / "config.yaml").read_text())
    assert saved["compare"]["svd_vectors"] == "random" and saved["grpo"]["num_generations"] == 2
    # The baseline was SVD-GRPO: its snapshots keep the start's singular vectors, and it is named so.
    assert saved["grpo"]["svd_only"] is True and summary["baseline"] == "SVD-GRPO"
    assert "| | ESSA | SVD-GRPO |" in (root / "comparison.md").read_text()
    last = SvdLoraSpace.from_adapter(max((grpo_run_dir(root, 0.05) / "snapshots").iterdir()), 1.0)
    for p, q in zip(start.pairs, last.pairs):
        overlap = (p.u_a.T @ q.u_a).abs()  # same left singular vectors up to sign (and order)
        assert torch.allclose(overlap.max(dim=1).values, torch.ones(p.rank, dtype=overlap.dtype), atol=1e-4)


@pytest.mark.ray
def test_compare_runs_essa_on_the_configured_backend_ray(model_dir, vowel_task, tmp_path, capsys):
    """`essa compare backend.kind=ray` on a local Ray cluster, with GRPO micro-batching on: the
    harness itself verifies identical start tensors and prompt streams, or the run fails."""
    pytest.importorskip("ray")
    adapter = make_random_adapter(tiny_llama(seed=0), tmp_path / "sft", rank=2)
    root = tmp_path / "cmp"
    code = main(["compare", "--quiet", f"model.name={model_dir}", f"task.name={vowel_task}", f"adapter={adapter}",
                 f"output_dir={root}", "compare.budget_s=600", "compare.max_steps=3", "compare.isolate=false",
                 *TINY, "grpo.micro_batch_size=2", "backend.kind=ray", "backend.workers=1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "starting 1 Ray workers" in err  # ESSA trained on the Ray pool
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["same_start_adapter"] and summary["same_prompt_stream"]
    essa, grpo_res = result(root, "essa"), result(root, "grpo")
    assert essa["steps"] == grpo_res["steps"] == 3
    # Two micro-batches per GRPO step (2 prompts x 2 completions, 2 per pass) read one step's prompts.
    assert grpo_res["settings"]["micro_batch_size"] == 2
    assert grpo_res["prompts_used"] == rechunk(prompt_stream(load_compare_config(None, TINY).essa, 10, 3), 2)
    assert (root / "essa" / "metrics.jsonl").is_file() and len(essa["points"]) >= 2


def trained(steps=0, prompts_used=(), start_adapter=""):
    """A method's training record with only what the harness checks filled in."""
    return MethodRun(steps=steps, wall_clock_s=0.0, stopped_by="budget", curve=[], prompts_used=list(prompts_used),
                     start_adapter=str(start_adapter), peak_rss_mb=None, reward_failures=0)


def test_harness_fails_a_comparison_whose_inputs_differ(tmp_path):
    search = SearchConfig(prompts_per_generation=2, seed=4)
    stream = prompt_stream(search, 10, 3)
    flat = [i for batch in stream for i in batch]
    same = trained(steps=2, prompts_used=stream[:2])
    check_same_prompts(search, 10, 1, same, trained(steps=5, prompts_used=[[i] for i in flat[:5]]))
    swapped = [stream[0], stream[1][::-1]]
    with pytest.raises(EssaError, match="ESSA did not read the shared prompt stream.*step 1"):
        check_same_prompts(search, 10, 2, trained(steps=2, prompts_used=swapped), same)
    with pytest.raises(EssaError, match="GRPO did not read the shared prompt stream.*step 1"):
        check_same_prompts(search, 10, 2, same, trained(steps=3, prompts_used=[stream[0], flat[2:5], stream[2]]))
    with pytest.raises(EssaError, match="GRPO did not read"):  # a step it did not record
        check_same_prompts(search, 10, 2, same, trained(steps=2, prompts_used=stream[:1]))
    a = make_random_adapter(tiny_llama(seed=0), tmp_path / "a", rank=2, seed=0)
    b = make_random_adapter(tiny_llama(seed=0), tmp_path / "b", rank=2, seed=1)
    check_same_start(trained(start_adapter=a), trained(start_adapter=a))
    with pytest.raises(EssaError, match="different adapter tensors"):
        check_same_start(trained(start_adapter=a), trained(start_adapter=b))


def test_randomize_singular_vectors_keeps_values_and_draws_orthonormal_vectors(tmp_path):
    adapter = make_random_adapter(tiny_llama(seed=0), tmp_path / "a", rank=4)
    space = SvdLoraSpace.from_adapter(adapter, 0.5)
    rnd = randomize_singular_vectors(space, seed=1)
    assert rnd.dim == space.dim and rnd.describe() == space.describe()
    for p, q in zip(space.pairs, rnd.pairs):
        assert q.a.shape == p.a.shape and q.b.shape == p.b.shape and q.trainable == p.trainable == 2
        assert torch.allclose(q.s_a, p.s_a, atol=1e-5) and torch.allclose(q.s_b, p.s_b, atol=1e-5)
        eye = torch.eye(p.rank, dtype=torch.float64)
        assert torch.allclose(q.v_a.T @ q.v_a, eye, atol=1e-6) and torch.allclose(q.u_b.T @ q.u_b, eye, atol=1e-6)
        assert (q.v_a.T @ p.v_a).abs().max() < 0.99  # not the SFT directions
    again = randomize_singular_vectors(space, seed=1)
    assert all(torch.equal(a.a, b.a) for a, b in zip(rnd.pairs, again.pairs))


def test_selection_reads_validation_only_and_time_to_target():
    vals = [0.2, 0.5, 0.5, 0.3]
    tests = [0.9, 0.1, 0.4, 1.0]
    assert validation_best(vals) == 1  # highest validation, earliest on ties: test plays no part
    points = [Point(time_s=t, step=k, val_accuracy=v, test_accuracy=a)
              for k, (t, v, a) in enumerate(zip([0, 5, 10, 15], vals, tests))]
    from essa.compare.summary import method_summary

    row = method_summary(scored_run(points, steps=3, wall_clock_s=15.0, stopped_by="budget", peak_rss_mb=None,
                                    reward_failures=0))
    assert row.validation_best == ValidationBest(time_s=5, val_accuracy=0.5, test_accuracy=0.1)
    assert row.final_test_accuracy == 1.0 and row.start_test_accuracy == 0.9
    with pytest.raises(EssaError):
        validation_best([])
    assert time_to_target(points[1:], 0.4) == 10
    assert time_to_target(points[1:], 1.01) is None


def scored_run(points, **fields):
    """A scored method run with `points`, and `fields` where the summary reads them."""
    defaults = {"steps": 1, "wall_clock_s": 0.0, "stopped_by": "budget", "peak_rss_mb": None, "reward_failures": 0}
    return MethodResult(**{**defaults, **fields}, curve=[], prompts_used=[], start_adapter="", points=points,
                        correct={})


def test_grpo_run_is_selected_on_final_validation_accuracy_and_test_never_decides():
    def run(val, test):
        return scored_run([Point(time_s=0, step=0, val_accuracy=0.1, test_accuracy=0.1),
                           Point(time_s=9, step=1, val_accuracy=val, test_accuracy=test)])

    runs = [run(0.3, 0.9), run(0.6, 0.1), run(0.6, 0.8), run(0.2, 1.0)]
    assert select_grpo_run(runs) == 1  # best final validation, ties to the first listed
    for permuted_test in ([0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]):
        rescored = [run(r.points[-1].val_accuracy, t) for r, t in zip(runs, permuted_test)]
        assert select_grpo_run(rescored) == 1


# result.json, job.json and summary.json as `essa compare` wrote them when its results were plain dicts
# (runs of the tiny model above, their training logs cut to two steps).
OLD_FILES = Path(__file__).parent / "data" / "compare_files_v1"


def test_files_written_before_the_records_were_typed_round_trip_unchanged(tmp_path):
    """A comparison begun before its results were typed still resumes: each file loads into its
    record, which writes it back unchanged and scores it as the old jobs did."""
    root = shutil.copytree(OLD_FILES, tmp_path / "cmp")
    for run_dir, kind in ((root / "essa", EssaResult), (grpo_run_dir(root, 0.05), GrpoResult)):
        old = json.loads((run_dir / "result.json").read_text())
        rows = len(old["points"])
        scores = {"validation": np.eye(rows, 3, dtype=np.uint8), "test": np.ones((rows, 3), dtype=np.uint8)}
        atomic_write_state(run_dir / "scores.npz", scores)
        loaded = load_result(run_dir)
        assert type(loaded) is kind and loaded.to_json() == old
        again = tmp_path / "again" / run_dir.name
        again.mkdir(parents=True)
        write_result(again, loaded)
        assert json.loads((again / "result.json").read_text()) == old
        assert all(np.array_equal(load_scores(again)[split], scores[split]) for split in scores)
        assert load_result(again) == loaded

    # A GRPO run kept trained but not scored, scored: the result.json its old scoring job wrote.
    job = json.loads((grpo_run_dir(root, 0.05) / "job.json").read_text())
    kept = GrpoTraining.from_json(job)
    assert kept.to_json() == job and [snap.step for snap in kept.snapshots] == [0, 2, 3]
    scored = load_result(grpo_run_dir(root, 0.05))
    assert kept.scored(scored.points, scored.correct).to_json() == scored.to_json()

    sft = json.loads((root / "sft" / "job.json").read_text())
    assert SftResult.from_json(sft).to_json() == sft
    old_summary = json.loads((root / "summary.json").read_text())
    summary = CompareSummary.from_json(old_summary)
    assert summary.to_json() == old_summary
    assert "| final test accuracy | 0.667 | 0.000 |" in comparison_table(summary)


def test_grpo_reads_essa_prompt_stream_in_order():
    search = SearchConfig(prompts_per_generation=3, seed=5)
    schedule = prompt_stream(search, 20, 4)
    assert all(len(set(b)) == 3 for b in schedule)
    assert schedule == prompt_stream(search, 20, 4)
    flat = [i for batch in schedule for i in batch]
    assert rechunk(schedule, 2) == [flat[k:k + 2] for k in range(0, 12, 2)]
    assert rechunk(schedule, 5) == [flat[:5], flat[5:10]]  # a partial last step is dropped


@pytest.mark.parametrize("override, message", [
    ("compare.budget_s=0", "compare.budget_s"),
    ("compare.checkpoints=0", "compare.checkpoints"),
    ("compare.svd_vectors=learned", "compare.svd_vectors"),
    ("compare.bogus=1", "unknown config key 'compare.bogus'"),
    ("compare.isolate=maybe", "compare.isolate"),
    ("compare=3", "is a section"),
    ("grpo.num_generations=1", "grpo.num_generations"),
    ("grpo.temperature=0", "grpo.temperature"),
    ("grpo.lr=fast", "grpo.lr"),
    ("grpo.lr_sweep=[1e-4,0]", "grpo.lr_sweep takes learning rates > 0"),
    ("grpo.lr_sweep=[3e-5,-1e-4]", "grpo.lr_sweep takes learning rates > 0"),
    ("grpo.lr_sweep=[1e-4,1.0e-4]", "grpo.lr_sweep must not repeat a learning rate"),
    ("grpo.lr_sweep=[fast]", "config key 'grpo.lr_sweep' must be a number"),
    ("grpo.lr_sweep=0.001", "config key 'grpo.lr_sweep' must be a list"),
    ("essa.popsize=1", "essa.popsize"),
])
def test_bad_compare_config_is_one_clear_error(override, message):
    with pytest.raises(EssaError, match=message):
        load_compare_config(None, [override])


def test_packaged_compare_uses_the_demos_task_adapter_and_search():
    # compare.yaml promises the demo's settings; only the budget and in-loop validation are its own.
    import dataclasses

    from essa.cli import demo_defaults

    cmp, demo = compare_defaults(), demo_defaults()
    for section in ("model", "task", "lora", "sft", "decoding"):
        assert getattr(cmp, section) == getattr(demo, section), section
    own = {"generations", "time_budget_s", "eval_every"}
    for field in dataclasses.fields(cmp.essa):
        if field.name not in own:
            assert getattr(cmp.essa, field.name) == getattr(demo.essa, field.name), field.name


def test_lr_sweep_settings_and_a_bad_sweep_is_one_error_line(capsys, tmp_path):
    packaged = yaml.safe_load(resources.files("essa").joinpath("configs", "compare.yaml").read_text())
    assert load_compare_config().grpo.lr_sweep == packaged["grpo"]["lr_sweep"] and len(packaged["grpo"]["lr_sweep"]) > 1
    assert load_compare_config(None, ["grpo.lr_sweep=[]", "grpo.lr=2e-5"]).grpo.learning_rates == [2e-5]
    assert load_compare_config(None, ["grpo.lr_sweep=[3e-5,1e-4]"]).grpo.learning_rates == [3e-5, 1e-4]
    code = main(["compare", f"output_dir={tmp_path / 'o'}", "grpo.lr_sweep=[1e-4,0]"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("essa: error: grpo.lr_sweep")
    assert not (tmp_path / "o").exists()


def test_bad_batches_and_existing_output_fail_before_any_work(model_dir, tmp_path):
    with pytest.raises(EssaError, match="grpo.micro_batch_size"):
        load_compare_config(None, [f"model.name={model_dir}", *TINY, "grpo.micro_batch_size=3"])
    cfg = load_compare_config(None, [f"model.name={model_dir}", f"output_dir={tmp_path / 'o'}", *TINY])
    other = make_random_adapter(tiny_llama(seed=0, hidden_size=48), tmp_path / "other", rank=2)
    with pytest.raises(EssaError, match="model's layer is"):
        run_compare(cfg.with_changes(adapter=str(other)), progress=False)
    with pytest.raises(EssaError, match="c_attn"):
        run_compare(load_compare_config(None, [f"model.name={model_dir}", f"output_dir={tmp_path / 'o'}", *TINY,
                                               "lora.targets=[c_attn]"]), progress=False)
    assert not (tmp_path / "o").exists()
    (tmp_path / "o" / "essa").mkdir(parents=True)
    with pytest.raises(EssaError, match="already holds a comparison"):
        run_compare(cfg, progress=False)
    with pytest.raises(EssaError, match="config file not found"):
        load_compare_config(tmp_path / "missing.yaml")


def test_resume_keeps_finished_jobs_and_starts_an_interrupted_one_over(model_dir, vowel_task, tmp_path, monkeypatch):
    adapter = make_random_adapter(tiny_llama(seed=0), tmp_path / "sft", rank=2)
    root = tmp_path / "cmp"
    settings = [f"model.name={model_dir}", f"task.name={vowel_task}", f"adapter={adapter}", f"output_dir={root}",
                "compare.budget_s=60", "compare.max_steps=2", "compare.isolate=false", *TINY,
                "grpo.lr_sweep=[1e-2,5e-2]"]
    cfg = load_compare_config(None, settings)
    first = run_compare(cfg, progress=False)
    with pytest.raises(EssaError, match="--resume"):
        run_compare(cfg, progress=False)
    with pytest.raises(EssaError, match="nothing to resume"):
        run_compare(cfg.with_changes(output_dir=str(tmp_path / "empty")), progress=False, resume=True)
    with pytest.raises(EssaError, match=r"Changed: essa.sigma0 \(was 0.5, now 0.25\)$"):
        run_compare(load_compare_config(None, [*settings, "essa.sigma0=0.25"]), progress=False, resume=True)

    # Interrupted while lr 0.05's snapshots were being scored: its training is kept, only scoring reruns.
    for name in ("result.json", "scores.npz"):
        (grpo_run_dir(root, 0.05) / name).unlink()
    (root / "summary.json").unlink()
    ran = []

    def counted(name):
        real = getattr(jobs, name)
        return lambda cfg, **kw: ran.append((name, cfg.grpo.lr)) or real(cfg, **kw)

    for name in ("essa_job", "grpo_job", "grpo_scoring_job"):
        monkeypatch.setattr(jobs, name, counted(name))
    resumed = run_compare(cfg, progress=False, resume=True)
    assert ran == [("grpo_scoring_job", 0.05)]
    assert resumed.methods == first.methods and resumed.paired_test == first.paired_test
    assert resumed.grpo_sweep == first.grpo_sweep

    # Interrupted while lr 0.01 trained: what it left is cleared and the run starts over.
    run_dir = grpo_run_dir(root, 0.01)
    for name in ("job.json", "result.json", "scores.npz"):
        (run_dir / name).unlink()
    (run_dir / "left_by_the_crash").write_text("")
    ran.clear()
    again = run_compare(cfg, progress=False, resume=True)
    assert ran == [("grpo_job", 0.01), ("grpo_scoring_job", 0.01)]
    assert not (run_dir / "left_by_the_crash").exists() and (run_dir / "result.json").is_file()
    assert [r.lr for r in again.grpo_sweep.runs] == [0.01, 0.05] and again.same_start_adapter


def test_job_processes_keep_the_memory_they_free_unless_the_user_set_malloc(monkeypatch):
    """A spawned job starts with glibc told not to unmap freed blocks (GRPO's logits page-faulted
    in anew at every step); a MALLOC_ variable the user set is left as it is, and the parent's
    environment is unchanged afterwards."""
    monkeypatch.delenv("MALLOC_MMAP_MAX_", raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "123")
    assert orchestration.run_job(True, os.getenv, key="MALLOC_MMAP_MAX_") == "0"
    assert orchestration.run_job(True, os.getenv, key="MALLOC_TRIM_THRESHOLD_") == "123"
    assert "MALLOC_MMAP_MAX_" not in os.environ and os.environ["MALLOC_TRIM_THRESHOLD_"] == "123"


def test_compare_command_resume_of_nothing_is_one_error_line(capsys, tmp_path):
    code = main(["compare", "--resume", f"output_dir={tmp_path / 'o'}"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("essa: error: nothing to resume")
    assert not (tmp_path / "o").exists()
