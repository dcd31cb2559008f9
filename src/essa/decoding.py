"""Batched decoding of many (candidate, prompt) rows: our own loop over the model's forward and cache.

Three things HF `generate` does not do for ESSA's workload, each exact under causal attention:
- **Shared prefix.** The prompts of one evaluation usually begin alike (chat template and system
  prompt). That prefix is prefilled once per candidate and its KV cache is copied to the
  candidate's rows; each row then prefills only the rest of its prompt. Only where every layer is
  full attention: a sliding window counts cache slots, and the padding between the prefix and a
  shorter suffix would take some of them (such models prefill whole, left-padded prompts, as HF).
- **Little padding work.** A batch's prompt suffixes are prefilled in groups of similar length, each
  only as wide as its longest suffix; the padding columns stay empty and masked.
- **Rows leave when they finish.** A row that emits EOS (or reaches `max_new_tokens`) is dropped
  from the batch and its cache rows with it, at the step it ends, instead of decoding padding until
  the longest row ends; live rows from the end of the batch fill the freed slots, so the cache
  copies only those.
- **One random stream per row.** A sampled row draws from its own seeded generator, so its tokens do
  not depend on which other rows share its batch (batch size, Ray chunking, row order).

The model's own forward, attention and cache classes do the work (nothing of attention is
re-implemented here); with `pack_weights` its linear layers run on oneDNN-packed weights while
`decode` runs (`essa.packed_weights`). Which candidate a row runs is set through `PopulationModel.select_rows`.

On CPU, batches run on several threads at once (`parallel_batches`), each with its share of
torch's threads: one batch's Python and small elementwise operations then overlap the other's
matrix products, instead of every small operation waiting for all threads
(docs/history/2026-12-04-decoder-parallel-batches.md).
Batches that run together are dealt rows of alike prompt lengths, so they end at about the same time.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tqdm.auto import tqdm
# `PreallocatedLayer` subclasses transformers' `DynamicLayer` and relies on its internals
# (`lazy_initialization`, `is_initialized`, `keys`/`values`, `DynamicCache.layers`): pyproject.toml pins
# transformers to the major version tested; the tests also run the fallback on transformers' own layers.
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from essa.packed_weights import PackedLinears, packing_available

# With transformers' own cache layers (which copy every row to drop some), finished rows leave the
# batch once they are at least this fraction of it; `PreallocatedLayer`s copy only the moved rows, so
# there finished rows leave at once (docs/BENCHMARKS.md).
COMPACT_FRACTION = 0.25
# Prefill groups: each extra forward pass counts as this many token columns (an estimate of its fixed
# cost, not tuned; at the demo's shape it makes 4 groups per batch of 128: docs/BENCHMARKS.md).
PREFILL_GROUP_OVERHEAD = 64
# Called with the candidate index of every batch row before each forward pass (None: plain model).
SelectRows = Callable[[list[int]], None]


@dataclass(frozen=True)
class DecodeSettings:
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    batch_size: int = 64  # rows decoded together
    pack_weights: bool = False  # linears run with oneDNN-packed weights (essa.packed_weights)
    # Batches decoded at once on CPU, each on its own thread(s); None: as many as torch has threads
    # (at most one per batch). On other devices batches run one after another.
    parallel_batches: int | None = 1


@dataclass
class DecodeResult:
    tokens: list[list[int]]  # per row, the new tokens without the final EOS
    # Per row, the logits of every chosen token's step (steps x vocab); only with keep_logits.
    logits: list[torch.Tensor] | None = None
    prefix_tokens: int = 0  # length of the prompt prefix shared by all rows
    # Work done, for throughput figures: prompt tokens prefilled (the prefix once per candidate),
    # decode steps summed over the rows they ran for, and the keys all those tokens attended to.
    prefill_tokens: int = 0
    decoded_tokens: int = 0
    attended_keys: int = 0

    @property
    def forward_tokens(self) -> int:
        return self.prefill_tokens + self.decoded_tokens


def common_prefix_length(sequences: list[list[int]]) -> int:
    """Length of the longest token prefix shared by all sequences."""
    if not sequences:
        return 0
    first = sequences[0]
    n = min(len(s) for s in sequences)
    for i in range(n):
        token = first[i]
        if any(s[i] != token for s in sequences):
            return i
    return n


def choose_tokens(logits: torch.Tensor, settings: DecodeSettings, uniforms: torch.Tensor | None) -> torch.Tensor:
    """Next token of each row: argmax (greedy) or an inverse-CDF draw with one uniform per row.

    Inverse-CDF sampling needs a single uniform number per row and step, which is what makes a
    row's sample independent of its batch: the uniform comes from the row's own generator.
    """
    if settings.temperature <= 0:
        return logits.max(dim=-1).indices  # the first maximum, as argmax; several times faster on CPU
    probs = torch.softmax(logits.float() / settings.temperature, dim=-1)
    if settings.top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        probs = probs.masked_fill(before >= settings.top_p, 0.0)  # the top token always stays
    else:
        order = None
    cdf = probs.cumsum(dim=-1)
    # The uniforms come from CPU generators: they follow the logits to their device.
    target = uniforms.to(device=cdf.device, dtype=cdf.dtype) * cdf[:, -1]
    picked = torch.searchsorted(cdf, target[:, None]).clamp_(max=cdf.shape[-1] - 1).squeeze(-1)
    return picked if order is None else order.gather(-1, picked[:, None]).squeeze(-1)


class BatchDecoder:
    """Decodes rows of (prompt token ids, candidate, seed) with a causal LM and its KV cache."""

    def __init__(self, model: torch.nn.Module, settings: DecodeSettings, select_rows: SelectRows | None = None,
                 pad_token_id: int = 0):
        self.model = model
        self.settings = settings
        self.select_rows = select_rows
        self.pad_token_id = pad_token_id
        self.device = next(model.parameters()).device
        # transformers 5.x renamed `past_key_values` to `cache` (the old name warns until it is removed).
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        # Every layer full attention: the cache is `PreallocatedLayer`s, and prompts may share a prefix.
        self._full_attention = all(isinstance(x, PreallocatedLayer) for x in new_decode_cache(model.config, 1).layers)
        use_packed = settings.pack_weights and packing_available()
        self._packed = PackedLinears(model, settings.batch_size) if use_packed else None

    @torch.inference_mode()
    def decode(self, prompts: list[list[int]], candidates: list[int], seeds: list[int] | None = None,
               keep_logits: bool = False, share_prefix: bool = True, progress: bool = False) -> DecodeResult:
        """New tokens for every row; row i runs candidate `candidates[i]` and samples with `seeds[i]`."""
        if not (len(prompts) == len(candidates) and (seeds is None or len(seeds) == len(prompts))):
            raise ValueError("prompts, candidates and seeds must have one entry per row")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        seeds = list(seeds) if seeds is not None else [0] * len(prompts)
        with self._packed.swapped_in() if self._packed is not None else contextlib.nullcontext():
            return self._decode(prompts, candidates, seeds, keep_logits, share_prefix, progress)

    def _decode(self, prompts: list[list[int]], candidates: list[int], seeds: list[int], keep_logits: bool,
                share_prefix: bool, progress: bool) -> DecodeResult:
        self._capacity = max(len(p) for p in prompts) + self.settings.max_new_tokens
        # The last prompt token of every row stays out of the prefix: its logits start decoding.
        share_prefix = share_prefix and self._full_attention
        prefix_len = min(common_prefix_length(prompts), min(len(p) for p in prompts) - 1) if share_prefix else 0
        prefix = self._prefill_prefix(prompts[0][:prefix_len], sorted(set(candidates))) if prefix_len else None
        result = DecodeResult([[] for _ in prompts], [None] * len(prompts) if keep_logits else None, prefix_len)
        if prefix is not None:
            result.prefill_tokens = prefix_len * len(prefix[1])
            result.attended_keys = len(prefix[1]) * prefix_len * (prefix_len + 1) // 2
        # Sorted by length: batches (and prefill groups within them) hold prompts of similar length.
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), candidates[i], i))
        workers = self._workers(math.ceil(len(order) / self.settings.batch_size))
        batches = deal_batches(order, self.settings.batch_size, workers)
        bar = tqdm(total=len(batches), desc="decode", unit="batch", leave=False, disable=not progress or len(batches) < 2)

        def run(rows: list[int], before_step: Callable[[], None]) -> tuple[int, int, int]:
            work = self._decode_batch(rows, prompts, candidates, seeds, prefix, prefix_len, result, before_step)
            bar.update()
            return work

        with bar:
            works = ([run(rows, lambda: None) for rows in batches] if workers == 1
                     else _BatchThreads(workers).run(run, batches))
        for prefilled, decoded, attended in works:
            result.prefill_tokens += prefilled
            result.decoded_tokens += decoded
            result.attended_keys += attended
        return result

    def _workers(self, n_batches: int) -> int:
        """How many batches run at once: on CPU, up to one per torch thread (or the setting)."""
        if self.device.type != "cpu":
            return 1
        wanted = self.settings.parallel_batches or torch.get_num_threads()
        return max(1, min(wanted, n_batches))

    # -- prefill -------------------------------------------------------------------------------
    def _prefill_prefix(self, prefix: list[int], unique: list[int]) -> tuple[DynamicCache, dict[int, int]]:
        """The prefix's KV cache with one row per distinct candidate, and candidate -> cache row."""
        ids = torch.tensor([prefix] * len(unique), device=self.device)
        cache = self._new_cache()
        self._forward(ids, torch.ones_like(ids), None, cache, unique)
        return cache, {c: i for i, c in enumerate(unique)}

    def _new_cache(self) -> DynamicCache:
        return new_decode_cache(self.model.config, self._capacity)

    def _batch_cache(self, prefix: tuple[DynamicCache, dict[int, int]] | None, rows: list[int],
                     candidates: list[int]) -> DynamicCache:
        if prefix is None:
            return self._new_cache()
        cache, row_of = prefix
        out = copy.deepcopy(cache)
        out.batch_select_indices(self._to_device(torch.tensor([row_of[candidates[i]] for i in rows])))
        return out

    # -- one batch -----------------------------------------------------------------------------
    def _decode_batch(self, rows: list[int], prompts: list[list[int]], candidates: list[int], seeds: list[int],
                      prefix: tuple[DynamicCache, dict[int, int]] | None, prefix_len: int,
                      result: DecodeResult, before_step: Callable[[], None]) -> tuple[int, int, int]:
        """Decodes `rows` into `result`'s tokens (and logits); returns (prefilled, decoded, attended keys).

        `before_step` runs before the prefill and at every step (threaded batches: see `_BatchThreads`).
        Each step waits for the device once: one copy of its tokens and their end flags to the host
        (with `keep_logits`, one more of its logits); which rows have ended, the work counters and the
        compaction's row moves are kept on the host from that copy.
        """
        s = self.settings
        before_step()
        suffixes = [prompts[i][prefix_len:] for i in rows]
        width = max(len(x) for x in suffixes)
        # Left padding between prefix and suffix keeps every row's last prompt token in the last column.
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        suffix_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, x in enumerate(suffixes):
            ids[r, width - len(x):] = torch.tensor(x)
            suffix_mask[r, width - len(x):] = 1
        mask = torch.cat([torch.ones((len(rows), prefix_len), dtype=torch.long), suffix_mask], dim=1)
        mask = self._to_device(mask)
        positions = (mask.cumsum(-1) - 1).clamp_(min=0)[:, prefix_len:]
        cache = self._batch_cache(prefix, rows, candidates)
        active = list(rows)  # the row in each batch slot
        logits = self._prefill(self._to_device(ids), mask, positions, cache, [candidates[i] for i in active],
                               [len(x) for x in suffixes])
        # Each row's last position; a token at position p attends to p + 1 keys.
        last = [len(prompts[i]) - 1 for i in rows]
        prefilled = sum(len(x) for x in suffixes)
        attended = sum((n + 1) * (n + 2) // 2 - prefix_len * (prefix_len + 1) // 2 for n in last)
        decoded = 0
        uniforms = slots = None
        if s.temperature > 0:
            # Every row's uniforms for the whole decode from its own generator (the same numbers as one
            # draw per step), copied to the device once; the slot's batch index picks its row.
            uniforms = self._to_device(torch.stack([
                torch.rand(s.max_new_tokens, generator=torch.Generator().manual_seed(int(seeds[i]) % 2**63))
                for i in rows]))
            slots = torch.arange(len(rows), device=self.device)
        steps: dict[int, list[torch.Tensor]] = {i: [] for i in rows}
        eos = self._to_device(torch.tensor(s.eos_token_ids or [-1]))
        done = [False] * len(active)
        preallocated = all(isinstance(x, PreallocatedLayer) for x in cache.layers)
        for step in range(s.max_new_tokens):
            before_step()
            tokens = choose_tokens(logits, s, None if uniforms is None else uniforms[slots, step])
            ended = torch.isin(tokens, eos)
            step_logits = logits.float().cpu() if result.logits is not None else None
            chosen, ends = torch.stack([tokens, ended.to(tokens.dtype)]).tolist()  # the step's one wait
            for r, (row, token, end) in enumerate(zip(active, chosen, ends)):
                if done[r]:
                    continue
                if step_logits is not None:
                    steps[row].append(step_logits[r])
                if end:
                    done[r] = True
                else:
                    result.tokens[row].append(token)
            n_done = sum(done)
            if step == s.max_new_tokens - 1 or n_done == len(active):
                break
            if n_done and (preallocated or n_done >= COMPACT_FRACTION * len(active)):
                # Finished rows leave, their cache rows too; the live rows past the end fill their slots.
                keep_slots = keep_order(done)
                moved = [k for k, j in enumerate(keep_slots) if k != j]
                n = len(keep_slots)
                # One copy to the device: the kept slots, then the slots that change and their sources.
                index = self._to_device(torch.tensor(keep_slots + moved + [keep_slots[k] for k in moved]))
                keep = index[:n]
                if preallocated:
                    for layer in cache.layers:
                        layer.keep_rows(n, index[n:n + len(moved)], index[n + len(moved):])
                else:
                    cache.batch_select_indices(keep)
                mask, positions, tokens = mask[keep], positions[keep], tokens[keep]
                slots = None if slots is None else slots[keep]
                active = [active[k] for k in keep_slots]
                last = [last[k] for k in keep_slots]
                done = [False] * n
            mask = torch.cat([mask, torch.ones((len(active), 1), dtype=mask.dtype, device=mask.device)], dim=1)
            positions = positions[:, -1:] + 1
            logits = self._forward(tokens[:, None], mask, positions, cache, [candidates[i] for i in active])
            last = [p + 1 for p in last]
            decoded += len(active)
            attended += sum(last) + len(last)
        if result.logits is not None:
            for i in rows:
                result.logits[i] = torch.stack(steps[i])
        return prefilled, decoded, attended

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return host_to_device(tensor, self.device)

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache,
                 candidate_of_row: list[int], lengths: list[int]) -> torch.Tensor:
        """Prefills the batch's prompt suffixes (right-aligned in `ids`); returns each row's last logits.

        Where the cache already holds the prefix in `PreallocatedLayer`s, rows of similar length are
        prefilled in groups, each only as wide as its longest suffix: the batch's padding columns are
        then left empty (and masked) instead of being computed as tokens.
        """
        groups = prefill_groups(lengths, PREFILL_GROUP_OVERHEAD)
        layers = cache.layers
        if len(groups) == 1 or not all(isinstance(x, PreallocatedLayer) and x.is_initialized for x in layers):
            return self._forward(ids, mask, positions, cache, candidate_of_row)
        width, start_length = ids.shape[1], layers[0].length
        logits = []
        for start, end in groups:
            w = max(lengths[start:end])
            window = copy.copy(cache)  # the cache object the model sees, over rows start:end of the batch
            window.layers = [x.window(start, end, start_length + width - w) for x in layers]
            logits.append(self._forward(ids[start:end, width - w:], mask[start:end], positions[start:end, width - w:],
                                        window, candidate_of_row[start:end]))
        for x in layers:
            x.set_length(start_length + width)
        return torch.cat(logits)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None, cache: DynamicCache,
                 candidate_of_row: list[int]) -> torch.Tensor:
        """Logits of each row's last position; the cache grows by `ids`' columns."""
        if self.select_rows is not None:
            self.select_rows(candidate_of_row)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self._cache_kwarg: cache})
        return out.logits[:, -1, :]


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`. To a GPU it goes from pinned memory without waiting: a copy from
    pageable memory waits for all the work queued on the device first."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class DecodeStopped(RuntimeError):
    """A batch stopped early because the decode it belonged to failed or was interrupted elsewhere."""


class _BatchThreads:
    """Runs batches `workers` at a time on threads that split torch's CPU threads between them.

    Inference mode and the thread count are per thread, so each worker sets both. (Giving a
    finished worker's threads to the batch still running did not pay:
    docs/history/2026-12-04-decoder-parallel-batches.md.) If one
    batch fails or the caller is interrupted (Ctrl-C), the others end at their next step, so the
    error surfaces at once. The caller's thread count is restored afterwards.
    """

    def __init__(self, workers: int):
        self.workers = workers
        self.total = torch.get_num_threads()
        self.share = max(1, self.total // workers)
        self.stop = threading.Event()

    def before_step(self) -> None:
        """In a worker, before each forward pass: stop if another batch failed or the caller gave up."""
        if self.stop.is_set():
            raise DecodeStopped("decoding stopped: another batch failed or was interrupted")

    def run(self, fn: Callable[[list[int], Callable[[], None]], Any], batches: list[list[int]]) -> list[Any]:
        """`fn(rows, before_step)` of every batch, in the batches' order."""
        def call(rows: list[int]) -> Any:
            torch.set_num_threads(self.share)  # this worker thread's share
            with torch.inference_mode():
                return fn(rows, self.before_step)

        try:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="essa-decode") as pool:
                futures = [pool.submit(call, rows) for rows in batches]
                try:
                    wait(futures, return_when=FIRST_EXCEPTION)
                    for f in futures:
                        if f.done() and not f.cancelled() and f.exception() is not None:
                            raise f.exception()
                    return [f.result() for f in futures]
                except BaseException:
                    self.stop.set()
                    for f in futures:
                        f.cancel()
                    raise
        finally:
            torch.set_num_threads(self.total)


def deal_batches(order: list[int], batch_size: int, workers: int) -> list[list[int]]:
    """Rows (in `order`, sorted by prompt length) into batches of at most `batch_size`, a multiple of `workers`.

    Batches run `workers` at a time. Each such round takes the next stretch of `order` and deals it out
    row by row, so batches that run together hold alike prompts and end at about the same time (cut into
    consecutive pieces instead, the batch of the longest prompts kept one thread busy while the other idled).
    """
    rounds = math.ceil(len(order) / (batch_size * workers))
    per_round = math.ceil(len(order) / rounds) if rounds else 0
    batches = []
    for start in range(0, len(order), per_round or 1):
        stretch = order[start:start + per_round]
        batches += [stretch[k::workers] for k in range(min(workers, len(stretch)))]
    return batches


def prefill_groups(lengths: list[int], overhead: int) -> list[tuple[int, int]]:
    """Consecutive row ranges [start, end) that prefill the fewest token columns (each range is as wide
    as its longest row) plus `overhead` columns per range for the cost of a forward pass; exact by dynamic
    programming over the cut points."""
    n = len(lengths)
    best = [0.0] + [math.inf] * n  # best[j]: cheapest prefill of rows [0, j)
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        widest = 0
        for i in range(j - 1, -1, -1):
            widest = max(widest, lengths[i])
            cost = best[i] + (j - i) * widest + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append((cut[j], j))
        j = cut[j]
    return groups[::-1]


def keep_order(done: list[bool]) -> list[int]:
    """The live slots, in an order that leaves most of them in place: those past the first (number
    of live rows) slots move into the finished rows' slots, so compacting copies only those."""
    live = [i for i, d in enumerate(done) if not d]
    movers = iter(i for i in live if i >= len(live))
    return [next(movers) if done[i] else i for i in range(len(live))]


def new_decode_cache(config: Any, capacity: int) -> DynamicCache:
    """The model's cache, with `PreallocatedLayer`s of `capacity` positions where every layer is full
    attention (other layer kinds, e.g. sliding windows, keep transformers' own classes)."""
    cache = DynamicCache(config=config)
    if all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [PreallocatedLayer(capacity) for _ in cache.layers]
    return cache


class PreallocatedLayer(DynamicLayer):
    """A `DynamicLayer` that writes new keys and values into a buffer sized for the whole decode.

    `DynamicLayer` concatenates the full cache with every new token; at population batch sizes
    that copy costs about a tenth of a decode step. The visible cache is a view of the filled part.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        rows, heads = key_states.shape[:2]
        self._keys = key_states.new_zeros((rows, heads, self.capacity, key_states.shape[-1]))
        self._values = value_states.new_zeros((rows, heads, self.capacity, value_states.shape[-1]))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"decode cache holds {self.capacity} positions, {end} were asked for")
        self._keys[:, :, self.length:end] = key_states
        self._values[:, :, self.length:end] = value_states
        self.set_length(end)
        return self.keys, self.values

    def window(self, start: int, end: int, length: int) -> PreallocatedLayer:
        """A layer over rows start:end of this one's buffers (writes land here), holding its first `length` positions."""
        view = PreallocatedLayer(self.capacity)
        view.device, view.is_initialized = self.device, True
        view._keys, view._values = self._keys[start:end], self._values[start:end]
        view.set_length(length)
        return view

    def set_length(self, length: int) -> None:
        """The first `length` positions of the buffers are the visible cache (written here or through a
        window, or left empty and masked)."""
        self.length = length
        self.keys, self.values = self._keys[:, :, :length], self._values[:, :, :length]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        n = len(indices)
        if n <= self._keys.shape[0]:  # fewer rows: in the same buffers, copy the filled part of rows that move
            moved = (indices != torch.arange(n, device=indices.device)).nonzero().squeeze(-1)
            self.keep_rows(n, moved, indices[moved])
        else:  # more rows (a prefix spread over its candidates' rows): new buffers
            self._keys, self._values = self._keys[indices], self._values[indices]
            self.set_length(self.length)

    def keep_rows(self, n: int, moved: torch.Tensor, source: torch.Tensor) -> None:
        """The first `n` rows stay, rows `moved` first taking the filled part of rows `source` (the
        decoder computes both on the host, so nothing here waits for the device)."""
        if not self.is_initialized:
            return
        end = self.length
        if len(moved):
            self._keys[moved, :, :end] = self._keys[source, :, :end]
            self._values[moved, :, :end] = self._values[source, :, :end]
        self._keys, self._values = self._keys[:n], self._values[:n]
        self.set_length(end)
