"""Experiment tracking (tracking.report_to): what `essa train` logs, read back from the trackers' own files."""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from essa.cli import main
from essa.tracking import Tracker, numeric_fields
from helpers import make_tiny_model_dir

torch.set_num_threads(1)

SMALL = [
    "task.validation_size=3", "lora.rank=2", "sft.batch_size=8", "decoding.max_new_tokens=6",
    "essa.popsize=4", "essa.prompts_per_generation=3", "essa.eval_every=1", "essa.sigma0=0.5", "--quiet",
]
REWARDS = "def vowels(completions, **kwargs):\n    return [sum(ch in 'aeiou' for ch in c) / 6 for c in completions]\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="module")
def task_args(tmp_path_factory):
    """A dataset task whose reward (vowels in the completion) differs between candidates of the tiny model."""
    root = tmp_path_factory.mktemp("data")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {i}", "completion": "aeiou"}) + "\n" for i in range(12)))
    (root / "rewards.py").write_text(REWARDS)
    return ["task.name=dataset", f"task.options.train={data}", f"task.options.reward_funcs=[{root}/rewards.py:vowels]"]


@pytest.fixture(scope="module")
def sft_dir(model_dir, task_args, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "sft"
    assert main(["sft", f"model.name={model_dir}", f"output_dir={out}", *task_args, *SMALL]) == 0
    return out


@pytest.fixture()
def train(model_dir, sft_dir, task_args):
    def run(run_dir, *extra):
        return main(["train", f"model.name={model_dir}", f"adapter={sft_dir}", f"output_dir={run_dir}", *task_args,
                     *SMALL, *extra])

    return run


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def scalars(log_dir):
    """{tag: [(step, value), ...]} from the event files, every event kept (no purging of repeats)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), purge_orphaned_data=False)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_numeric_fields_flatten_numbers_and_skip_the_rest():
    record = {"generation": 3, "fitness_mean": 0.5, "ties": 2, "tied": True, "validated": "mean",
              "snr": {"fitness": 1.5, "note": "x"}, "history": [1, 2]}
    assert numeric_fields(record, prefix="essa/") == {
        "essa/fitness_mean": 0.5, "essa/ties": 2.0, "essa/tied": 1.0, "essa/snr/fitness": 1.5}


def test_tensorboard_scalars_read_back_match_the_run(train, tmp_path):
    run_dir = tmp_path / "run"
    assert train(run_dir, "essa.generations=2", "tracking.report_to=tensorboard",
                 "tracking.log_completions=2") == 0
    got = scalars(run_dir / "tensorboard")
    records = metrics(run_dir)
    gens = [r for r in records if "fitness_mean" in r]
    for key in ("fitness_mean", "fitness_max", "fitness_min", "sigma", "mean_norm"):
        assert got[f"essa/{key}"] == [(r["generation"], pytest.approx(r[key])) for r in gens], key
    assert len({v for _, v in got["essa/fitness_max"] + got["essa/fitness_min"]}) > 1  # not all one number
    assert got["essa/wall_clock_s"] == [(r["generation"], pytest.approx(r["wall_clock_s"])) for r in records]
    # Every numeric field of the records is logged, whatever the trainer puts there.
    assert {f"essa/{k}" for r in records for k, v in r.items()
            if isinstance(v, (int, float)) and k != "generation"} <= set(got)
    vals = [(r["generation"], pytest.approx(r["val_accuracy"])) for r in records if "val_accuracy" in r]
    assert got["essa/val_accuracy"] == vals and [s for s, _ in vals] == [0, 1, 2]
    final = json.loads((run_dir / "final.json").read_text())
    for choice, acc in final["validation_accuracy"].items():
        assert got[f"final/validation_accuracy/{choice}"] == [(2, pytest.approx(acc))]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    text = acc.Tensors("completions/text_summary")
    assert [t.step for t in text] == [1, 2]
    table = text[0].tensor_proto.string_val[0].decode()
    assert "| generation | prompt | completion | reward |" in table and table.count("\n| 1 |") == 2


def test_resumed_run_logs_each_generation_once(train, tmp_path):
    run_dir = tmp_path / "run"
    assert train(run_dir, "essa.generations=2", "tracking.report_to=tensorboard") == 0
    assert train(run_dir, "essa.generations=3", "tracking.report_to=tensorboard", "--resume") == 0
    got = scalars(run_dir / "tensorboard")
    assert [s for s, _ in got["essa/fitness_mean"]] == [1, 2, 3]
    assert [s for s, _ in got["essa/val_accuracy"]] == [0, 1, 2, 3]


def test_unknown_tracker_is_refused_before_writing(capsys, train, tmp_path):
    run_dir = tmp_path / "run"
    assert train(run_dir, "essa.generations=1", "tracking.report_to=mlflow") == 2
    assert "tracking.report_to must be one of none, tensorboard, wandb, trackio (got 'mlflow')" in \
        capsys.readouterr().err
    assert not run_dir.exists()


def test_missing_tracker_package_is_refused_before_writing(capsys, train, tmp_path, monkeypatch):
    import essa.tracking

    class Absent(Tracker):
        name, package = "absent", "essa_tests_no_such_package"

        def log_scalars(self, values, step):
            raise AssertionError("never built")

    monkeypatch.setitem(essa.tracking._TRACKERS, "absent", Absent)
    run_dir = tmp_path / "run"
    assert train(run_dir, "essa.generations=1", "tracking.report_to=absent") == 2
    assert "needs the essa_tests_no_such_package package: pip install 'essa[absent]'" in capsys.readouterr().err
    assert not run_dir.exists()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_offline_run_holds_the_completions_table(train, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = tmp_path / "run"
    assert train(run_dir, "essa.generations=1", "tracking.report_to=wandb",
                 "tracking.offline=true", "tracking.project=essa-tests") == 0
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    tables = list(runs[0].glob("files/media/table/completions_*.table.json"))
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["generation", "prompt", "completion", "reward"] and len(table["data"]) > 0


@pytest.mark.skipif(importlib.util.find_spec("trackio") is None, reason="trackio is not installed")
def test_trackio_local_database_holds_the_generations(model_dir, sft_dir, task_args, tmp_path):
    # TRACKIO_DIR is read when trackio is imported: a fresh process gets its own.
    run_dir = tmp_path / "run"
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "essa.cli", "train", f"model.name={model_dir}", f"adapter={sft_dir}",
           f"output_dir={run_dir}", *task_args, *SMALL, "essa.generations=2", "tracking.report_to=trackio",
           "tracking.project=essa-tests", "tracking.run_name=r1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["generations"] == 2  # trackio's banners went to stderr
    db = sqlite3.connect(Path(tmp_path / "trackio" / "essa-tests.db"))
    rows = [(step, json.loads(m)) for step, m in
            db.execute("select step, metrics from metrics where run_name = 'r1' order by id")]
    fitness = {step: m["essa/fitness_mean"] for step, m in rows if "essa/fitness_mean" in m}
    want = {r["generation"]: r["fitness_mean"] for r in metrics(run_dir) if "fitness_mean" in r}
    assert fitness == pytest.approx(want) and set(fitness) == {1, 2}
    assert any("completions" in m for _, m in rows)
