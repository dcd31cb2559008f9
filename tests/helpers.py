"""Tiny in-memory models and tokenizers for tests: a 2-layer Llama and a character tokenizer."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, IM_START, IM_END, UNK = "<pad>", "<|im_start|>", "<|im_end|>", "<unk>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END, UNK]
# Every printable ASCII character is one token, after the specials.
CHARS = list(dict.fromkeys(string.printable))
TINY_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(CHARS)
PAD_ID, EOS_ID = SPECIAL_TOKENS.index(PAD), SPECIAL_TOKENS.index(IM_END)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_llama(
    seed: int = 0,
    vocab_size: int = TINY_VOCAB_SIZE,
    hidden_size: int = 32,
    num_layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 64,
) -> LlamaForCausalLM:
    """A random-weight Llama, fp32, eval mode; the same seed gives the same weights."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )
    # A private RNG stream: building a model must not shift the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    return model.to(torch.float32).eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer over printable ASCII with ChatML specials and a chat template."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=IM_END,
        unk_token=UNK,
        additional_special_tokens=[IM_START],
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_model_dir(path: str | Path, seed: int = 0) -> Path:
    """Save tiny_llama(seed) and tiny_tokenizer() as a directory `load_model` accepts."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tiny_llama(seed=seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
