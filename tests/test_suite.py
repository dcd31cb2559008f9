"""The transfer check (`essa eval --suite`): arms x real benchmarks on a tiny model and fixture data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from adapters import make_random_adapter
from helpers import make_tiny_model_dir, tiny_llama
from real_fixtures import install_fixture_wheels
from safetensors.torch import load_file

import essa.suite as suite_mod
from essa.cli import main
from essa.config import load_config
from essa.errors import EssaError
from essa.suite import BENCHMARKS, parse_arms, run_suite, suite_examples

torch.set_num_threads(1)


@pytest.fixture
def data(tmp_path, monkeypatch):
    monkeypatch.setenv("ESSA_CACHE_DIR", str(tmp_path / "cache"))
    install_fixture_wheels(tmp_path / "wheels", monkeypatch)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("m") / "tiny")


def _cfg(model_dir, *extra):
    return load_config(None, [f"model.name={model_dir}", "suite.sets=[svamp,ifeval]", "suite.limit=6",
                              "suite.max_new_tokens=5", "decoding.batch_size=8", *extra])


def test_suite_scores_every_arm_on_the_same_examples_and_compares_neighbours(data, model_dir, tmp_path,
                                                                             monkeypatch):
    adapter = make_random_adapter(tiny_llama(seed=0), tmp_path / "adapter", rank=4)
    arms = [("base", None), ("rnd", str(adapter))]
    out = tmp_path / "suite"
    summary = run_suite(_cfg(model_dir), arms, out)

    svamp, ifeval = summary["benchmarks"]["svamp"], summary["benchmarks"]["ifeval"]
    assert svamp["examples"] == ifeval["examples"] == 6 and svamp["max_new_tokens"] == 5
    assert ifeval["metrics"] == ["prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc",
                                 "inst_level_loose_acc"]
    for label, _ in arms:
        rows = [json.loads(line) for line in (out / "records" / label / "svamp.jsonl").read_text().splitlines()]
        assert [r["prompt"] for r in rows] == [ex.prompt for ex in suite_examples(BENCHMARKS["svamp"], 6)]
        assert svamp["arms"][label]["accuracy"] == pytest.approx(np.mean([r["correct"] for r in rows]))
        assert svamp["arms"][label]["hit_limit_share"] == pytest.approx(np.mean([r["hit_limit"] for r in rows]))
        # Token counts are the decoder's own: at most the limit, and a hit exactly at it.
        assert all(r["tokens"] <= 5 and r["hit_limit"] == float(r["tokens"] == 5) for r in rows)
        assert "no_answer_share" in svamp["arms"][label] and "no_answer_share" not in ifeval["arms"][label]
    for entry in (svamp, ifeval):
        assert [c["metric"] for c in entry["comparisons"]] == entry["metrics"]
        for c in entry["comparisons"]:
            assert (c["from"], c["to"]) == ("base", "rnd")
            assert c["delta"] == pytest.approx(entry["arms"]["rnd"][c["metric"]] - entry["arms"]["base"][c["metric"]])
            assert c["ci95"][0] <= c["delta"] <= c["ci95"][1]
    table = (out / "suite.md").read_text()
    assert "| svamp | 6 | accuracy |" in table and "rnd - base [95% CI]" in table
    assert json.loads((out / "suite.json").read_text()) == summary

    # Run again into the same directory: every finished (arm, benchmark) is reused, not rescored.
    monkeypatch.setattr(suite_mod, "_score", lambda *a, **k: pytest.fail("rescored a finished result"))
    monkeypatch.setattr("essa.backends.load_inputs", lambda *a, **k: pytest.fail("loaded a model to reread records"))
    assert run_suite(_cfg(model_dir), arms, out) == summary
    with pytest.raises(EssaError, match="other examples"):
        run_suite(_cfg(model_dir, "suite.limit=5"), arms, out)


def test_suite_checks_before_scoring(data, model_dir, tmp_path):
    with pytest.raises(EssaError, match="no PEFT adapter"):
        run_suite(_cfg(model_dir), [("base", None), ("gone", str(tmp_path / "missing"))], tmp_path / "s")
    assert not (tmp_path / "s").exists()
    with pytest.raises(EssaError, match="suite.sets must be one of"):
        _cfg(model_dir, "suite.sets=[gsm9k]")
    with pytest.raises(EssaError, match="no benchmarks"):
        run_suite(_cfg(model_dir, "suite.sets=[]"), [("base", None)], tmp_path / "s")


def test_parse_arms():
    assert parse_arms(["start=base", "sft=runs/sft"]) == [("start", None), ("sft", "runs/sft")]
    for bad in (["nolabel"], ["=x"], ["a/b=x"], ["a=x", "a=y"]):
        with pytest.raises(EssaError):
            parse_arms(bad)


def test_cli_suite_with_compare_to(data, model_dir, tmp_path, capsys):
    adapter = make_random_adapter(tiny_llama(seed=0), tmp_path / "adapter", rank=4)
    out = tmp_path / "suite"
    code = main(["eval", "--suite", "svamp", "--limit", "4", "--compare-to", "base", f"adapter={adapter}",
                 f"model.name={model_dir}", "suite.max_new_tokens=3", "--out", str(out), "--quiet"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert json.loads(stdout.strip().splitlines()[-1]) == {"suite": str(out / "suite.json"),
                                                           "table": str(out / "suite.md")}
    summary = json.loads((out / "suite.json").read_text())
    assert [a["label"] for a in summary["arms"]] == ["start", "adapter"]
    assert summary["benchmarks"]["svamp"]["examples"] == 4 and "| svamp | 4 | accuracy |" in stderr

    code = main(["eval", "--suite", "svamp", "--arm", "oops", f"model.name={model_dir}", "--quiet"])
    assert code != 0 and "LABEL=ADAPTER_PATH" in capsys.readouterr().err
    code = main(["eval", "--arm", "a=base", f"model.name={model_dir}", "--quiet"])
    assert code != 0 and "--suite" in capsys.readouterr().err


def test_train_writes_the_transfer_check_into_its_report(data, model_dir, tmp_path, capsys):
    adapter = make_random_adapter(tiny_llama(seed=0), tmp_path / "adapter", rank=4)
    run_dir = tmp_path / "run"
    code = main(["train", f"model.name={model_dir}", f"adapter={adapter}", f"output_dir={run_dir}",
                 "task.sft_size=4", "task.train_size=8", "task.validation_size=4", "task.test_size=4",
                 "decoding.max_new_tokens=3", "essa.popsize=4", "essa.prompts_per_generation=2",
                 "essa.generations=1", "suite.sets=[svamp,ifeval]", "suite.limit=3", "suite.max_new_tokens=3",
                 "essa.guard_sets=[mawps]", "essa.guard_limit=4", "--quiet"])
    _, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads((run_dir / "summary.json").read_text())
    final = json.loads((run_dir / "final.json").read_text())
    assert final["choice"] == "start"  # 2 judgement examples can never beat the start with confidence
    assert set(summary["transfer"]) == {"svamp", "ifeval"}
    assert summary["transfer"]["ifeval"]["metric"] == "prompt_level_strict_acc"
    # the start is not scored twice: the search's final mean (saved whatever the choice) stands in
    assert {"start", "search_mean", "delta", "delta_ci95"} <= set(summary["transfer"]["svamp"])
    assert summary["transfer_verdict"].startswith("transfer check, the final choice kept the start; "
                                                  "the search's final mean (not chosen) vs start:")
    suite = json.loads((run_dir / "transfer" / "suite.json").read_text())
    assert [a["adapter"] for a in suite["arms"]] == [str(adapter), str(run_dir / "final_mean")]
    chosen, mean = (load_file(d / "adapter_model.safetensors") for d in (run_dir / "adapter", run_dir / "final_mean"))
    assert any(not torch.equal(chosen[k], mean[k]) for k in chosen)  # the mean moved off the start
    report = (run_dir / "report.md").read_text()
    assert "## Transfer check" in report and "| svamp | 3 | accuracy |" in report
    assert (run_dir / "transfer" / "records" / "search_mean" / "ifeval.jsonl").is_file()
    assert "guard set" in final["rule"] and set(final["guard"]) <= {"mean", "best_candidate"}


def test_the_demo_prints_its_transfer_check_beside_its_own_result(data, model_dir, tmp_path, capsys):
    run_dir = tmp_path / "demo"
    code = main(["demo", f"model.name={model_dir}", f"output_dir={run_dir}", "task.sft_size=8", "task.train_size=8",
                 "task.validation_size=4", "task.test_size=4", "lora.rank=4", "sft.batch_size=8",
                 "decoding.max_new_tokens=3", "essa.popsize=4", "essa.prompts_per_generation=2",
                 "essa.generations=1", "essa.eval_every=1", "suite.sets=[svamp,mawps]", "suite.limit=3",
                 "suite.max_new_tokens=3", "--quiet"])
    _, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["transfer"]) == {"svamp", "mawps"}
    assert not (run_dir / "essa" / "transfer").exists()  # checked once, by the demo, not again inside train
    verdict = summary["transfer_verdict"]
    assert summary["final_choice"] == "start"
    assert verdict.startswith("transfer check, the final choice kept the start; the search's final mean")
    assert "svamp" in verdict and "mawps" in verdict
    result_line = next(line for line in err.splitlines() if "result:" in line)
    assert "held-out" in result_line and "SFT" in result_line and "ESSA" in result_line
    assert err.index("result:") < err.index(verdict)  # the transfer check is printed right after the result
    # the start's and the final adapter's degeneration on the demo's own test split, side by side
    figures = summary["test_degeneration"]
    assert set(figures) == {"sft", "essa"}
    assert set(figures["sft"]) == {"hit_limit_share", "repeated_4gram_share", "mean_tokens", "no_answer_share"}
    assert all(0 < f["mean_tokens"] <= 3 and 0 <= f["hit_limit_share"] <= 1 for f in figures.values())
    assert err.index("result:") < err.index("degeneration, SFT -> ESSA: hit the token limit") < err.index(verdict)
    assert verdict in (run_dir / "report.md").read_text()


def test_the_transfer_verdict_names_gains_losses_and_no_gain():
    from essa.suite import transfer_verdict

    gains = {"svamp": {"delta": 0.05, "delta_ci95": [0.01, 0.09]},
             "asdiv": {"delta": -0.04, "delta_ci95": [-0.07, -0.02]},
             "mawps": {"delta": 0.01, "delta_ci95": [-0.02, 0.04]}}
    text = transfer_verdict(gains)
    assert "NO GAIN" not in text and "gains beyond noise on svamp +5.0 points (CI +1.0, +9.0)" in text
    assert "loses beyond noise on asdiv -4.0 points" in text and "within noise on mawps +1.0 points" in text
    none = transfer_verdict({"asdiv": gains["asdiv"], "mawps": gains["mawps"]})
    assert "NO GAIN on a real benchmark" in none and "gains beyond" not in none
    assert "NO GAIN" in transfer_verdict({"svamp": {"metric": "accuracy"}})  # nothing compared
    assert text.startswith("transfer check, final vs start: ")
    assert transfer_verdict(gains, kept_start=True).startswith(
        "transfer check, the final choice kept the start; the search's final mean (not chosen) vs start: gains")


def _summary(name, arm_metrics):
    metrics = ["accuracy"]
    arms = {label: {"accuracy": 0.5, "hit_limit_share": 0.25, "repeated_4gram_share": 0.1, "mean_tokens": 40.0,
                    **extra} for label, extra in arm_metrics.items()}
    return {"model": "m", "arms": [{"label": label} for label in arm_metrics],
            "benchmarks": {name: {"examples": 4, "metrics": metrics, "max_new_tokens": 64, "arms": arms,
                                  "comparisons": [{"from": "a", "to": "b", "metric": "accuracy", "delta": 0.0,
                                                   "ci95": [-0.1, 0.1]}]}}}


def test_the_degeneration_table_names_the_boxed_column_only_where_a_benchmark_has_it():
    boxed = suite_mod.markdown_table(_summary("svamp", {"a": {"no_answer_share": 0.5}, "b": {"no_answer_share": 0.0}}))
    plain = suite_mod.markdown_table(_summary("ifeval", {"a": {}, "b": {}}))
    assert "\\boxed{}" in boxed and "| svamp | 64 | 0.25 / 0.10 / 40 / 0.50 | 0.25 / 0.10 / 40 / 0.00 |" in boxed
    assert "boxed" not in plain and "| ifeval | 64 | 0.25 / 0.10 / 40 | 0.25 / 0.10 / 40 |" in plain
