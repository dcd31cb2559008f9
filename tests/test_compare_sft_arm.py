"""`essa compare compare.sft_arm=true`: the start adapter's SFT continued for the same budget, from the
same tensors, scored by the same evaluator, in the summary, the report and old files' absence of it."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from adapters import make_random_adapter
from helpers import make_tiny_model_dir, tiny_llama, tiny_tokenizer
from safetensors.torch import load_file
from task_helpers import write_jsonl

from essa.compare import (
    check_same_start,
    jobs,
    load_compare_config,
    load_result,
    load_scores,
    run_compare,
    write_result,
)
from essa.compare.fairness import same_adapter_tensors
from essa.compare.report import comparison_table
from essa.compare.results import CompareSummary, MethodRun, SftArmResult, SftArmTraining
from essa.config import SftConfig
from essa.errors import EssaError
from essa.io import atomic_write_state
from essa.sft import batch_stream, continue_sft
from essa.svd_space import ADAPTER_WEIGHTS
from essa.tasks import Example, Task

torch.set_num_threads(1)

# The vowel task of test_compare.py with SFT targets (6 sft examples), so the SFT can continue.
TARGET_TASK = '''
from essa.tasks import Example, Task


class VowelTargets(Task):
    name = "vowel_targets"

    def split(self, name):
        offset = {"sft": 0, "train": 100, "validation": 200, "test": 300}[name]
        size = {"sft": 6, "train": 10}.get(name, 3)
        target = "aeiou" if name == "sft" else None
        return [Example(prompt=f"say {offset + i}", answer=None, target=target) for i in range(size)]

    def reward(self, completion, example):
        return sum(c in "aeiou" for c in completion) / max(len(completion), 1)


def make(cfg):
    return VowelTargets()
'''

TINY = [
    "task.sft_size=16", "task.train_size=12", "task.validation_size=3", "task.test_size=3", "lora.rank=2",
    "sft.batch_size=4", "decoding.max_new_tokens=4", "essa.popsize=4", "essa.prompts_per_generation=2",
    "essa.sigma0=0.5", "compare.checkpoints=2", "grpo.num_generations=2", "grpo.micro_batch_size=null",
    "grpo.lr=0.05", "grpo.lr_sweep=[]", "grpo.prompts_per_step=null", "compare.isolate=false",
    "model.dtype=float32",
]
OLD_FILES = Path(__file__).parent / "data" / "compare_files_v1"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="module")
def target_task(tmp_path_factory):
    path = tmp_path_factory.mktemp("task") / "vowel_targets.py"
    path.write_text(TARGET_TASK)
    return f"{path}:make"


def settings(model_dir, task, adapter, root, *extra):
    # A budget the capped steps fit in: every method stops at compare.max_steps.
    return [f"model.name={model_dir}", f"task.name={task}", f"adapter={adapter}", f"output_dir={root}",
            "compare.budget_s=60", "compare.max_steps=3", *TINY, "compare.sft_arm=true", *extra]


def tensors(adapter_dir):
    return load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))


def test_sft_arm_runs_from_the_start_for_the_budget_and_is_summarized_and_reported(
        model_dir, target_task, tmp_path, monkeypatch):
    adapter = make_random_adapter(tiny_llama(seed=0), tmp_path / "sft", rank=2)
    root = tmp_path / "cmp"
    cfg = load_compare_config(None, settings(model_dir, target_task, adapter, root))
    # The tiny model solves nothing: the arm's snapshots after the start get scores, so the paired
    # statistics have something to compare.
    monkeypatch.setattr(jobs, "sft_arm_scoring_job", rescored(jobs.sft_arm_scoring_job, [1, 0, 0], [1, 1, 0]))
    summary = run_compare(cfg, progress=False)

    # It started from ESSA's start tensors and trained: its last snapshot moved away from them.
    arm_dir = root / "sft_arm"
    res = load_result(arm_dir)
    assert type(res) is SftArmResult and json.loads((arm_dir / "result.json").read_text())["method"] == "sft_arm"
    assert same_adapter_tensors(res.start_adapter, root / "essa" / "start_adapter")
    last = tensors(max((arm_dir / "snapshots").iterdir()))
    start = tensors(res.start_adapter)
    assert last.keys() == start.keys() and any(not torch.equal(last[k], start[k]) for k in start)
    # Same clock rules as the others: capped at compare.max_steps, snapshots from t = 0 in time order.
    assert res.steps == 3 and res.stopped_by == "max_steps" and res.lr == cfg.sft.lr
    assert res.points[0].time_s == 0.0 and res.points[0].step == 0 and res.points[-1].step == 3
    assert [p.time_s for p in res.points] == sorted(p.time_s for p in res.points)
    # It read the task's sft split in the seeded batches SFT uses, sft.batch_size at a time.
    order = batch_stream(list(range(6)), 4, cfg.sft.seed)
    assert res.prompts_used == [next(order) for _ in range(3)]
    assert [r["step"] for r in res.curve] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in res.curve)

    # Scored by the one evaluator like the others: the start scores what ESSA's start scores.
    scores, essa_scores = load_scores(arm_dir), load_scores(root / "essa")
    assert scores["test"].shape == (len(res.points), 3) == scores["validation"].shape
    assert np.array_equal(scores["test"][0], essa_scores["test"][0])
    assert [p.test_accuracy for p in res.points] == pytest.approx(scores["test"].mean(axis=1))

    # The summary: its row, its precision and paired tests that agree with the vectors on disk.
    row = summary.methods.sft_arm
    assert row is not None and row.steps == 3 and row.lr == cfg.sft.lr
    assert row.final_test_accuracy == res.points[-1].test_accuracy
    assert summary.precision.sft_arm == "float32"
    c, e = scores["test"], essa_scores["test"]
    for key, (a, b) in {"sft_arm_final_vs_start": (c[0], c[-1]), "essa_final_vs_sft_arm_final": (c[-1], e[-1])}.items():
        stats = summary.paired_test[key].stats
        assert stats.n == 3 and stats.delta == pytest.approx(b.mean() - a.mean())
        assert (stats.gained, stats.lost) == (int((b > a).sum()), int((a > b).sum()))
    assert row.final_test_accuracy == pytest.approx(2 / 3) and c[-1].tolist() == [1, 1, 0]
    versus = summary.paired_test["essa_final_vs_sft_arm_final"]
    assert (versus.a, versus.b) == ("continued SFT final", "ESSA final") and versus.stats.delta < 0
    assert "sft_arm_validation_best_vs_start" in summary.paired_test
    assert CompareSummary.from_json(json.loads((root / "summary.json").read_text())) == summary
    assert json.loads((root / "comparison.json").read_text())["methods"]["sft_arm"]["steps"] == 3

    # The report: a third column, its paired tests in words, its note; its curve in the accuracy plot.
    table = (root / "comparison.md").read_text()
    assert "| | ESSA | GRPO | continued SFT |" in table
    final = next(line for line in table.splitlines() if line.startswith("| final test accuracy |"))
    assert final.endswith(f"| {row.final_test_accuracy:.3f} |") and final.count("|") == 5
    report = (root / "report.md").read_text()
    assert "-> ESSA final" in report and "continued SFT final" in report
    assert "All three methods start from" in report and "on the task's sft split" in report
    assert (root / "test_accuracy_vs_wallclock.png").read_bytes()[:4] == b"\x89PNG"

    # Resumed after its scoring was interrupted: its training is kept, only the scoring reruns.
    for name in ("result.json", "scores.npz"):
        (arm_dir / name).unlink()
    (root / "summary.json").unlink()
    ran = []

    def counted(name):
        real = getattr(jobs, name)
        return lambda cfg, **kw: ran.append(name) or real(cfg, **kw)

    for name in ("essa_job", "grpo_job", "grpo_scoring_job", "sft_arm_job", "sft_arm_scoring_job"):
        monkeypatch.setattr(jobs, name, counted(name))
    resumed = run_compare(cfg, progress=False, resume=True)
    assert ran == ["sft_arm_scoring_job"]
    assert resumed.methods == summary.methods and resumed.paired_test == summary.paired_test


def rescored(real, val, test):
    """`real` scoring job whose snapshots after the start score the 0/1 vectors `val` and `test`."""
    def run(cfg, run_dir, trained):
        out = real(cfg, run_dir=run_dir, trained=trained)
        correct = {split: out.correct[split].copy() for split in ("validation", "test")}
        correct["validation"][1:], correct["test"][1:] = val, test
        points = [dataclasses.replace(p, val_accuracy=float(correct["validation"][k].mean()),
                                      test_accuracy=float(correct["test"][k].mean())) for k, p in enumerate(out.points)]
        out = dataclasses.replace(out, correct=correct, points=points)
        write_result(Path(run_dir), out)  # the files hold what the summary reads
        return out
    return run


def test_a_continued_sft_that_started_from_other_tensors_voids_the_comparison(
        model_dir, target_task, tmp_path, monkeypatch):
    adapter = make_random_adapter(tiny_llama(seed=0), tmp_path / "sft", rank=2)
    other = make_random_adapter(tiny_llama(seed=0), tmp_path / "other", rank=2, seed=1)
    real = jobs.sft_arm_job
    monkeypatch.setattr(jobs, "sft_arm_job", lambda cfg, start_adapter, **kw: real(cfg, start_adapter=str(other), **kw))
    root = tmp_path / "cmp"
    cfg = load_compare_config(None, settings(model_dir, target_task, adapter, root, "compare.max_steps=1"))
    with pytest.raises(EssaError, match="ESSA and the continued SFT started from different adapter tensors"):
        run_compare(cfg, progress=False)
    assert (root / "sft_arm" / "result.json").is_file() and not (root / "summary.json").exists()

    # The check itself: equal tensors pass, different ones fail whichever run holds them.
    def run(start):
        return MethodRun(steps=0, wall_clock_s=0.0, stopped_by="budget", curve=[], prompts_used=[],
                         start_adapter=str(start), peak_rss_mb=None, reward_failures=0)

    arm = SftArmTraining(**vars(run(other)), lr=1e-3, settings={}, snapshots=[])
    check_same_start(run(adapter), run(adapter), SftArmTraining(**{**vars(arm), "start_adapter": str(adapter)}))
    with pytest.raises(EssaError, match="the continued SFT started from different"):
        check_same_start(run(adapter), run(adapter), arm)


VOWEL_TASK_NO_TARGETS = TARGET_TASK.replace('target = "aeiou" if name == "sft" else None', "target = None")


def test_sft_arm_on_a_task_without_sft_targets_is_refused_before_anything_is_written(model_dir, tmp_path):
    adapter = make_random_adapter(tiny_llama(seed=0), tmp_path / "sft", rank=2)
    no_targets = tmp_path / "no_targets.py"
    no_targets.write_text(VOWEL_TASK_NO_TARGETS)
    # A reward-only dataset task: prompts and a reward function, no completions, so no sft split.
    rows = [{"prompt": f"Say {i}", "answer": str(i)} for i in range(8)]
    data, test = write_jsonl(tmp_path / "train.jsonl", rows), write_jsonl(tmp_path / "test.jsonl", rows[:3])
    funcs = tmp_path / "rewards.py"
    funcs.write_text("def exact(completions, answer, **kw):\n    return [float(c == a) for c, a in "
                     "zip(completions, answer)]\n")
    reward_only = ["task.name=dataset", "task.validation_size=2", f"task.options.train={data}",
                   f"task.options.test={test}", f"task.options.reward_funcs=[{funcs}:exact]"]
    for task, message in ((["task.name=" + f"{no_targets}:make"], "has no SFT target"),
                          (reward_only, "empty 'sft' split")):
        root = tmp_path / "cmp"
        cfg = load_compare_config(None, [*settings(model_dir, "x", adapter, root), *task])
        with pytest.raises(EssaError, match=f"compare.sft_arm: true continues SFT.*{message}"):
            run_compare(cfg, progress=False)
        assert not root.exists()


def test_old_files_without_the_arm_still_load_and_report_two_methods(tmp_path):
    root = shutil.copytree(OLD_FILES, tmp_path / "cmp")
    old = json.loads((root / "summary.json").read_text())
    summary = CompareSummary.from_json(old)
    assert summary.methods.sft_arm is None and summary.precision.sft_arm is None
    assert summary.to_json() == old and "sft_arm" not in summary.to_json()["methods"]
    table = comparison_table(summary)
    assert "| | ESSA | GRPO |\n| --- | --- | --- |" in table and "continued SFT" not in table
    assert "| final test accuracy | 0.667 | 0.000 |" in table
    for run_dir in (root / "essa", root / "grpo" / "lr_0.05"):
        rows = len(json.loads((run_dir / "result.json").read_text())["points"])
        ones = np.ones((rows, 3), dtype=np.uint8)
        atomic_write_state(run_dir / "scores.npz", {"validation": ones, "test": ones})
        assert load_result(run_dir).to_json() == json.loads((run_dir / "result.json").read_text())


class _Targets(Task):
    name = "targets"

    def split(self, name):
        return [Example(prompt=f"say {i}", target="aeiou") for i in range(5)]

    def reward(self, completion, example):
        return 0.0


@pytest.mark.parametrize("bf16", [False, True])
def test_continue_sft_trains_the_given_adapter_and_hands_the_model_back_unchanged(tmp_path, bf16):
    model, tokenizer = tiny_llama(seed=0), tiny_tokenizer()
    adapter = make_random_adapter(model, tmp_path / "a", rank=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = set()
    model.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda module, args, out: seen.add((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), out.dtype)))
    sft = SftConfig(batch_size=2, lr=1e-2)
    out = continue_sft(model, tokenizer, _Targets(), adapter, sft, tmp_path / "run", budget_s=1e6,
                       times=[1e6 / 2, 1e6], max_steps=4, bf16_autocast=bf16, progress=False)
    # The loss forward runs under bf16 autocast exactly when asked, over fp32 weights.
    assert seen == {(True, bf16, torch.bfloat16 if bf16 else torch.float32)}
    assert out.steps == 4 and [s.step for s in out.snapshots] == [0, 4] and out.snapshots[0].elapsed_s == 0
    assert same_adapter_tensors(out.start_adapter, adapter)  # the tensors it started from: the adapter's
    moved = tensors(out.snapshots[-1].adapter_dir)
    assert any(not torch.equal(moved[k], v) for k, v in tensors(adapter).items())
    order = batch_stream(list(range(5)), 2, sft.seed)
    assert out.examples_used == [next(order) for _ in range(4)]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 4
    assert model.state_dict().keys() == before.keys()  # no LoRA layers left
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_sft_arm_setting():
    assert load_compare_config().compare.sft_arm is False
    assert load_compare_config(None, ["compare.sft_arm=true"]).compare.sft_arm is True
    with pytest.raises(EssaError, match="compare.sft_arm"):
        load_compare_config(None, ["compare.sft_arm=maybe"])


def test_a_comparison_begun_before_the_setting_existed_resumes_without_the_arm(tmp_path):
    """Its config.yaml lacks compare.sft_arm: it ran without the arm, and resumes so; asking for the
    arm on resume is a change of settings."""
    from essa.compare.orchestration import check_resumable

    cfg = load_compare_config(None, [f"output_dir={tmp_path}"])
    cfg.save(tmp_path / "config.yaml")
    old = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del old["compare"]["sft_arm"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    check_resumable(tmp_path, cfg)
    with pytest.raises(EssaError, match=r"Changed: compare.sft_arm \(was False, now True\)$"):
        check_resumable(tmp_path, load_compare_config(None, [f"output_dir={tmp_path}", "compare.sft_arm=true"]))
