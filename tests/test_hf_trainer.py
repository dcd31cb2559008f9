"""essa.ESSATrainer / essa.ESSAConfig: TRL's GRPOTrainer shape over essa's own trainer."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import datasets
import numpy as np
import peft
import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard

from adapters import make_random_adapter
from essa import ESSAConfig, ESSATrainer
from essa.cli import main
from essa.config import Config, load_config, settings
from essa.errors import EssaError
from essa.hf_config import FIELDS
from essa.tasks.dataset import DatasetOptions
from helpers import make_tiny_model_dir, tiny_llama, tiny_tokenizer

torch.set_num_threads(1)

README = Path(__file__).resolve().parent.parent / "README.md"
ROWS = [{"prompt": f"say {i}", "completion": "aeiou", "answer": str(i)} for i in range(16)]


def vowels(completions, **kwargs):
    return [sum(ch in "aeiou" for ch in c) / 6 for c in completions]


def small(**changes):
    base = dict(output_dir="out", popsize=4, generations=2, prompts_per_generation=3, max_completion_length=6,
                sigma0=0.5, eval_every=1, sft_batch_size=8, lora_r=2, lora_alpha=4.0,
                lora_target_modules=["q_proj", "v_proj"], validation_size=4)
    return ESSAConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("m") / "tiny"))


# -- ESSAConfig is a view of the config sections, not a second copy --------------------------------
def test_every_field_is_a_config_setting_with_its_default_and_help():
    known = {s.key: s for s in settings()} | {s.key: s for s in settings(DatasetOptions, "task.options.")}
    default = ESSAConfig()
    for f in dataclasses.fields(ESSAConfig):
        s = known[FIELDS[f.name]]
        assert getattr(default, f.name) == s.default, f.name
        assert f.metadata["help"] == s.help and f.metadata["config_key"] == s.key
        assert f.name in ESSAConfig.__doc__


def test_config_round_trip_yaml_and_cli_keys(tmp_path):
    args = ESSAConfig(popsize=24, max_completion_length=32, report_to="tensorboard", reward_weights=[1.0, 0.5],
                      lora_target_modules=["q_proj"], sft_learning_rate=1e-3)
    cfg = args.to_config()
    assert (cfg.essa.popsize, cfg.decoding.max_new_tokens, cfg.tracking.report_to) == (24, 32, ["tensorboard"])
    assert cfg.task.options["reward_weights"] == [1.0, 0.5] and cfg.lora.targets == ["q_proj"]
    assert cfg.sft.lr == 1e-3
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"essa": {"popsize": 24}, "decoding": {"max_new_tokens": 32}}))
    loaded = ESSAConfig.from_config(load_config(path, ["tracking.report_to=tensorboard"]))
    assert loaded.changed() == {"popsize": 24, "max_completion_length": 32, "report_to": ["tensorboard"]}
    assert ESSAConfig.from_config(Config()).changed() == {}


def test_every_setting_essa_train_reads_is_a_field_and_the_rest_is_named():
    from essa.hf_config import NOT_FIELDS

    reached = set(FIELDS.values())
    for s in settings():
        excluded = any(s.key == p or s.key.startswith(p) for p in NOT_FIELDS)
        assert (s.key in reached) != excluded or s.key in ("task.seed", "task.validation_size"), s.key
    # The search-space settings that docs/BENCHMARKS.md measured are reachable and reach the config.
    args = ESSAConfig(share=["layers"], layer_groups=2, offsets="additive", final_challengers=["mean"],
                      guard_sets=["svamp"], sft_patience=2, temperature=0.7, decoding_pack_weights=False)
    cfg = args.to_config()
    assert (cfg.essa.share, cfg.essa.layer_groups, cfg.essa.offsets) == (["layers"], 2, "additive")
    assert (cfg.essa.final_challengers, cfg.essa.guard_sets, cfg.sft.patience) == (["mean"], ["svamp"], 2)
    assert cfg.decoding.temperature == 0.7 and cfg.decoding.pack_weights is False
    assert ESSAConfig.from_config(cfg) == args


@pytest.mark.parametrize("override, message", [
    ("grpo.lr=0.01", "ESSAConfig cannot take grpo.lr=0.01 (a setting of `essa compare`'s GRPO arm"),
    ("compare.budget_s=60", "compare.budget_s=60"),
    ("model.name=some/model", "model.name='some/model' (the model is ESSATrainer's `model` argument)"),
    ("task.name=math", "task.name='math' (the data and rewards are ESSATrainer's train_dataset"),
])
def test_from_config_refuses_a_setting_it_would_drop(override, message):
    with pytest.raises(EssaError) as exc:
        ESSAConfig.from_config(load_config(None, [override]))
    assert message in str(exc.value)
    if override.startswith(("model.", "task.")):  # an ESSATrainer run's own config: the arguments pass
        assert ESSAConfig.from_config(load_config(None, [override]), arguments=True) == ESSAConfig()


def test_library_defaults_are_the_measured_search_settings():
    """ESSATrainer and `essa train` without a YAML search what the demo measured a gain with."""
    from importlib import resources

    demo = yaml.safe_load(resources.files("essa").joinpath("configs/demo.yaml").read_text())["essa"]
    default = ESSAConfig().to_config().essa
    for key in ("alpha", "offsets", "share", "optimizer", "optimizer_options", "popsize", "sigma0",
                "prompts_per_generation", "eval_every"):
        expected = demo[key]
        if key == "optimizer_options":
            from essa.optim import check_optimizer_options

            assert check_optimizer_options(default.optimizer, {}) == check_optimizer_options(demo["optimizer"],
                                                                                             expected)
            continue
        assert getattr(default, key) == expected, key


@pytest.mark.parametrize("kwargs, message", [
    ({"popsize": 1}, "popsize must be >= 2 (got 1)"),
    ({"alpha": 1.5}, "alpha must be in (0, 1] (got 1.5)"),
    ({"max_completion_length": 0}, "max_completion_length must be >= 1"),
    ({"report_to": "mlflow"}, "report_to must be one of none, tensorboard, wandb, trackio (got 'mlflow')"),
    ({"report_to": ["none", "wandb"]}, "report_to cannot combine none"),
    ({"learning_rate": 1e-5}, "no setting 'learning_rate' (learning_rate: ESSA takes no gradient steps"),
    ({"num_generations": 8}, "num_generations: GRPO's group size; ESSA's candidates per generation are popsize"),
])
def test_bad_settings_are_one_error_naming_the_field(kwargs, message):
    with pytest.raises(EssaError) as exc:
        ESSAConfig(**kwargs)
    assert message in str(exc.value)


# -- training --------------------------------------------------------------------------------------
def test_peft_model_start_trains_evaluates_and_saves_with_a_card(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = tiny_llama(seed=0)
    adapter = make_random_adapter(base, tmp_path / "start", rank=2, targets=["q_proj", "v_proj"])
    policy = peft.PeftModel.from_pretrained(tiny_llama(seed=0), str(adapter))
    trainer = ESSATrainer(model=policy, reward_funcs=vowels, train_dataset=datasets.Dataset.from_list(ROWS[:12]),
                          eval_dataset=ROWS[12:], args=small(), processing_class=tiny_tokenizer(), progress=False)
    assert not any("lora" in name for name, _ in trainer.model.named_modules())  # LoRA layers taken out
    summary = trainer.train()
    assert summary["generations"] == 2 and summary["search_dim"] == 2  # the default space: one scale per module type (q, v)
    assert (tmp_path / "out" / "start_adapter" / "adapter_model.safetensors").is_file()
    history = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in history if "fitness_mean" in r] == [1, 2]
    held_out = [{"prompt": f"tell {i}", "answer": str(i)} for i in range(3)]
    metrics = trainer.evaluate(datasets.Dataset.from_list(held_out))
    assert metrics["eval_examples"] == 3 and 0.0 <= metrics["eval_mean_reward"] <= 1.0
    saved = trainer.save_model("exported")
    card = ModelCard.load(saved / "README.md")
    assert card.data.library_name == "peft" and "| eval_examples | 3 |" in card.text
    assert "the eval_dataset passed to it" in card.text
    assert "ESSATrainer(" in card.text and "adapter='out/start_adapter'" in card.text
    # The saved adapter is the run's final one.
    assert (saved / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "out" / "adapter" / "adapter_model.safetensors").read_bytes()

    pushed = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: pushed.append(repo_id))
    monkeypatch.setattr(HfApi, "upload_folder",
                        lambda self, folder_path, repo_id, **kw: pushed.append(
                            ModelCard.load(f"{folder_path}/README.md").text))
    assert trainer.push_to_hub("me/vowels") == "https://huggingface.co/me/vowels"
    assert pushed[0] == "me/vowels" and 'PeftModel.from_pretrained(base, "me/vowels")' in pushed[1]


def test_plain_model_with_peft_config_runs_the_sft_warm_start_first(model_dir, tmp_path):
    args = small(output_dir=str(tmp_path / "out"), report_to="tensorboard", validation_size=4)
    trainer = ESSATrainer(model=model_dir, reward_funcs=[vowels], train_dataset=ROWS, args=args,
                          peft_config=peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj"]),
                          progress=False)
    before = trainer.evaluate()  # no adapter yet: the base model, on the held-out validation prompts
    assert before["eval_examples"] == 4 and set(before) >= {"eval_accuracy", "eval_mean_reward"}
    trainer.train()
    sft = json.loads((tmp_path / "out" / "sft" / "adapter" / "adapter_config.json").read_text())
    assert sft["r"] == 2 and sorted(sft["target_modules"]) == ["k_proj", "q_proj"]
    assert (tmp_path / "out" / "tensorboard").is_dir()
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert saved["task"]["name"] == "dataset" and saved["task"]["options"]["source"] == "python"
    assert saved["task"]["options"]["reward_funcs"] == ["test_hf_trainer:vowels"]
    assert saved["essa"]["popsize"] == 4 and saved["lora"]["targets"] == ["k_proj", "q_proj"]
    assert len(trainer.task.split("validation")) == 4 and len(trainer.task.split("train")) == 12
    # The config it wrote names where it came from, and says so when used on the command line.
    code = main(["train", "--config", str(tmp_path / "out" / "config.yaml"), f"output_dir={tmp_path / 'again'}"])
    assert code == 2 and not (tmp_path / "again").exists()


def test_interrupted_training_resumes_from_its_checkpoint(model_dir, tmp_path):
    def trainer(generations):
        return ESSATrainer(model=model_dir, reward_funcs=[vowels], train_dataset=ROWS,
                           args=small(output_dir=str(tmp_path / "out"), generations=generations), progress=False)

    trainer(2).train()
    with pytest.raises(EssaError, match="already holds an ESSA run"):
        trainer(3).train()
    summary = trainer(3).train(resume_from_checkpoint=True)
    assert summary["generations"] == 3
    history = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in history if "fitness_mean" in r] == [1, 2, 3]


def bad_signature(x):
    return [0.0]


def wrong_count(completions, **kwargs):
    return [0.0]


@pytest.mark.parametrize("case, message", [
    ("signature", "reward function test_hf_trainer:bad_signature needs an argument 'x'"),
    ("count", "returned 1 values for 2 completions"),
    ("no_prompt", "train_dataset has no 'prompt' column (columns: question)"),
    ("not_lora", "is a IA3Config"),
    ("dora", "holds weights ESSA would drop: DoRA"),
    ("report_to", "report_to must be one of none"),
    ("ray", "backend='ray' needs a task its workers can rebuild"),
    ("no_start", "ESSA starts from a LoRA adapter"),
    ("peft_dora", "peft_config sets use_dora"),
    ("weights", "reward_weights has 2 weights for 1 reward functions"),
    ("args", "args must be an essa.ESSAConfig"),
    ("two_starts", "args.adapter is the start adapter; peft_config would train another"),
])
def test_bad_input_is_one_error_and_nothing_written(case, message, model_dir, tmp_path):
    out = tmp_path / "out"
    kwargs = dict(model=model_dir, reward_funcs=[vowels], train_dataset=ROWS, args=small(output_dir=str(out)),
                  peft_config=peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]), progress=False)
    if case == "signature":
        kwargs["reward_funcs"] = [bad_signature]
    elif case == "count":
        kwargs["reward_funcs"] = [vowels, wrong_count]
    elif case == "no_prompt":
        kwargs["train_dataset"] = datasets.Dataset.from_list([{"question": "q"}])
    elif case in ("not_lora", "dora"):
        config = (peft.IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=[])
                  if case == "not_lora" else
                  peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True))
        kwargs["model"] = peft.get_peft_model(tiny_llama(seed=0), config)
        kwargs["processing_class"] = tiny_tokenizer()
        del kwargs["peft_config"]
    elif case == "report_to":
        kwargs["args"] = dict(output_dir=str(out), report_to="mlflow")
    elif case == "ray":
        kwargs["args"] = small(output_dir=str(out), backend="ray")
    elif case == "no_start":
        kwargs["train_dataset"] = [{"prompt": r["prompt"]} for r in ROWS]
    elif case == "peft_dora":
        kwargs["peft_config"] = peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)
    elif case == "weights":
        kwargs["args"] = small(output_dir=str(out), reward_weights=[1.0, 2.0])
    elif case == "args":
        kwargs["args"] = {"output_dir": str(out)}
    elif case == "two_starts":
        start = make_random_adapter(tiny_llama(seed=0), tmp_path / "start", rank=2, targets=["q_proj"])
        kwargs["args"] = small(output_dir=str(out), adapter=str(start))
    with pytest.raises(EssaError) as exc:
        if case == "report_to":
            kwargs["args"] = ESSAConfig(**kwargs["args"])
        ESSATrainer(**kwargs)
    assert message in str(exc.value)
    assert not out.exists()


def test_peft_model_left_unchanged_when_refused(tmp_path):
    policy = peft.get_peft_model(tiny_llama(seed=0), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                                      use_dora=True))
    before = {name for name, _ in policy.named_modules()}
    with pytest.raises(EssaError):
        ESSATrainer(model=policy, reward_funcs=vowels, train_dataset=ROWS, processing_class=tiny_tokenizer(),
                    args=small(output_dir=str(tmp_path / "out")), progress=False)
    assert {name for name, _ in policy.named_modules()} == before


# -- the README's "From GRPOTrainer to ESSATrainer" -----------------------------------------------------
def readme_blocks():
    text = README.read_text()
    blocks = dict(re.findall(r"<!-- example: (\w+) -->\s*```python\n(.*?)```", text, flags=re.S))
    assert set(blocks) == {"common", "grpo", "essa"}, sorted(blocks)
    return blocks


@pytest.mark.parametrize("shape", ["grpo", "essa"])
def test_readme_grpo_to_essa_example_runs_as_written(shape, model_dir, tmp_path, monkeypatch):
    blocks = readme_blocks()
    common = blocks["common"]
    line = 'MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"'
    assert line in common
    source = common.replace(line, f"MODEL = {model_dir!r}") + "\n" + blocks[shape]
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    exec(compile(source, f"README.md ({shape})", "exec"), namespace)
    out = tmp_path / f"{shape}-out"
    adapter = out / "adapter" if shape == "essa" else out
    assert peft.PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path == model_dir
    if shape == "essa":
        assert ModelCard.load(out / "adapter" / "README.md").data.library_name == "peft"
        assert namespace["trainer"].adapter_dir.resolve() == (out / "adapter").resolve()
        assert_searched_the_recommended_space(out)


def assert_searched_the_recommended_space(out):
    summary = json.loads((out / "summary.json").read_text())
    config = yaml.safe_load((out / "config.yaml").read_text())["essa"]
    assert config["share"] == ["layers", "values", "factors"] and config["optimizer"] == "sep-cma"
    assert summary["search_dim"] == 4  # one scale per module type: q, k, v, o


@pytest.mark.bundled
def test_readme_essa_example_on_the_bundled_model_names_its_hub_id(tmp_path, monkeypatch):
    """The README's ESSA script as written, on the bundled model (the hub is out of reach) and a
    short budget: the adapter names the hub id, not this machine's cache path."""
    blocks = readme_blocks()
    line = 'MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"'
    script = blocks["essa"].replace("generations=10", "generations=2")
    assert script != blocks["essa"]
    source = blocks["common"].replace(line, 'MODEL = "smollm2-135m-instruct"') + "\n" + script
    monkeypatch.chdir(tmp_path)
    exec(compile(source, "README.md (essa, bundled)", "exec"), {"__name__": "__main__"})
    out = tmp_path / "essa-out"
    for adapter in (out / "adapter", out / "sft" / "adapter"):
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert_searched_the_recommended_space(out)


def test_readme_shapes_differ_only_in_the_trainer_lines():
    blocks = readme_blocks()
    grpo = blocks["grpo"].replace("GRPO", "ESSA").splitlines()
    essa = blocks["essa"].splitlines()
    assert len(grpo) == len(essa)
    differing = [(a, b) for a, b in zip(grpo, essa) if a != b]
    assert len(differing) <= 3, differing  # the args line(s): each method's own settings


# -- the bundled model: ESSATrainer reproduces `essa train` ---------------------------------------------
GRADED = '''
from essa.tasks.answers import numeric_reward
from essa.tasks.arithmetic import ArithmeticTask


class Graded(ArithmeticTask):
    """Arithmetic with partial credit, so that candidates' fitness differs even far from correct."""

    def reward(self, completion, example):
        return numeric_reward(completion, example.answer) + len(set(completion)) / 100
'''


@pytest.mark.bundled
def test_essa_trainer_reproduces_essa_train_on_the_bundled_model(tmp_path, monkeypatch):
    import importlib.util

    from essa.config import ModelConfig, TaskConfig
    from essa.models import load_model
    from essa.tasks.answers import numeric_reward

    model, tokenizer = load_model(ModelConfig())
    adapter = make_random_adapter(model, tmp_path / "sft", rank=8, lora_alpha=16)
    (tmp_path / "graded.py").write_text(GRADED)
    sizes = dict(sft_size=0, train_size=8, validation_size=2, test_size=0)
    settings_ = ["essa.popsize=4", "essa.prompts_per_generation=2", "essa.generations=3", "essa.eval_every=2",
                 "essa.sigma0=0.3", "essa.seed=3", "decoding.max_new_tokens=8"]
    code = main(["train", f"adapter={adapter}", f"output_dir={tmp_path / 'cli'}",
                 f"task.name={tmp_path / 'graded.py'}:Graded", *[f"task.{k}={v}" for k, v in sizes.items()],
                 *settings_, "--quiet"])
    assert code == 0

    spec = importlib.util.spec_from_file_location("graded", tmp_path / "graded.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    task = module.Graded(TaskConfig(name="graded", **sizes))

    def rows(split):
        return datasets.Dataset.from_list([{"prompt": task.messages(ex), "answer": str(ex.answer)}
                                           for ex in task.split(split)])

    def graded(completions, answer, **kwargs):  # TRL's signature; chat prompts give message completions
        texts = [c[0]["content"] for c in completions]
        return [numeric_reward(t, a) + len(set(t)) / 100 for t, a in zip(texts, answer)]

    args = ESSAConfig(output_dir=str(tmp_path / "api"), adapter=str(adapter), popsize=4, prompts_per_generation=2,
                      generations=3, eval_every=2, sigma0=0.3, seed=3, max_completion_length=8)
    trainer = ESSATrainer(model=model, reward_funcs=[graded], train_dataset=rows("train"),
                          eval_dataset=rows("validation"), args=args, processing_class=tokenizer, progress=False)
    trainer.train()

    def history(run):
        lines = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("wall_clock_s", "validation_s")} for r in lines]

    cli, api = history("cli"), history("api")
    assert cli == api
    fitness = [r["fitness_mean"] for r in cli if "fitness_mean" in r]
    assert len(fitness) == 3 and len(set(fitness)) > 1  # the history is not one repeated number
    assert np.array_equal(np.load(tmp_path / "cli" / "final_offsets.npy"),
                          np.load(tmp_path / "api" / "final_offsets.npy"))
