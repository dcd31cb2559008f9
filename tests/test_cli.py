"""The `essa` command line end to end on a tiny model: commands, outputs, and bad input."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import peft
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from adapters import make_random_adapter
from essa.cli import main
from essa.probe import TARGET_FLIPS, ProbeRow, choose_sigma0
from helpers import make_tiny_model_dir, tiny_llama

torch.set_num_threads(1)

SMALL = [
    "task.sft_size=16", "task.train_size=16", "task.validation_size=4", "task.test_size=4",
    "lora.rank=4", "sft.batch_size=8", "decoding.max_new_tokens=4", "essa.popsize=4",
    "essa.prompts_per_generation=2", "essa.generations=2", "essa.eval_every=1", "--quiet",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("m") / "tiny")


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def last_json(out):
    return json.loads(out.strip().splitlines()[-1])


def test_sft_train_eval_export_pipeline(capsys, model_dir, tmp_path):
    sft_dir, run_dir = tmp_path / "sft", tmp_path / "run"
    code, out, _ = run(capsys, "sft", f"model.name={model_dir}", f"output_dir={sft_dir}", *SMALL)
    assert code == 0 and (sft_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert yaml.safe_load((sft_dir / "config.yaml").read_text())["lora"]["rank"] == 4

    code, out, _ = run(capsys, "train", f"model.name={model_dir}", f"adapter={sft_dir}",
                       f"output_dir={run_dir}", *SMALL)
    summary = last_json(out)
    assert code == 0 and summary["generations"] == 2 and summary["search_dim"] == 4  # the default: one scale per module type (q, k, v, o)
    for name in ("metrics.jsonl", "checkpoint.npz", "report.md", "reward_vs_wallclock.png", "config.yaml"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "reward_vs_wallclock.png").read_bytes()[:4] == b"\x89PNG"

    records = tmp_path / "records.jsonl"
    code, out, _ = run(capsys, "eval", f"model.name={model_dir}", f"adapter={run_dir}", "--split", "validation",
                       "--records", records, *SMALL)
    metrics = last_json(out)
    assert code == 0 and metrics["examples"] == 4 and 0.0 <= metrics["accuracy"] <= 1.0
    assert len(records.read_text().splitlines()) == 4

    code, _, _ = run(capsys, "export", run_dir, "--out", tmp_path / "exported")
    assert code == 0 and (tmp_path / "exported" / "adapter_config.json").is_file()


def test_demo_reports_the_paired_test_delta(capsys, model_dir, tmp_path):
    out_dir = tmp_path / "demo"
    code, out, err = run(capsys, "demo", f"model.name={model_dir}", f"output_dir={out_dir}", "essa.sigma0=auto",
                         "sft.patience=1", "sft.eval_every=1", "suite.sets=[]", *SMALL)
    assert code == 0, err
    summary = last_json(out)
    # The early-stopped SFT reports where it stopped (16 examples / batch 8 = 2 steps at most).
    assert 1 <= summary["sft_best_step"] <= summary["sft_steps"] <= 2 and "sft_stopped_early" in summary
    delta = summary["test_accuracy_essa"] - summary["test_accuracy_sft"]
    assert summary["test_accuracy_delta"] == pytest.approx(delta)
    low, high = summary["delta_ci95"]
    assert low <= delta <= high and 0.0 <= summary["mcnemar_p"] <= 1.0
    assert summary["test_gained"] - summary["test_lost"] == round(delta * summary["test_examples"])
    assert "McNemar p" in (out_dir / "report.md").read_text()
    probe = [json.loads(line) for line in (out_dir / "essa" / "metrics.jsonl").read_text().splitlines()][0]
    rows = [ProbeRow(**row) for row in probe["probe"]]  # sigma0: auto was probed and its choice taken
    assert rows and probe["sigma0"] == summary["sigma0"] == choose_sigma0(rows, TARGET_FLIPS, rule="harm")


def test_eval_compare_to_scores_both_on_the_same_examples(capsys, model_dir, tmp_path):
    adapter = make_random_adapter(tiny_llama(seed=0), tmp_path / "adapter", rank=4)
    code, out, err = run(capsys, "eval", f"model.name={model_dir}", f"adapter={adapter}", "--compare-to", "base",
                         "--split", "validation", *SMALL)
    assert code == 0, err
    result = last_json(out)
    assert result["examples"] == 4 and result["baseline"]["adapter"] is None
    assert result["delta"] == pytest.approx(result["candidate"]["accuracy"] - result["baseline"]["accuracy"])
    assert len(result["delta_ci95"]) == 2 and "mcnemar_p" in result and "verdict" in result
    code, _, err = run(capsys, "eval", f"model.name={model_dir}", "--compare-to", "base", *SMALL)
    assert_clean_error(code, err, "--compare-to needs adapter=PATH")


def test_export_merge_matches_peft_logits(capsys, model_dir, tmp_path):
    adapter = make_random_adapter(tiny_llama(seed=0), tmp_path / "adapter", rank=4)
    code, _, err = run(capsys, "export", adapter, "--out", tmp_path / "merged", "--merge", "--model", model_dir)
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    reference = peft.PeftModel.from_pretrained(tiny_llama(seed=0), str(adapter)).eval()
    ids = torch.randint(5, 90, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max() < 1e-4


def test_sampled_eval_reports_avg_and_pass_at_k(capsys, model_dir, tmp_path):
    code, out, err = run(capsys, "eval", f"model.name={model_dir}", "decoding.temperature=1.0", "--samples", 3,
                         "--split", "test", "--limit", 2, *SMALL)
    metrics = last_json(out)
    assert code == 0, err
    assert 0.0 <= metrics["avg@3"] <= metrics["pass@3"] <= 1.0


def assert_clean_error(code, err, fragment):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("essa: error:"), err
    assert fragment in lines[0]


def test_unknown_config_key(capsys, tmp_path):
    code, _, err = run(capsys, "sft", "essa.popsiz=3", f"output_dir={tmp_path / 'out'}")
    assert_clean_error(code, err, "unknown config key 'essa.popsiz'")
    assert not (tmp_path / "out").exists()


def test_unknown_key_in_config_file(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  nmae: x\n")
    code, _, err = run(capsys, "train", "--config", cfg)
    assert_clean_error(code, err, "model.nmae")


@pytest.mark.parametrize("alpha", ["0", "1.5", "-1"])
def test_alpha_outside_unit_interval(capsys, tmp_path, alpha):
    code, _, err = run(capsys, "train", f"essa.alpha={alpha}", f"output_dir={tmp_path / 'out'}")
    assert_clean_error(code, err, "essa.alpha must be in (0, 1]")
    assert not (tmp_path / "out").exists()


def test_adapter_not_matching_model(capsys, model_dir, tmp_path):
    other = tiny_llama(seed=0, hidden_size=48)
    adapter = make_random_adapter(other, tmp_path / "adapter", rank=4)
    code, _, err = run(capsys, "train", f"model.name={model_dir}", f"adapter={adapter}",
                       f"output_dir={tmp_path / 'run'}", *SMALL)
    assert_clean_error(code, err, "model's layer is")
    assert not (tmp_path / "run").exists()


@pytest.mark.ray
def test_adapter_not_matching_model_on_ray_fails_before_writing_or_starting_workers(capsys, model_dir, tmp_path):
    """Ray workers (and vLLM engines) load the weights themselves: the adapter is checked against
    a weightless copy of the model first."""
    ray = pytest.importorskip("ray")
    adapter = make_random_adapter(tiny_llama(seed=0, hidden_size=48), tmp_path / "adapter", rank=4)
    code, _, err = run(capsys, "train", f"model.name={model_dir}", f"adapter={adapter}", "backend.kind=ray",
                       "backend.workers=1", f"output_dir={tmp_path / 'run'}", *SMALL)
    assert_clean_error(code, err, "model's layer is")
    assert not (tmp_path / "run").exists()
    assert not ray.is_initialized()


def test_sft_targets_not_in_model(capsys, model_dir, tmp_path):
    code, _, err = run(capsys, "sft", f"model.name={model_dir}", "lora.targets=[c_attn]",
                       f"output_dir={tmp_path / 'sft'}", *SMALL)
    assert_clean_error(code, err, "c_attn")
    assert not (tmp_path / "sft").exists()


@pytest.mark.parametrize("bad, message", [("task.test_size=0", "empty 'test' split"),
                                          ("lora.targets=[c_attn]", "c_attn")])
def test_demo_with_bad_input_writes_nothing(capsys, model_dir, tmp_path, bad, message):
    code, _, err = run(capsys, "demo", f"model.name={model_dir}", f"output_dir={tmp_path / 'demo'}", *SMALL, bad)
    assert_clean_error(code, err, message)
    assert not (tmp_path / "demo").exists()


def test_unwritable_output_dir(capsys, model_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    code, _, err = run(capsys, "sft", f"model.name={model_dir}", f"output_dir={blocker / 'sub'}", *SMALL)
    assert_clean_error(code, err, "not writable")


def test_empty_dataset(capsys, model_dir, tmp_path):
    code, _, err = run(capsys, "sft", f"model.name={model_dir}", f"output_dir={tmp_path / 'sft'}", *SMALL,
                       "task.sft_size=0")
    assert_clean_error(code, err, "empty 'sft' split")
    assert not (tmp_path / "sft").exists()


def test_missing_model_path(capsys, tmp_path):
    code, _, err = run(capsys, "eval", f"model.name={tmp_path / 'nope'}", "--limit", 1)
    assert_clean_error(code, err, "not found")


def test_resume_required_for_existing_run(capsys, model_dir, tmp_path):
    adapter = make_random_adapter(tiny_llama(seed=0), tmp_path / "adapter", rank=4)
    args = ["train", f"model.name={model_dir}", f"adapter={adapter}", f"output_dir={tmp_path / 'run'}", *SMALL]
    assert run(capsys, *args)[0] == 0
    code, _, err = run(capsys, *args)
    assert_clean_error(code, err, "--resume")
    code, out, _ = run(capsys, *args, "--resume", "essa.generations=3")
    assert code == 0 and last_json(out)["generations"] == 3


def test_train_killed_mid_generation_resumes_to_the_same_run(model_dir, tmp_path):
    """`essa train` in its own process, SIGKILLed while it scores generation 3, then `--resume`:
    the same fitness history, validation, final choice and final adapter as a run never killed."""
    adapter = make_random_adapter(tiny_llama(seed=0), tmp_path / "adapter", rank=2)
    task = f"task.name={Path(__file__).with_name('ray_tasks.py')}:make_vowel_task"
    args = ["train", f"model.name={model_dir}", f"adapter={adapter}", task, "task.options.any_vowel=true",
            "essa.popsize=4", "essa.prompts_per_generation=3", "essa.generations=4", "essa.eval_every=2",
            "decoding.max_new_tokens=6", "--quiet"]

    def train(out, *extra, wait=True):
        cmd = [sys.executable, "-m", "essa.cli", *args, f"output_dir={out}", *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if wait:
            assert proc.wait(timeout=600) == 0, proc.stderr.read()[-2000:]
        return proc

    train(tmp_path / "straight")
    # Reward calls: 6 to validate the start, 12 per generation, 6 to validate after generation 2;
    # call 40 falls in the middle of generation 3.
    reached = tmp_path / "reached"
    proc = train(tmp_path / "killed", "task.options.hang_at_call=40", f"task.options.reached_file={reached}",
                 wait=False)
    for _ in range(6000):
        if reached.exists() or proc.poll() is not None:
            break
        time.sleep(0.1)
    assert reached.exists(), proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    killed = tmp_path / "killed"
    assert [r["generation"] for r in _records(killed) if "fitness_mean" in r] == [1, 2]
    train(killed, "--resume")

    def without_timings(run_dir):
        return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in _records(run_dir)]

    assert without_timings(killed) == without_timings(tmp_path / "straight")
    assert len({r["val_accuracy"] for r in _records(killed) if "val_accuracy" in r}) > 1  # informative
    final = [json.loads((run / "final.json").read_text()) for run in (killed, tmp_path / "straight")]
    assert final[0]["choice"] == final[1]["choice"]
    assert final[0]["validation_accuracy"] == final[1]["validation_accuracy"]
    weights = [(run / "adapter" / "adapter_model.safetensors").read_bytes() for run in (killed, tmp_path / "straight")]
    assert weights[0] == weights[1]


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_plan_command_writes_table_and_plot(capsys, tmp_path):
    code, out, _ = run(capsys, "plan", "--model-params", "32B", "--gpus", "1,16,128", "--out", tmp_path)
    assert code == 0 and "speedup" in out and "Assumptions" in out
    assert (tmp_path / "plan.png").is_file() and (tmp_path / "plan.json").is_file()
    code, _, err = run(capsys, "plan", "--model-params", "32Q")
    assert_clean_error(code, err, "32Q")


def test_demo_defaults_are_the_packaged_demo_yaml():
    from importlib import resources

    from essa.cli import demo_defaults

    packaged = yaml.safe_load(resources.files("essa").joinpath("configs", "demo.yaml").read_text())
    cfg = demo_defaults()
    assert cfg.essa.popsize == packaged["essa"]["popsize"]
    assert cfg.task.sft_size == packaged["task"]["sft_size"]
    assert cfg.decoding.max_new_tokens == packaged["decoding"]["max_new_tokens"]


def test_math_example_config_is_the_demo():
    # configs/math.yaml promises the demo's settings for the separate commands.
    from pathlib import Path

    from essa.cli import demo_defaults
    from essa.config import load_config

    cfg, demo = load_config(Path(__file__).parents[1] / "configs" / "math.yaml"), demo_defaults()
    for section in ("model", "task", "lora", "sft", "decoding", "essa"):
        assert getattr(cfg, section) == getattr(demo, section), section


# math.yaml fixes the step size: its start solves ~2%, where the probe finds no flips; ifeval.yaml fixes
# the step the probe always chose there, as probing 80-token completions took 40% of the budget
# (docs/history/2026-12-03-math-style-first-runs.md, docs/history/2026-12-03-ifeval-14-requests.md).
@pytest.mark.parametrize("name, sigma0", [("arithmetic.yaml", "auto"), ("ifeval.yaml", 0.4), ("math.yaml", 0.8)])
def test_shipped_example_configs_load(name, sigma0):
    from pathlib import Path

    from essa.config import load_config

    cfg = load_config(Path(__file__).parents[1] / "configs" / name)
    assert cfg.essa.offsets == "relative" and cfg.essa.sigma0 == sigma0
    assert cfg.task.name == name.removesuffix(".yaml")


def test_a_demo_of_another_task_checks_that_tasks_real_benchmark():
    """`essa demo --config FILE` layers FILE over the packaged demo.yaml: the IFEval-like config
    must not inherit the math demo's word-problem transfer sets."""
    from pathlib import Path

    from essa.cli import demo_defaults
    from essa.config import load_config

    configs = Path(__file__).parents[1] / "configs"
    ifeval = load_config(configs / "ifeval.yaml", base=demo_defaults())
    assert ifeval.suite.sets == ["ifeval", "ifbench"] and ifeval.suite.limit is None
    assert load_config(configs / "math.yaml", base=demo_defaults()).suite == demo_defaults().suite


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_backend_without_vllm_installed(capsys, model_dir, tmp_path):
    adapter = make_random_adapter(tiny_llama(seed=0), tmp_path / "adapter", rank=4)
    code, _, err = run(capsys, "train", f"model.name={model_dir}", f"adapter={adapter}", "backend.kind=vllm",
                       f"output_dir={tmp_path / 'run'}", *SMALL)
    assert_clean_error(code, err, "needs vLLM")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("backend", [["backend.kind=vllm"], ["backend.kind=ray", "backend.worker_engine=vllm"]])
def test_int8_quantize_is_not_a_vllm_setting(capsys, model_dir, tmp_path, backend):
    adapter = make_random_adapter(tiny_llama(seed=0), tmp_path / "adapter", rank=4)
    code, _, err = run(capsys, "train", *backend, "model.quantize=int8", f"model.name={model_dir}",
                       f"adapter={adapter}", f"output_dir={tmp_path / 'run'}")
    assert_clean_error(code, err, "backend.vllm_options.quantization")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [
    ("model.threads=0", "model.threads must be >= 1 or null"),
    ("backend.threads_per_worker=0", "backend.threads_per_worker must be >= 1"),
    ("backend.kind=gpu", "backend.kind must be one of local, vllm, ray"),
    ("backend.chunk_timeout_s=0", "backend.chunk_timeout_s must be > 0 or null"),
    ("decoding.top_p=0", "decoding.top_p must be in (0, 1]"),
    ("essa.optimizer_options.lr=0.1", "unknown config key 'essa.optimizer_options.lr': optimizer sep-cma"),
    ("grpo.micro_batch_size=5", "grpo.micro_batch_size must divide"),
    ("essa.final_challengers=[mean,best]", "essa.final_challengers takes a non-empty list of distinct names"),
])
def test_bad_settings_name_the_key_the_user_set(capsys, tmp_path, override, message):
    code, _, err = run(capsys, "train", override, f"output_dir={tmp_path / 'out'}")
    assert_clean_error(code, err, message)
    assert not (tmp_path / "out").exists()


def test_free_mappings_take_the_users_keys():
    from essa.config import load_config

    cfg = load_config(None, ["backend.vllm_options.quantization=awq", "backend.vllm_options.max_model_len=512",
                             "essa.optimizer=openai-es", "essa.optimizer_options.lr=0.1", "task.options.level=2"])
    assert cfg.backend.vllm_options == {"quantization": "awq", "max_model_len": 512}
    assert cfg.essa.optimizer_options == {"lr": 0.1} and cfg.task.options == {"level": 2}


def test_plan_and_compare_are_commands_of_the_one_parser(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "compare" in out and "plan" in out
    code, _, err = run(capsys, "compare", "--no-such-flag")
    assert_clean_error(code, err, "unrecognized arguments: --no-such-flag")
    code, _, err = run(capsys, "plan", "--gpus")
    assert_clean_error(code, err, "--gpus")


def test_ray_address_flag_selects_an_existing_ray_cluster():
    from essa.cli import _config, parse_args

    args = parse_args(["train", "--ray-address", "10.0.0.5:6379", "backend.workers=4"])
    cfg = _config(args)
    assert (cfg.backend.kind, cfg.backend.ray_address, cfg.backend.workers) == ("ray", "10.0.0.5:6379", 4)
    assert _config(parse_args(["train"])).backend.kind == "local"


def test_sft_over_an_interrupted_one_asks_for_resume_and_resume_reads_its_checkpoint(capsys, model_dir, tmp_path):
    run_dir = tmp_path / "sft"
    run_dir.mkdir()
    (run_dir / "adapter.checkpoint.npz").write_bytes(b"not a checkpoint")
    code, _, err = run(capsys, "sft", f"model.name={model_dir}", f"output_dir={run_dir}", *SMALL)
    assert code == 2 and "pass --resume" in err and "Traceback" not in err
    code, _, err = run(capsys, "sft", f"model.name={model_dir}", f"output_dir={run_dir}", "--resume", *SMALL)
    assert code == 2 and "cannot read state file" in err and "Traceback" not in err
    assert not (run_dir / "adapter").exists()
