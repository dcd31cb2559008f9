"""LoRA SFT warm start: label masking, batching, training, the saved PEFT adapter, failures."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from helpers import EOS_ID, PAD_ID, tiny_llama, tiny_tokenizer
from safetensors.torch import load_file

import essa.sft as sft_mod
from essa.config import LoraConfig, SftConfig
from essa.errors import EssaError
from essa.sft import IGNORE_INDEX, Encoded, batch_stream, collate, encode_example, run_sft, total_steps
from essa.sft_checkpoint import checkpoint_path
from essa.tasks import Example, Task, format_prompt

torch.set_num_threads(1)

PAIRS = [("a", "b"), ("c", "d"), ("e", "f"), ("g", "h")]


class PairTask(Task):
    """Fixed prompt -> one-letter answer pairs; reward is exact match."""

    name = "pairs"

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.pairs = pairs

    def split(self, name: str) -> list[Example]:
        if name != "sft":
            return []
        return [Example(prompt=p, answer=t, target=t) for p, t in self.pairs]

    def reward(self, completion: str, example: Example) -> float:
        return float(completion.strip() == example.answer)


def _base():
    """tiny_llama with a larger output head: at its default init scale the logits cannot move
    far whatever the attention layers do, which hides whether training works."""
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return model


def _lora(targets=("q_proj", "v_proj")) -> LoraConfig:
    return LoraConfig(rank=4, lora_alpha=8.0, targets=list(targets), dropout=0.0)


def _sft(**kw) -> SftConfig:
    return SftConfig(**{"epochs": 1000.0, "lr": 3e-2, "batch_size": 4, "max_steps": 25, "seed": 0, **kw})


def _task_loss(model, tokenizer, task: Task) -> float:
    """Mean completion-token loss of `model` on the task's sft split (one batch)."""
    items = [encode_example(tokenizer, format_prompt(tokenizer, task, ex), ex.target, 256)
             for ex in task.split("sft")]
    with torch.no_grad():
        return model(**collate(items, PAD_ID)).loss.item()


def _probe_logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(["<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb"],
                    add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


# --- tokenization and batching -------------------------------------------------------------

def test_encode_example_masks_prompt_and_appends_eos():
    tok = tiny_tokenizer()
    enc = encode_example(tok, "<|im_start|>user\nab<|im_end|>\n", "xy", max_length=256)
    prompt_ids = tok("<|im_start|>user\nab<|im_end|>\n", add_special_tokens=False)["input_ids"]
    target_ids = tok("xy", add_special_tokens=False)["input_ids"]
    assert enc.input_ids == prompt_ids + target_ids + [EOS_ID]
    assert enc.labels == [IGNORE_INDEX] * len(prompt_ids) + target_ids + [EOS_ID]


def test_encode_example_truncates_to_max_length():
    tok = tiny_tokenizer()
    enc = encode_example(tok, "abcd", "xyz", max_length=5)
    assert len(enc.input_ids) == len(enc.labels) == 5
    assert enc.labels[:4] == [IGNORE_INDEX] * 4
    assert enc.labels[4] == tok.convert_tokens_to_ids("x")


def test_collate_right_pads_and_ignores_padding():
    items = [Encoded([5, 6, 7], [IGNORE_INDEX, 6, 7]), Encoded([8, 9], [IGNORE_INDEX, 9])]
    batch = collate(items, pad_id=PAD_ID)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, PAD_ID]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX, 9, IGNORE_INDEX]]


def test_total_steps_fractional_epochs_and_cap():
    assert total_steps(10, SftConfig(epochs=1.0, batch_size=4)) == 3
    assert total_steps(10, SftConfig(epochs=0.5, batch_size=4)) == 2
    assert total_steps(10, SftConfig(epochs=0.01, batch_size=4)) == 1
    assert total_steps(10, SftConfig(epochs=5.0, batch_size=4, max_steps=7)) == 7
    with pytest.raises(EssaError, match="max_steps"):
        total_steps(10, SftConfig(max_steps=0))


def test_batch_stream_covers_each_example_once_per_epoch_and_is_seeded():
    items = [Encoded([i], [i]) for i in range(5)]
    stream = batch_stream(items, batch_size=2, seed=3)
    epoch = [next(stream) for _ in range(3)]
    assert [len(b) for b in epoch] == [2, 2, 1]
    assert sorted(e.input_ids[0] for b in epoch for e in b) == list(range(5))
    again = batch_stream(items, batch_size=2, seed=3)
    assert [[e.input_ids for e in next(again)] for _ in range(3)] == [[e.input_ids for e in b] for b in epoch]


# --- training and the saved adapter --------------------------------------------------------

@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_run_sft_trains_saves_loadable_adapter_and_leaves_base_unchanged(tmp_path, monkeypatch):
    tok, model, task = tiny_tokenizer(), _base(), PairTask(PAIRS)
    reference = copy.deepcopy(model.state_dict())
    grads_before = {n: p.requires_grad for n, p in model.named_parameters()}
    base_loss = _task_loss(model, tok, task)

    trained = {}
    real_unload = sft_mod.unload_lora

    def spy_unload(peft_model):
        peft_model.eval()
        trained["logits"] = _probe_logits(peft_model, tok)
        return real_unload(peft_model)

    monkeypatch.setattr(sft_mod, "unload_lora", spy_unload)
    rng_before = torch.random.get_rng_state()
    out = tmp_path / "adapter"
    result = run_sft(model, tok, task, _lora(), _sft(), out, progress=False)

    assert torch.equal(torch.random.get_rng_state(), rng_before)  # caller's RNG untouched
    assert result.adapter_dir == out and result.steps == 25
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()

    # Base model: same weights, no LoRA layers left, same flags and mode.
    assert not any("lora" in n for n, _ in model.named_modules())
    assert model.state_dict().keys() == reference.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads_before
    assert not model.training

    # The adapter on a fresh copy of the base reproduces the trained model and lowers the loss.
    loaded = peft.PeftModel.from_pretrained(_base(), str(out)).eval()
    torch.testing.assert_close(_probe_logits(loaded, tok), trained["logits"], rtol=0, atol=1e-5)
    assert not torch.allclose(_probe_logits(model, tok), trained["logits"], atol=1e-3)
    tuned_loss = _task_loss(loaded, tok, task)
    assert tuned_loss < 0.5 * base_loss

    metrics = json.loads((out / "sft_metrics.json").read_text())
    assert metrics["steps"] == 25 and metrics["examples"] == len(PAIRS)
    assert len(metrics["losses"]) == 25 and metrics["final_loss"] == result.final_loss
    assert metrics["final_loss"] < metrics["losses"][0]
    assert metrics["mean_loss"] == pytest.approx(sum(metrics["losses"]) / 25)


def test_adapter_config_records_rank_alpha_targets(tmp_path):
    out = tmp_path / "adapter"
    lora = LoraConfig(rank=2, lora_alpha=5.0, targets=["k_proj", "o_proj", "up_proj"], dropout=0.1)
    run_sft(tiny_llama(), tiny_tokenizer(), PairTask(PAIRS), lora, _sft(max_steps=2), out, progress=False)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 5.0 and config["lora_dropout"] == 0.1
    assert set(config["target_modules"]) == {"k_proj", "o_proj", "up_proj"}
    assert config["task_type"] == "CAUSAL_LM" and config["peft_type"] == "LORA"
    tensors = load_file(out / "adapter_model.safetensors")
    adapted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in tensors}
    assert adapted == {"k_proj", "o_proj", "up_proj"}
    assert all(t.shape[0] == 2 for n, t in tensors.items() if "lora_A" in n)


def test_same_seed_gives_identical_adapter_other_seed_differs(tmp_path):
    reused = tiny_llama()

    def weights(seed, name, model):
        torch.manual_seed(len(name) * 1000 + ord(name[0]))  # the global RNG state must not matter
        run_sft(model, tiny_tokenizer(), PairTask(PAIRS), _lora(), _sft(max_steps=3, seed=seed),
                tmp_path / name, progress=False)
        return load_file(tmp_path / name / "adapter_model.safetensors")

    # The second run reuses the first run's model object: it must come back fit for another run.
    first, second = weights(0, "a", reused), weights(0, "bb", reused)
    other = weights(1, "c", tiny_llama())
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_rerun_replaces_existing_adapter_dir(tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    run_sft(tiny_llama(), tiny_tokenizer(), PairTask(PAIRS), _lora(), _sft(max_steps=1), out, progress=False)
    assert not (out / "stale.txt").exists() and (out / "adapter_config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temp dirs left behind


# --- failures ------------------------------------------------------------------------------

def _no_training(*args, **kwargs):
    raise AssertionError("training must not start")


def test_missing_target_names_it_and_lists_linear_layers(tmp_path, monkeypatch):
    monkeypatch.setattr(sft_mod, "train_loop", _no_training)
    model = tiny_llama()
    with pytest.raises(EssaError) as err:
        run_sft(model, tiny_tokenizer(), PairTask(PAIRS), _lora(["q_proj", "c_attn"]), _sft(),
                tmp_path / "adapter", progress=False)
    message = str(err.value)
    assert "c_attn" in message and "q_proj" in message and "gate_proj" in message
    assert "q_proj," not in message.split("linear layers")[0]  # only the missing one is named missing
    assert not any("lora" in n for n, _ in model.named_modules())
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_dir_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(sft_mod, "train_loop", _no_training)
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    with pytest.raises(EssaError, match="not writable"):
        run_sft(tiny_llama(), tiny_tokenizer(), PairTask(PAIRS), _lora(), _sft(),
                blocker / "sub" / "adapter", progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]
    assert blocker.read_text() == "not a directory"


@pytest.mark.parametrize("settings, key", [({"max_steps": 0}, "sft.max_steps"), ({"batch_size": 0}, "sft.batch_size"),
                                           ({"lr": 0.0}, "sft.lr"), ({"epochs": -1.0}, "sft.epochs")])
def test_bad_sft_settings_name_their_key(settings, key):
    with pytest.raises(EssaError, match=key):
        _sft(**settings)


def test_empty_sft_split_fails_without_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(sft_mod, "train_loop", _no_training)
    out = tmp_path / "out" / "adapter"
    with pytest.raises(EssaError, match="empty 'sft' split"):
        run_sft(tiny_llama(), tiny_tokenizer(), PairTask([]), _lora(), _sft(), out, progress=False)
    assert not out.exists()


def test_failed_training_leaves_base_model_without_lora(tmp_path, monkeypatch):
    def exploding(*args, **kwargs):
        raise EssaError("SFT loss became nan")

    monkeypatch.setattr(sft_mod, "train_loop", exploding)
    model = tiny_llama()
    reference = copy.deepcopy(model.state_dict())
    with pytest.raises(EssaError, match="nan"):
        run_sft(model, tiny_tokenizer(), PairTask(PAIRS), _lora(), _sft(), tmp_path / "a", progress=False)
    assert not any("lora" in n for n, _ in model.named_modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())
    assert not (tmp_path / "a").exists()


def test_progress_bar_shows_loss_on_stderr(tmp_path, capsys):
    run_sft(tiny_llama(), tiny_tokenizer(), PairTask(PAIRS), _lora(), _sft(max_steps=2), tmp_path / "a",
            progress=True)
    captured = capsys.readouterr()
    assert "loss=" in captured.err and "loss=" not in captured.out


def test_completion_loss_equals_full_model_loss():
    from essa.sft import completion_loss

    model = tiny_llama(seed=3)
    items = [Encoded(list(range(5, 5 + n)), [IGNORE_INDEX] * (n - k) + list(range(5 + n - k, 5 + n)))
             for n, k in [(12, 4), (9, 3), (15, 6)]]
    batch = collate(items, PAD_ID)
    with torch.no_grad():
        full = model(**batch).loss
        ours = completion_loss(model, batch)
    assert torch.allclose(full, ours, atol=1e-6)


# --- early stopping ------------------------------------------------------------------------


class SplitPairTask(PairTask):
    """PairTask with a validation split that has targets too."""

    def split(self, name: str) -> list[Example]:
        if name == "validation":
            return [Example(prompt=p, answer=t, target=t) for p, t in [("i", "j"), ("k", "l")]]
        return super().split(name)


def _adapter_weights(path):
    return load_file(str(path / "adapter_model.safetensors"))


def test_early_stopping_stops_after_patience_and_keeps_the_best_check(tmp_path, monkeypatch):
    """Scripted validation losses: best at the 2nd check, then two worse ones with patience 2 ->
    training stops at the 4th check and the saved adapter is the one of step 2 x eval_every,
    i.e. the adapter a run of exactly that many steps saves."""
    losses = iter([3.0, 2.0, 2.5, 2.6, 1.0, 1.0])
    monkeypatch.setattr(sft_mod, "validation_loss", lambda model, batches: next(losses))
    out = tmp_path / "early"
    result = run_sft(_base(), tiny_tokenizer(), SplitPairTask(PAIRS), _lora(),
                     _sft(max_steps=40, patience=2, eval_every=3), out, progress=False)
    metrics = json.loads((out / "sft_metrics.json").read_text())
    assert result.steps == 12 and metrics["planned_steps"] == 40
    assert metrics["stopped_early"] and metrics["best_step"] == 6 and metrics["best_validation_loss"] == 2.0
    assert metrics["validation_losses"] == [[3, 3.0], [6, 2.0], [9, 2.5], [12, 2.6]]

    # The learning-rate schedule depends on the planned steps, so the reference run plans 40 too
    # and stops after step 6 by a stopper that always says "stop" from its first check on.
    reference = tmp_path / "ref"
    monkeypatch.setattr(sft_mod, "validation_loss", lambda model, batches: 1.0)
    run_sft(_base(), tiny_tokenizer(), SplitPairTask(PAIRS), _lora(),
            _sft(max_steps=40, patience=1, eval_every=6), reference, progress=False)
    ref_metrics = json.loads((reference / "sft_metrics.json").read_text())
    assert ref_metrics["validation_losses"] == [[6, 1.0], [12, 1.0]] and ref_metrics["best_step"] == 6
    saved, expected = _adapter_weights(out), _adapter_weights(reference)
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in saved)


def test_validation_loss_is_the_token_weighted_loss_in_eval_mode():
    model, tok = _base(), tiny_tokenizer()
    task = SplitPairTask(PAIRS)
    batches = sft_mod.validation_batches(tok, task, _sft(patience=1, batch_size=1), PAD_ID, torch.device("cpu"))
    assert len(batches) == 2
    model.train()
    value = sft_mod.validation_loss(model, batches)
    whole = collate(sft_mod.encode_split(tok, task, task.split("validation"), 256), PAD_ID)
    with torch.no_grad():
        assert value == pytest.approx(model(**whole).loss.item(), rel=1e-5)
    assert model.training  # its mode is handed back


def test_early_stopping_without_validation_targets_is_a_clear_error(tmp_path):
    class NoTargets(SplitPairTask):
        def split(self, name):
            if name == "validation":
                return [Example(prompt="i", answer="j")]
            return super().split(name)

    with pytest.raises(EssaError, match="early stopping.*reference solutions"):
        run_sft(_base(), tiny_tokenizer(), NoTargets(PAIRS), _lora(), _sft(patience=2), tmp_path / "a",
                progress=False)
    assert not (tmp_path / "a").exists()


def test_an_interrupted_run_leaves_the_adapter_of_its_best_check(tmp_path, monkeypatch):
    """A crash (here at the 4th validation check) after a best at the 2nd leaves that check's
    adapter, bit for bit the one a run stopped right there saves, marked unfinished."""
    def scripted(losses):
        it = iter(losses)

        def loss(model, batches):
            value = next(it)
            if value is None:
                raise KeyboardInterrupt
            return value
        return loss

    monkeypatch.setattr(sft_mod, "validation_loss", scripted([3.0, 2.0, 2.5, None]))
    out = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        run_sft(_base(), tiny_tokenizer(), SplitPairTask(PAIRS), _lora(),
                _sft(max_steps=40, patience=5, eval_every=3), out, progress=False)
    metrics = json.loads((out / "sft_metrics.json").read_text())
    assert metrics["finished"] is False and metrics["best_step"] == 6
    assert metrics["validation_losses"] == [[3, 3.0], [6, 2.0]]

    monkeypatch.setattr(sft_mod, "validation_loss", lambda model, batches: 1.0)
    reference = tmp_path / "ref"
    run_sft(_base(), tiny_tokenizer(), SplitPairTask(PAIRS), _lora(),
            _sft(max_steps=40, patience=1, eval_every=6), reference, progress=False)
    assert json.loads((reference / "sft_metrics.json").read_text())["finished"] is True
    saved, expected = _adapter_weights(out), _adapter_weights(reference)
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)


def test_bf16_autocast_runs_the_forward_in_bf16_and_keeps_float32_weights(tmp_path, monkeypatch):
    seen = []
    loss = sft_mod.completion_loss

    def recording(model, batch):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return loss(model, batch)

    monkeypatch.setattr(sft_mod, "completion_loss", recording)
    model, tok, task = _base(), tiny_tokenizer(), PairTask(PAIRS)
    before = _task_loss(model, tok, task)
    run_sft(model, tok, task, _lora(), _sft(bf16_autocast=True), tmp_path / "a", progress=False)
    assert len(seen) == 25 and all(seen)
    weights = _adapter_weights(tmp_path / "a")
    assert weights and all(w.dtype == torch.float32 for w in weights.values())
    trained = peft.PeftModel.from_pretrained(model, str(tmp_path / "a"))
    assert _task_loss(trained, tok, task) < 0.5 * before


def _interrupt_at_step(monkeypatch, at: int):
    step = sft_mod.sft_step
    calls = []

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    monkeypatch.setattr(sft_mod, "sft_step", interrupting)


@pytest.mark.parametrize("patience", [None, 5])
def test_a_resumed_sft_ends_exactly_where_an_uninterrupted_one_does(tmp_path, monkeypatch, patience):
    """Stopped by a crash at step 8 (checkpoint after step 6), continued with resume: the same
    adapter bit for bit, the same losses and validation checks; the checkpoint is gone after."""
    settings = _sft(max_steps=14, patience=patience, eval_every=3, lr=1e-2)
    task = SplitPairTask(PAIRS)
    whole = tmp_path / "whole" / "adapter"
    run_sft(_base(), tiny_tokenizer(), task, _lora(), settings, whole, progress=False)

    out = tmp_path / "resumed" / "adapter"
    _interrupt_at_step(monkeypatch, 8)
    with pytest.raises(KeyboardInterrupt):
        run_sft(_base(), tiny_tokenizer(), task, _lora(), settings, out, progress=False)
    checkpoint = checkpoint_path(out)
    assert checkpoint.is_file()
    monkeypatch.setattr(sft_mod, "sft_step", _original_sft_step)
    with pytest.raises(EssaError, match="--resume"):
        run_sft(_base(), tiny_tokenizer(), task, _lora(), settings, out, progress=False)
    result = run_sft(_base(), tiny_tokenizer(), task, _lora(), settings, out, progress=False, resume=True)

    assert result.steps == 14 and not checkpoint.exists()
    saved, expected = _adapter_weights(out), _adapter_weights(whole)
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)
    got, want = (json.loads((d / "sft_metrics.json").read_text()) for d in (out, whole))
    assert got["losses"] == want["losses"] and got["finished"] is True
    assert got.get("validation_losses") == want.get("validation_losses")
    assert sft_mod.is_finished(out)


_original_sft_step = sft_mod.sft_step


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path, monkeypatch):
    task = SplitPairTask(PAIRS)
    out = tmp_path / "run" / "adapter"
    _interrupt_at_step(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        run_sft(_base(), tiny_tokenizer(), task, _lora(), _sft(max_steps=10, eval_every=2), out, progress=False)
    monkeypatch.setattr(sft_mod, "sft_step", _original_sft_step)
    with pytest.raises(EssaError, match="sft.lr"):
        run_sft(_base(), tiny_tokenizer(), task, _lora(), _sft(max_steps=10, eval_every=2, lr=1e-3), out,
                progress=False, resume=True)


def test_only_a_finished_adapter_counts_as_finished(tmp_path, monkeypatch):
    monkeypatch.setattr(sft_mod, "validation_loss", lambda model, batches: 1.0)
    _interrupt_at_step(monkeypatch, 5)
    out = tmp_path / "a"
    with pytest.raises(KeyboardInterrupt):
        run_sft(_base(), tiny_tokenizer(), SplitPairTask(PAIRS), _lora(), _sft(max_steps=10, patience=3, eval_every=2),
                out, progress=False)
    assert (out / "adapter_config.json").is_file() and not sft_mod.is_finished(out)  # its best check, mid-run
    assert not sft_mod.is_finished(tmp_path / "missing")
