"""The population decoder (essa.decoding) against HF generate and against a plain forward pass.

Rows mix candidates and prompt lengths, share a chat-template prefix, and end at different steps:
the newline character is used as the stop token, which the tiny random model emits often.
"""

from __future__ import annotations

import itertools
import sys
import threading

import numpy as np
import pytest
import torch
import transformers

from adapters import make_random_adapter
from essa import decoding
from essa.decoding import (BatchDecoder, DecodeSettings, PreallocatedLayer, choose_tokens, common_prefix_length,
                          deal_batches, keep_order, prefill_groups)
from essa.population import PopulationModel
from essa.svd_space import SvdLoraSpace
from helpers import EOS_ID, PAD_ID, TINY_VOCAB_SIZE, tiny_llama, tiny_tokenizer

QUESTIONS = ["hi", "what is 2+2?", "tell me a story about a cat", "a", "list three colours", "why?"]
MAX_NEW = 14
# The decoder's tests run on every device present (CUDA too, where there is one).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", params=DEVICES)
def setup(request, tmp_path_factory):
    model, tok = tiny_llama(), tiny_tokenizer()
    adapter = make_random_adapter(model, tmp_path_factory.mktemp("dec") / "adapter", rank=4, lora_alpha=8)
    space = SvdLoraSpace.from_adapter(adapter, 1.0, model=model)
    model.to(request.param)
    runtime = PopulationModel(model, space)
    population = np.random.default_rng(0).normal(0, 0.3, (3, space.dim))
    runtime.set_population(population)
    prompts = [tok(tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": q}], tokenize=False,
                                          add_generation_prompt=True), add_special_tokens=False)["input_ids"]
               for q in QUESTIONS]
    rows = [(c, p) for c in range(len(population)) for p in range(len(prompts))]
    stop = tok.convert_tokens_to_ids("\n")
    yield model, tok, runtime, prompts, rows, stop
    runtime.remove()


def _decoder(setup, **settings) -> BatchDecoder:
    model, tok, runtime, _, _, stop = setup
    base = dict(max_new_tokens=MAX_NEW, eos_token_ids=(stop,), batch_size=64)
    return BatchDecoder(model, DecodeSettings(**(base | settings)), select_rows=runtime.select_rows,
                        pad_token_id=tok.pad_token_id)


def _decode(setup, decoder, seeds=None, **kwargs):
    _, _, runtime, prompts, rows, _ = setup
    try:
        return decoder.decode([prompts[p] for _, p in rows], [c for c, _ in rows], seeds, **kwargs)
    finally:
        runtime.clear_rows()


def _hf_generate(setup, rows):
    """Tokens and per-step logits of HF generate, greedy, one batch (left padding)."""
    model, tok, runtime, prompts, _, stop = setup
    width = max(len(prompts[p]) for _, p in rows)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(prompts[p])) + prompts[p] for _, p in rows])
    mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(prompts[p]) for _, p in rows])[:, None]).long()
    config = transformers.GenerationConfig(max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=stop,
                                           pad_token_id=tok.pad_token_id, output_logits=True,
                                           return_dict_in_generate=True)
    with torch.no_grad(), runtime.rows([c for c, _ in rows]):
        out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                             generation_config=config)
    tokens, logits = [], []
    for r in range(len(rows)):
        new = out.sequences[r, width:].tolist()
        n = new.index(stop) + 1 if stop in new else len(new)
        tokens.append([t for t in new[:n] if t != stop])
        logits.append(torch.stack([step[r] for step in out.logits[:n]]).cpu())
    return tokens, logits


@pytest.mark.parametrize(("pack_weights", "parallel_batches"), [(False, 1), (True, 1), (True, 2)])
def test_greedy_tokens_and_logits_match_hf_generate(setup, pack_weights, parallel_batches):
    rows = setup[4]
    decoder = _decoder(setup, batch_size=7, pack_weights=pack_weights, parallel_batches=parallel_batches)
    ours = _decode(setup, decoder, keep_logits=True)
    tokens, logits = _hf_generate(setup, rows)
    assert ours.tokens == tokens
    for mine, theirs in zip(ours.logits, logits):
        assert mine.shape == theirs.shape
        assert torch.allclose(mine, theirs, atol=1e-4)
    lengths = {len(t) for t in tokens}
    assert len(lengths) >= 3 and min(lengths) < MAX_NEW - 1  # rows really end at different steps
    assert ours.prefix_tokens > 5  # the chat template + system prompt were shared


@pytest.fixture
def grouped_prefill(monkeypatch):
    """A prefill group costs almost nothing extra: rows of each distinct suffix length are prefilled on their own."""
    monkeypatch.setattr(decoding, "PREFILL_GROUP_OVERHEAD", 1)


def test_grouped_prefill_matches_hf_generate(setup, grouped_prefill):
    _, _, runtime, _, rows, _ = setup
    forwards = []

    def select_and_note(candidate_of_row):
        forwards.append(len(candidate_of_row))
        runtime.select_rows(candidate_of_row)

    decoder = _decoder(setup, batch_size=64)
    decoder.select_rows = select_and_note
    ours = _decode(setup, decoder, keep_logits=True)
    tokens, logits = _hf_generate(setup, rows)
    # The prefix (one row per candidate), then the 18 rows' suffixes in groups, then decode steps of <= 18 rows.
    prefill = []
    for n in forwards[1:]:
        if sum(prefill) == len(rows):
            break
        prefill.append(n)
    assert forwards[0] == 3 and sum(prefill) == len(rows) and len(prefill) >= 3, forwards
    assert ours.tokens == tokens
    for mine, theirs in zip(ours.logits, logits):
        assert torch.allclose(mine, theirs, atol=1e-4)


def test_prefix_sharing_and_row_dropping_change_nothing(setup):
    shared = _decode(setup, _decoder(setup, batch_size=64), keep_logits=True)
    plain = _decode(setup, _decoder(setup, batch_size=1), keep_logits=True, share_prefix=False)
    assert shared.tokens == plain.tokens
    for a, b in zip(shared.logits, plain.logits):
        assert torch.allclose(a, b, atol=1e-4)
    assert shared.forward_tokens < plain.forward_tokens


def _teacher_forced_logits(setup, row, continuation):
    """Logits for every new token of a row from one plain forward pass over prompt + continuation."""
    model, _, runtime, prompts, _, _ = setup
    c, p = row
    ids = torch.tensor([prompts[p] + continuation], device=model.device)
    with torch.no_grad(), runtime.rows([c]):
        logits = model(input_ids=ids).logits[0]
    return logits[len(prompts[p]) - 1:].cpu()


@pytest.mark.parametrize(("top_p", "pack_weights", "batch_size", "parallel_batches", "grouped"),
                         [(1.0, False, 64, 1, False), (0.8, False, 64, 1, False), (0.8, True, 64, 1, False),
                          (0.8, True, 5, None, False), (0.8, True, 64, 1, True)])
def test_sampled_rows_do_not_depend_on_their_batch(setup, request, top_p, pack_weights, batch_size, parallel_batches,
                                                   grouped):
    if grouped:
        request.getfixturevalue("grouped_prefill")
    rows = setup[4]
    seeds = [1000 + 7 * i for i in range(len(rows))]
    decoder = _decoder(setup, temperature=1.3, top_p=top_p, batch_size=batch_size, pack_weights=pack_weights,
                       parallel_batches=parallel_batches)
    together = _decode(setup, decoder, seeds, keep_logits=True)
    alone = _decode(setup, _decoder(setup, temperature=1.3, top_p=top_p, batch_size=1), seeds, share_prefix=False)
    assert together.tokens == alone.tokens
    other_seeds = _decode(setup, decoder, [s + 1 for s in seeds])
    assert other_seeds.tokens != together.tokens
    # Every step's logits are the model's own, as one uncached forward pass computes them.
    stop = setup[5]
    for row, tokens, logits in zip(rows, together.tokens, together.logits):
        ended = len(logits) > len(tokens)
        reference = _teacher_forced_logits(setup, row, tokens + ([stop] if ended else []))
        assert torch.allclose(logits, reference[:len(logits)], atol=1e-4)


def test_parallel_batches_give_the_same_rows_and_work_and_restore_the_thread_count(setup):
    if setup[0].device.type != "cpu":
        pytest.skip("batches run on threads on CPU only")
    threads = torch.get_num_threads()
    one_by_one = _decode(setup, _decoder(setup, batch_size=4, parallel_batches=1), keep_logits=True)
    seen = set()
    _, _, runtime, _, _, _ = setup
    select = runtime.select_rows

    def select_and_note(candidate_of_row):
        seen.add(threading.get_ident())
        select(candidate_of_row)

    decoder = _decoder(setup, batch_size=4, parallel_batches=3)
    decoder.select_rows = select_and_note
    together = _decode(setup, decoder, keep_logits=True)
    # The shared prefix is prefilled here; 18 rows in batches of at most 4 make 6 batches, on 3 other threads.
    assert len(seen - {threading.get_ident()}) == 3
    assert together.tokens == one_by_one.tokens
    for a, b in zip(together.logits, one_by_one.logits):
        assert torch.allclose(a, b, atol=1e-5)
    work = lambda r: (r.prefill_tokens, r.decoded_tokens, r.attended_keys)  # noqa: E731
    assert work(together) == work(one_by_one)
    assert torch.get_num_threads() == threads


def test_a_failing_batch_stops_the_batches_on_other_threads(setup):
    _, _, runtime, _, _, _ = setup
    select, calls = runtime.select_rows, []

    def select_or_fail(candidate_of_row):
        calls.append(threading.get_ident())
        if len(calls) == 4:  # the 4th forward pass (the 1st is the prefix's), in one of the workers' batches
            raise ValueError("broken batch")
        select(candidate_of_row)

    decoder = _decoder(setup, batch_size=4, parallel_batches=2)
    decoder.select_rows = select_or_fail
    with pytest.raises(ValueError, match="broken batch"):
        _decode(setup, decoder)
    # The others stopped at their next step instead of decoding every batch to the end (about 60 forward passes).
    assert len(calls) < 10


def test_row_order_does_not_matter(setup):
    _, _, runtime, prompts, rows, _ = setup
    seeds = [11 * i for i in range(len(rows))]
    decoder = _decoder(setup, temperature=1.0, batch_size=4)
    forward = _decode(setup, decoder, seeds)
    perm = np.random.default_rng(1).permutation(len(rows))
    try:
        shuffled = decoder.decode([prompts[rows[i][1]] for i in perm], [rows[i][0] for i in perm],
                                  [seeds[i] for i in perm])
    finally:
        runtime.clear_rows()
    assert [shuffled.tokens[list(perm).index(i)] for i in range(len(rows))] == forward.tokens


def test_inverse_cdf_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(40000, 1)
    u = torch.rand(40000, generator=torch.Generator().manual_seed(0))
    settings = DecodeSettings(max_new_tokens=1, temperature=1.0)
    freq = torch.bincount(choose_tokens(logits, settings, u), minlength=4).float() / 40000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.01)
    nucleus = torch.bincount(choose_tokens(logits, DecodeSettings(1, 1.0, top_p=0.75), u), minlength=4)
    assert nucleus[2:].sum() == 0  # 0.5 + 0.3 covers top_p 0.75: the tail is never drawn
    assert abs(nucleus[0] / nucleus[:2].sum() - 0.5 / 0.8) < 0.01
    assert choose_tokens(logits[:2], DecodeSettings(1, 0.0), None).tolist() == [0, 0]


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_sampling_draws_on_the_logits_device_with_uniforms_from_a_cpu_generator(top_p):
    # The meta device stands in for an accelerator: CPU uniforms times its tensors fail as they would on CUDA.
    logits = torch.randn(3, 10, device="meta")
    uniforms = torch.rand(3, generator=torch.Generator().manual_seed(0))
    tokens = choose_tokens(logits, DecodeSettings(1, 1.0, top_p=top_p), uniforms)
    assert tokens.device.type == "meta" and tokens.shape == (3,)


# Tensor methods that make the host wait for the device (on CUDA), counted where essa.decoding calls them.
_HOST_WAITS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__")


@pytest.fixture
def host_waits(monkeypatch):
    """A list that records each host-waiting tensor call made from essa.decoding's own code."""
    calls: list[str] = []
    for name in _HOST_WAITS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, __original=original, __name=name, **kwargs):
            if sys._getframe(1).f_code.co_filename == decoding.__file__:
                calls.append(__name)
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


@pytest.mark.parametrize(("temperature", "batch_size"), [(0.0, 64), (1.3, 64), (0.0, 9), (1.3, 9)])
def test_each_decode_step_waits_for_the_device_once(setup, host_waits, temperature, batch_size):
    rows = setup[4]
    result = _decode(setup, _decoder(setup, temperature=temperature, batch_size=batch_size),
                     [5 + i for i in range(len(rows))])
    lengths = {len(t) for t in result.tokens}
    assert len(lengths) >= 2 and min(lengths) < MAX_NEW - 1  # rows ended at different steps: the batch compacted
    # One copy of the step's tokens and end flags, not one per live row (18 rows x 14 steps before).
    batches = -(-len(rows) // batch_size)
    assert batches <= len(host_waits) <= batches * MAX_NEW, host_waits
    assert set(host_waits) == {"tolist"}


def test_prefill_groups_are_the_cheapest_cut():
    assert prefill_groups([2, 2, 2, 10, 10], overhead=1) == [(0, 3), (3, 5)]
    assert prefill_groups([2, 2, 2, 10, 10], overhead=100) == [(0, 5)]  # a second forward pass costs more
    assert prefill_groups([7], overhead=0) == [(0, 1)]
    rng = np.random.default_rng(0)
    for _ in range(30):
        lengths = sorted(rng.integers(1, 40, rng.integers(1, 8)).tolist())
        overhead = int(rng.integers(0, 30))
        cost = lambda groups: sum((e - s) * max(lengths[s:e]) + overhead for s, e in groups)  # noqa: E731
        groups = prefill_groups(lengths, overhead)
        assert [s for s, _ in groups][0] == 0 and groups[-1][1] == len(lengths)
        assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
        # Against every way of cutting the rows into consecutive ranges.
        n = len(lengths)
        best = min(cost([(s, e) for s, e in zip((0,) + cuts, cuts + (n,))])
                   for k in range(n) for cuts in itertools.combinations(range(1, n), k))
        assert cost(groups) == best


def test_batches_that_run_together_are_dealt_alike_rows():
    order = list(range(10))
    assert deal_batches(order, 4, 1) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # one at a time: consecutive rows
    assert deal_batches(order, 5, 2) == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]
    assert deal_batches(order, 3, 2) == [[0, 2, 4], [1, 3], [5, 7, 9], [6, 8]]  # two rounds of two
    for rows, size, workers in [(256, 128, 2), (300, 64, 3), (7, 2, 4), (1, 8, 2)]:
        batches = deal_batches(list(range(rows)), size, workers)
        assert sorted(r for b in batches for r in b) == list(range(rows))
        assert max(len(b) for b in batches) <= size and min(len(b) for b in batches) >= 1
        assert len(batches) % workers == 0 or rows < workers


def test_keep_order_moves_only_live_rows_from_past_the_end():
    done = [False, True, False, True, False, False]
    assert keep_order(done) == [0, 4, 2, 5]
    assert keep_order([True, False, False]) == [2, 1]
    assert keep_order([False, False, True]) == [0, 1]
    for _ in range(20):
        done = (torch.rand(12) < 0.4).tolist()
        keep = keep_order(done)
        assert sorted(keep) == [i for i, d in enumerate(done) if not d]
        assert sum(k != i for i, k in enumerate(keep)) == sum(done[:len(keep)])


@pytest.mark.parametrize("indices", [[0, 4, 2, 3], [3, 2, 1, 0], [4, 3], [0, 1, 2, 3, 4], [1, 1, 0, 2, 2, 4, 3]])
def test_preallocated_layer_keeps_the_selected_rows_and_grows_after(indices):
    keys, values = torch.randn(5, 2, 4, 3), torch.randn(5, 2, 4, 3)
    layer = PreallocatedLayer(capacity=6)
    layer.update(keys, values)
    layer.batch_select_indices(torch.tensor(indices))
    assert torch.equal(layer.keys, keys[indices]) and torch.equal(layer.values, values[indices])
    new_keys, new_values = torch.randn(len(indices), 2, 1, 3), torch.randn(len(indices), 2, 1, 3)
    got_keys, got_values = layer.update(new_keys, new_values)
    assert torch.equal(got_keys, torch.cat([keys[indices], new_keys], dim=2))
    assert torch.equal(got_values, torch.cat([values[indices], new_values], dim=2))


def _sliding_window_model(kind: str, window: int) -> transformers.PreTrainedModel:
    """A tiny random model with sliding-window layers: Qwen2 with one full and one sliding layer, or
    Mistral with sliding windows in every layer."""
    shape = dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=None,
                 eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=False, sliding_window=window)
    if kind == "qwen2":
        config = transformers.Qwen2Config(**shape, use_sliding_window=True, max_window_layers=1,
                                          layer_types=["full_attention", "sliding_attention"])
        cls = transformers.Qwen2ForCausalLM
    else:
        config, cls = transformers.MistralConfig(**shape), transformers.MistralForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return cls(config).float().eval()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
@pytest.mark.parametrize("batch_size", [64, 4])
def test_sliding_window_models_decode_on_transformers_cache_layers_as_hf_generate(device, kind, batch_size):
    # Models with other layers than full attention keep transformers' own cache classes (the fallback
    # beside PreallocatedLayer), which this decoder drives through their batch_select_indices.
    window, max_new = 16, 20
    model, tok = _sliding_window_model(kind, window).to(device), tiny_tokenizer()
    layers = decoding.new_decode_cache(model.config, 64).layers
    assert not any(isinstance(x, PreallocatedLayer) for x in layers)
    assert any(type(x) is not transformers.cache_utils.DynamicLayer for x in layers)
    prompts = [tok(tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}],
                                           tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"] for q in QUESTIONS]
    assert min(len(p) for p in prompts) > window  # the window really cuts the prompt
    stop = tok.convert_tokens_to_ids("+" if kind == "qwen2" else ")")  # written by some rows, at different steps
    decoder = BatchDecoder(model, DecodeSettings(max_new_tokens=max_new, eos_token_ids=(stop,), batch_size=batch_size),
                           pad_token_id=tok.pad_token_id)
    ours = decoder.decode(prompts, [0] * len(prompts), keep_logits=True)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    config = transformers.GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=stop,
                                           pad_token_id=tok.pad_token_id, output_logits=True,
                                           return_dict_in_generate=True)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    for r, (tokens, logits) in enumerate(zip(ours.tokens, ours.logits)):
        new = out.sequences[r, width:].tolist()
        n = new.index(stop) + 1 if stop in new else len(new)
        assert tokens == [t for t in new[:n] if t != stop]
        assert torch.allclose(logits, torch.stack([step[r] for step in out.logits[:n]]).cpu(), atol=1e-4)
    lengths = {len(t) for t in ours.tokens}
    assert len(lengths) >= 2 and min(lengths) < max_new - 1  # rows end at different steps and leave the batch
    # No shared prefix: padding between it and a shorter suffix would take slots of the window.
    assert ours.prefix_tokens == 0


def test_common_prefix_length():
    assert common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix_length([[5], [6]]) == 0
    assert common_prefix_length([]) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_sampled_evaluation_does_not_depend_on_batching_or_splitting(tmp_path, device):
    from essa.backends.local import LocalBackend
    from essa.config import DecodingConfig

    model, tok = tiny_llama(), tiny_tokenizer()
    space = SvdLoraSpace.from_adapter(make_random_adapter(model, tmp_path / "a", rank=2), 1.0, model=model)
    model.to(device)
    population = np.random.default_rng(3).normal(0, 0.3, (4, space.dim))
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in QUESTIONS]

    def run(batch_size, pop, prompt_slice=slice(None), **offsets):
        backend = LocalBackend(model, tok, space, DecodingConfig(max_new_tokens=8, temperature=1.0,
                                                                 batch_size=batch_size))
        try:
            return backend.evaluate(pop, prompts[prompt_slice], seed=5, **offsets)
        finally:
            backend.close()

    whole = run(64, population)
    assert run(3, population) == whole
    halves = run(5, population[:2]) + run(2, population[2:], candidate_offset=2)
    assert halves == whole
    columns = run(4, population, slice(0, 3)), run(4, population, slice(3, None), prompt_offset=3)
    assert [a + b for a, b in zip(*columns)] == whole
    assert run(64, population[2:]) != whole[2:]  # without its offset a piece samples other rows
