"""Model cards on every exported adapter and merged model, read back with huggingface_hub; --push-to-hub."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard

from essa.cli import main
from essa.config import load_config
from essa.model_card import build_card, read_run
from helpers import make_tiny_model_dir

torch.set_num_threads(1)

SMALL = [
    "task.sft_size=8", "task.train_size=8", "task.validation_size=3", "task.test_size=2", "lora.rank=2",
    "sft.batch_size=8", "decoding.max_new_tokens=4", "essa.popsize=4", "essa.prompts_per_generation=2",
    "essa.generations=2", "essa.eval_every=1", "--quiet",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    model_dir = make_tiny_model_dir(root / "tiny")
    assert main(["sft", f"model.name={model_dir}", f"output_dir={root / 'sft'}", *SMALL]) == 0
    assert main(["train", f"model.name={model_dir}", f"adapter={root / 'sft'}", f"output_dir={root / 'run'}",
                 *SMALL]) == 0
    return root / "run"


def test_train_writes_a_card_the_hub_parses(run_dir):
    card = ModelCard.load(run_dir / "adapter" / "README.md")
    assert card.data.library_name == "peft"
    assert {"essa", "evolution-strategies", "cma-es", "lora", "arithmetic"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local model dir has no hub id
    assert card.data.pipeline_tag == "text-generation"
    summary = json.loads((run_dir / "summary.json").read_text())
    final = json.loads((run_dir / "final.json").read_text())
    text = card.text
    assert "| essa.popsize | 4 |" in text and "| essa.optimizer | sep-cma |" in text
    assert "| generations run | 2 |" in text and "| candidates evaluated | 8 |" in text
    assert "| completions decoded for fitness | 16 |" in text
    assert f"| search dimensions (trainable singular values) | {summary['search_dim']} |" in text
    assert f"chosen: `{final['choice']}`" in text
    # The reproduce commands use the configs written beside the card; they load as they are.
    assert "essa sft --config essa_sft_config.yaml output_dir=sft-run" in text
    assert "essa train --config essa_config.yaml adapter=sft-run/adapter output_dir=essa-run" in text
    cfg = load_config(run_dir / "adapter" / "essa_config.yaml")
    assert cfg.essa.popsize == 4 and cfg.lora.rank == 2
    assert load_config(run_dir / "adapter" / "essa_sft_config.yaml").sft.batch_size == 8


def test_export_and_merge_carry_cards(capsys, run_dir, tmp_path):
    assert main(["export", str(run_dir), "--out", str(tmp_path / "adapter")]) == 0
    card = ModelCard.load(tmp_path / "adapter" / "README.md")
    assert card.data.library_name == "peft" and "PeftModel.from_pretrained" in card.text
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert main(["export", str(run_dir), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    merged = ModelCard.load(tmp_path / "merged" / "README.md")
    assert merged.data.library_name == "transformers" and "peft" not in merged.data.tags
    assert "AutoModelForCausalLM.from_pretrained" in merged.text


def test_exported_adapters_name_their_base_model_portably(run_dir, tmp_path):
    model_dir = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["name"]
    for adapter in (run_dir / "adapter", run_dir.parent / "sft" / "adapter"):
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == model_dir  # a user's own path, as given
    # A run on the bundled model whose adapter names this machine's cache path (older essa):
    # the export names the hub id, which the card's base_model and other machines resolve.
    old = tmp_path / "old"
    (old / "adapter").mkdir(parents=True)
    for item in (run_dir / "adapter").iterdir():
        (old / "adapter" / item.name).write_bytes(item.read_bytes())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["model"]["name"] = "smollm2-135m-instruct"
    (old / "config.yaml").write_text(yaml.safe_dump(config))
    adapter_config = json.loads((old / "adapter" / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = "/home/someone/.cache/essa/models/smollm2-135m-instruct"
    (old / "adapter" / "adapter_config.json").write_text(json.dumps(adapter_config))
    assert main(["export", str(old), "--out", str(tmp_path / "out")]) == 0
    exported = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert exported["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert ModelCard.load(tmp_path / "out" / "README.md").data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_held_out_metrics_with_their_interval_and_demo_command(run_dir, tmp_path):
    # A demo-shaped run: the ESSA step's dir inside a demo dir whose summary holds test results.
    demo = tmp_path / "demo"
    (demo / "essa").mkdir(parents=True)
    for name in ("config.yaml", "summary.json", "final.json"):
        (demo / "essa" / name).write_text((run_dir / name).read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["model"]["name"] = "smollm2-135m-instruct"
    config["task"]["options"] = {"train_file": "openai/gsm8k"}
    (demo / "config.yaml").write_text(yaml.safe_dump(config))
    (demo / "summary.json").write_text(json.dumps({
        "test_accuracy_sft": 0.25, "test_accuracy_essa": 0.375, "delta_ci95": [0.05, 0.2], "mcnemar_p": 0.0123,
        "test_metrics_essa": {"accuracy": 0.375, "mean_reward": 0.4}}))
    card = ModelCard(build_card(read_run(demo / "essa")))
    assert card.data.base_model is None  # the run's own model is a local dir; the demo's config says otherwise:
    record = read_run(demo / "essa")
    record.config = config
    card = ModelCard(build_card(record))
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.datasets == ["openai/gsm8k"]
    for row in ("| test_accuracy_sft | 0.25 |", "| test_accuracy_essa | 0.375 |", "| delta_ci95 | [0.05, 0.2] |",
                "| mcnemar_p | 0.0123 |", "| test_metrics_essa.mean_reward | 0.4 |"):
        assert row in card.text, row
    assert "essa demo --config essa_config.yaml output_dir=demo-run" in card.text


def test_push_to_hub_uploads_the_export_with_its_card(capsys, run_dir, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))

    def upload(self, folder_path, repo_id, **kw):
        card = ModelCard.load(f"{folder_path}/README.md")
        calls.append(("upload", repo_id, card))

    monkeypatch.setattr(HfApi, "upload_folder", upload)
    out = tmp_path / "pushed"
    assert main(["export", str(run_dir), "--out", str(out), "--push-to-hub", "me/essa-adapter", "--private"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["hub_repo"] == "me/essa-adapter"
    assert calls[0] == ("create", "me/essa-adapter", {"repo_type": "model", "private": True, "exist_ok": True})
    assert calls[1][0] == "upload" and calls[1][1] == "me/essa-adapter"
    assert 'PeftModel.from_pretrained(base, "me/essa-adapter")' in calls[1][2].text


def test_push_to_hub_refuses_a_bad_repo_id_before_writing(capsys, run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(HfApi, "upload_folder", lambda *a, **k: pytest.fail("must not upload"))
    out = tmp_path / "pushed"
    assert main(["export", str(run_dir), "--out", str(out), "--push-to-hub", "not a repo id!"]) == 2
    assert "is not a hub repo id" in capsys.readouterr().err
    assert not out.exists()


def test_push_to_hub_failure_is_one_line(capsys, run_dir, tmp_path, monkeypatch):
    def offline(self, *a, **k):
        raise ConnectionError("Max retries exceeded\nwith a long trace")

    monkeypatch.setattr(HfApi, "create_repo", offline)
    assert main(["export", str(run_dir), "--out", str(tmp_path / "p"), "--push-to-hub", "me/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"essa: error: could not push {tmp_path / 'p'} to the hub repo me/x: Max retries exceeded"
