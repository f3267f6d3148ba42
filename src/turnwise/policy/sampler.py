"""SamplerEngine: continuous-batching token sampler with a KV cache, prefix reuse and live weight updates.

One engine owns one model copy and one background thread. Each iteration of the thread:

1. admits the requests pending at that moment (up to `max_batch_size` rows in all): their
   prompts are prefilled as one left-padded batch (or several, to bound the attention mask's
   memory), reusing the cached KV of a previous turn when `cache_key` names one whose tokens
   are a prefix of the new prompt, and their first token is sampled. Prompts without a cached
   turn that begin alike (every rollout's system prompt and tool list) share one prefill of
   their longest common prefix, kept in a small shared cache for later requests;
2. copies the unfinished ones into free slots of the running batch (`kvbatch.KVBatch`: slots in
   preallocated buffers, so joining copies only the newcomers' KV);
3. runs one decode step for every slot and samples the next token of every running row;
4. retires finished rows: resolves their futures, stores their KV under their `cache_key` and
   frees their slots (the buffers are compacted only when half of them are free).

Sampling (per row): temperature T > 0 samples from softmax(logits / T) restricted to the
top-p nucleus, with the request's own `torch.Generator` (seeded when `seed` is given); the
logprob returned is log softmax(logits / T) of the sampled token (top-p does not change it).
T = 0 is greedy and its logprob is taken from the raw logits. `logprobs.token_logprobs`
recomputes the same numbers for training. A request with a grammar (`SamplingParams.grammar`) has
its row's logits masked first and its logprobs taken over the masked logits, and one asking for
`top_logprobs` gets them from the same distribution (`policy.constrain`, which says how training
treats the masked logprobs).

`update_weights` copies new weights between two iterations (never during a forward pass);
rows in flight keep decoding with the new weights. `Completion.version` is the version that
sampled the completion's first token, i.e. the oldest weights that touched it. The prefix
caches are cleared on every update because their KV was computed by the old weights.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import inspect
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from os.path import commonprefix
from types import TracebackType

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from turnwise.policy import constrain
from turnwise.policy.chat import stop_token_ids_for
from turnwise.policy.kvbatch import KV, KVBatch
from turnwise.types import Completion, FinishReason, SamplingParams

# Bound on batch * query * key elements of one prefill's attention mask (64 MiB in fp32).
_PREFILL_MASK_BUDGET = 16 * 1024 * 1024
_SHARED_MIN = 16
"""Prompts are grouped for a shared prefill by their first `_SHARED_MIN` tokens, and a common
prefix shorter than that is not worth a separate forward pass."""
_SHARED_ENTRIES = 8


class EngineClosedError(RuntimeError):
    """The engine was closed before the request finished."""


class PromptTooLongError(ValueError):
    """The prompt leaves no room for a completion within the model's context."""


@dataclass
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    future: Future[Completion]
    cache_key: str | None
    generator: torch.Generator | None
    on_token: Callable[[int, float], None] | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    n_cached: int = 0
    prompt_tokens: int = 0
    version: int = -1
    finish: FinishReason | None = None
    guide: constrain.Guide | None = None
    top_logprobs: list[constrain.TopLogprobs] = field(default_factory=list)


@dataclass
class _PrefixEntry:
    tokens: tuple[int, ...]
    kv: list[KV]


class SamplerEngine:
    """Batched, thread-safe sampling of completions from one model copy."""

    supports_grammar = True
    """Honours `SamplingParams.grammar` (constrained decoding)."""
    supports_top_logprobs = True
    """Honours `SamplingParams.top_logprobs`."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, max_batch_size: int = 64,
                 version: int = 0, prefix_cache_size: int = 128, copy_model: bool = True,
                 stop_token_ids: Collection[int] | None = None) -> None:
        """`copy_model=False` lets the engine use `model` itself; then nothing else may run it."""
        self._bind(copy.deepcopy(model) if copy_model else model)
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.version = version
        self.prefix_cache_size = prefix_cache_size
        self.stop_token_ids = frozenset(stop_token_ids) if stop_token_ids is not None else stop_token_ids_for(tokenizer)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.stop_token_ids))
        self.max_positions: int | None = getattr(self.model.config, "max_position_embeddings", None)
        self._cond = threading.Condition()
        self._model_lock = threading.RLock()  # reentrant: a future's callback runs in the engine thread
        self._pending: list[_Request] = []
        self._rows: list[_Request | None] = []
        """The request in each slot of `_batch` (None: a free slot)."""
        self._batch: KVBatch | None = None
        self._prefix: OrderedDict[str, _PrefixEntry] = OrderedDict()
        self._shared: OrderedDict[tuple[int, ...], _PrefixEntry] = OrderedDict()
        self._thread: threading.Thread | None = None
        self._closed = False
        vocab = getattr(self.model.config, "vocab_size", None) or len(tokenizer)
        self._guides = constrain.GuideCompiler(tokenizer, int(vocab), self.stop_token_ids)

    def _bind(self, model: PreTrainedModel) -> None:
        self.model = model
        self.model.eval()
        self.model.requires_grad_(False)
        self._dtype = next(self.model.parameters()).dtype
        self._device = next(self.model.parameters()).device
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft twin's forward: **kwargs
        self._cache_kw = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
        self._tensors = {**dict(self.model.named_parameters(remove_duplicate=False)),
                         **dict(self.model.named_buffers(remove_duplicate=False))}

    def replace_model(self, model: PreTrainedModel, version: int | None = None) -> None:
        """Sample from `model` from the next iteration on (e.g. a LoRA policy's adapter twin, whose
        adapters `update_weights` then updates by their own names). Thread-safe."""
        with self._model_lock:
            self._bind(model)
            self._prefix.clear()
            self._shared.clear()
            if version is not None:
                self.version = version

    def start(self) -> SamplerEngine:
        with self._cond:
            if self._closed:
                raise EngineClosedError("engine is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="turnwise-sampler", daemon=True)
                self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread; unfinished requests fail with `EngineClosedError`. Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._cond:
            leftovers, self._pending = self._pending, []
        _fail([*leftovers, *_live(self._rows)], EngineClosedError("sampler engine closed"))
        self._rows, self._batch = [], None

    def __enter__(self) -> SamplerEngine:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams,
               cache_key: str | None = None,
               on_token: Callable[[int, float], None] | None = None) -> Future[Completion]:
        """Queue one request; the future resolves to its `Completion`. Thread-safe.

        `cache_key` (e.g. a trajectory id) stores this sequence's KV when it finishes and reuses
        the longest common prefix of the stored tokens for the next request with the same key.
        `on_token(id, logprob)` is called from the engine thread for each token as it is sampled
        (streaming); it must be quick and must not raise (an error is ignored).
        """
        future: Future[Completion] = Future()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            future.set_exception(ValueError("prompt_ids is empty"))
            return future
        if self.max_positions is not None and len(prompt) >= self.max_positions:
            future.set_exception(PromptTooLongError(
                f"prompt has {len(prompt)} tokens; the model's context is {self.max_positions}"))
            return future
        generator = None
        if params.temperature > 0:
            generator = torch.Generator().manual_seed(
                params.seed if params.seed is not None else secrets.randbits(63))
        request = _Request(prompt, params, future, cache_key, generator, on_token)
        if params.grammar is not None:
            try:
                request.guide = self._guides.compile(params.grammar)
            except ValueError as e:
                future.set_exception(e)
                return future
        if params.max_tokens <= 0:
            future.set_result(Completion((), (), FinishReason.LENGTH, self.version, 0))
            return future
        with self._cond:
            if self._closed:
                future.set_exception(EngineClosedError("sampler engine closed"))
                return future
            self._pending.append(request)
            self._cond.notify_all()
        return future

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams, cache_key: str | None = None,
                       on_token: Callable[[int, float], None] | None = None) -> Completion:
        """`submit` for asyncio callers (a grammar is compiled off the event loop)."""
        if params.grammar is not None:
            future = await asyncio.to_thread(self.submit, prompt_ids, params, cache_key, on_token)
            return await asyncio.wrap_future(future)
        return await asyncio.wrap_future(self.submit(prompt_ids, params, cache_key, on_token))

    def update_weights(self, state_dict: Mapping[str, torch.Tensor], version: int | None = None) -> int:
        """Copy weights in between decode steps; returns the new version (`version`, default the
        current one + 1). Thread-safe."""
        unknown = sorted(set(state_dict) - set(self._tensors))
        if unknown:
            raise KeyError(f"update_weights: {len(unknown)} names not in the sampler's model, e.g. {unknown[:3]}")
        wrong = [k for k, v in state_dict.items() if tuple(v.shape) != tuple(self._tensors[k].shape)]
        if wrong:
            raise ValueError(f"update_weights: shape mismatch for {wrong[:3]}; no weight was changed")
        with self._model_lock, torch.no_grad():
            for name, tensor in state_dict.items():
                self._tensors[name].copy_(tensor)
            self._prefix.clear()
            self._shared.clear()
            self.version = self.version + 1 if version is None else version
            return self.version

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._pending and self._batch is None:
                    self._cond.wait()
                if self._closed:
                    return
                room = self.max_batch_size - len(_live(self._rows))
                newcomers, self._pending = self._pending[:room], self._pending[room:]
            newcomers = [r for r in newcomers if r.future.set_running_or_notify_cancel()]
            try:
                with self._model_lock, torch.inference_mode():
                    if newcomers:
                        self._admit(newcomers)
                    if self._batch is not None:
                        self._decode()
            except Exception as e:  # a failed forward fails its requests, never the engine
                _fail([*newcomers, *_live(self._rows)], e)
                self._rows, self._batch = [], None

    def _admit(self, newcomers: list[_Request]) -> None:
        prefixes = [self._lookup(r) for r in newcomers]
        if self.prefix_cache_size > 0:
            self._share_prefixes(newcomers, prefixes)
        order = sorted(range(len(newcomers)), key=lambda i: len(newcomers[i].prompt_ids) - _plen(prefixes[i]))
        group: list[int] = []
        for i in order:
            trial = [*group, i]
            suffix = max(len(newcomers[j].prompt_ids) - _plen(prefixes[j]) for j in trial)
            past = max(_plen(prefixes[j]) for j in trial)
            if group and len(trial) * suffix * (suffix + past) > _PREFILL_MASK_BUDGET:
                self._prefill([newcomers[j] for j in group], [prefixes[j] for j in group])
                trial = [i]
            group = trial
        if group:
            self._prefill([newcomers[j] for j in group], [prefixes[j] for j in group])

    def _share_prefixes(self, newcomers: list[_Request], prefixes: list[list[KV] | None]) -> None:
        """Give requests without a cached turn the KV of the prefix they share with others
        (prefilled once here) or with a shared-cache entry; fills `prefixes` in place."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, r in enumerate(newcomers):
            if prefixes[i] is None and len(r.prompt_ids) > _SHARED_MIN:
                groups.setdefault(tuple(r.prompt_ids[:_SHARED_MIN]), []).append(i)
        for head, members in groups.items():
            prompts = [newcomers[i].prompt_ids for i in members]
            # leave at least one prompt token to prefill: its logits give the first sample
            n_group = min(len(commonprefix(prompts)), *(len(p) - 1 for p in prompts))
            entry = self._shared.get(head)
            n_entry = min(len(commonprefix([list(entry.tokens), *prompts])), n_group) if entry else 0
            if entry is not None and (n_entry >= n_group or len(members) == 1) and n_entry >= _SHARED_MIN:
                self._shared.move_to_end(head)
                kv = [(k[:, :, :n_entry], v[:, :, :n_entry]) for k, v in entry.kv]
            elif len(members) > 1 and n_group >= _SHARED_MIN:
                tokens = prompts[0][:n_group]
                kv = self._prefill_shared(tokens)
                self._shared[head] = _PrefixEntry(tuple(tokens), kv)
                while len(self._shared) > _SHARED_ENTRIES:
                    self._shared.popitem(last=False)
            else:
                continue
            for i in members:
                prefixes[i] = kv

    def _prefill_shared(self, tokens: list[int]) -> list[KV]:
        batch = KVBatch([], torch.zeros((1, 0), dtype=torch.bool, device=self._device), headroom=0)
        cache = batch.cache()
        mask = batch.step_mask(torch.ones((1, len(tokens)), dtype=torch.bool, device=self._device), self._dtype)
        self._forward(torch.tensor([tokens]), torch.arange(len(tokens))[None], mask, cache)
        return [(layer.keys, layer.values) for layer in cache.layers]

    def _prefill(self, reqs: list[_Request], prefixes: list[list[KV] | None]) -> None:
        n_past = [_plen(p) for p in prefixes]
        suffixes = [r.prompt_ids[n:] for r, n in zip(reqs, n_past, strict=True)]
        width = max(len(s) for s in suffixes)
        ids = torch.full((len(reqs), width), self.pad_id, dtype=torch.long)
        pos = torch.zeros((len(reqs), width), dtype=torch.long)
        valid_in = torch.zeros((len(reqs), width), dtype=torch.bool)
        for row, (suffix, n) in enumerate(zip(suffixes, n_past, strict=True)):
            ids[row, width - len(suffix):] = torch.tensor(suffix)
            pos[row, width - len(suffix):] = torch.arange(n, n + len(suffix))
            valid_in[row, width - len(suffix):] = True
        valid_in = valid_in.to(self._device)
        batch = KVBatch.from_prefixes(prefixes, headroom=width)
        if batch is None:  # the model creates the cache's layers
            batch = KVBatch([], torch.zeros((len(reqs), 0), dtype=torch.bool, device=self._device), headroom=width)
        cache = batch.cache()
        mask = batch.step_mask(valid_in, self._dtype)
        logits = self._forward(ids, pos, mask, cache)
        if batch.layers:
            batch.advance()
        else:
            batch = KVBatch([(layer.keys, layer.values) for layer in cache.layers], valid_in, headroom=0)
        for r, n, suffix in zip(reqs, n_past, suffixes, strict=True):
            r.n_cached, r.prompt_tokens, r.version = n + len(suffix), len(suffix), self.version
        self._sample(reqs, logits)
        keep = self._retire(reqs, batch)
        if not keep:
            return
        if self._batch is None:
            self._batch, self._rows = batch.compact(keep), [reqs[i] for i in keep]
            return
        slots = self._batch.insert(batch, keep)
        self._rows += [None] * (self._batch.rows - len(self._rows))
        for slot, row in zip(slots, keep, strict=True):
            self._rows[slot] = reqs[row]

    def _decode(self) -> None:
        assert self._batch is not None
        batch, slots = self._batch, self._rows
        live = [i for i, r in enumerate(slots) if r is not None]
        ids = torch.tensor([[r.tokens[-1] if r is not None else self.pad_id] for r in slots], dtype=torch.long)
        pos = torch.tensor([[r.n_cached if r is not None else 0] for r in slots], dtype=torch.long)
        mask = batch.step_mask(torch.ones((len(slots), 1), dtype=torch.bool, device=self._device), self._dtype)
        logits = self._forward(ids, pos, mask, batch.cache())
        batch.advance()
        rows = [slots[i] for i in live]
        for r in rows:
            r.n_cached += 1  # type: ignore[union-attr]
        self._sample(rows, logits[live] if len(live) < len(slots) else logits)  # type: ignore[arg-type]
        keep = self._retire(rows, batch, live)  # type: ignore[arg-type]
        for i in set(range(len(live))) - set(keep):
            batch.release(live[i])
            slots[live[i]] = None
        if len(keep) == len(live):
            return
        if not keep:
            self._rows, self._batch = [], None
        elif batch.wants_compaction():
            kept = [live[i] for i in keep]
            self._batch, self._rows = batch.compact(kept), [slots[i] for i in kept]

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, cache: object) -> torch.Tensor:
        out = self.model(input_ids=ids.to(self._device), attention_mask=mask, position_ids=pos.to(self._device),
                         use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
        return out.logits[:, -1].float()

    def _sample(self, reqs: list[_Request], logits_B_V: torch.Tensor) -> None:
        logits_B_V = constrain.mask_rows(logits_B_V, [r.guide for r in reqs])
        tokens, logprobs = sample_tokens(logits_B_V, [r.params for r in reqs], [r.generator for r in reqs])
        tops = constrain.top_logprobs(logits_B_V, [r.params for r in reqs])
        for r, tok, lp, top in zip(reqs, tokens, logprobs, tops, strict=True):
            r.tokens.append(tok)
            r.logprobs.append(lp)
            if r.guide is not None:
                r.guide.advance(tok)
            if top is not None:
                r.top_logprobs.append(top)
            r.finish = self._finish_reason(r)
            if r.on_token is not None:
                with contextlib.suppress(Exception):  # a consumer's bug must not stop the engine
                    r.on_token(tok, lp)

    def _finish_reason(self, r: _Request) -> FinishReason | None:
        if r.tokens[-1] in self.stop_token_ids:
            return FinishReason.STOP
        if r.params.stop:
            window = 4 * max(len(s) for s in r.params.stop) + 4
            tail = self.tokenizer.decode(r.tokens[-window:], skip_special_tokens=False)
            if any(s and s in tail for s in r.params.stop):
                return FinishReason.STOP
        if len(r.tokens) >= r.params.max_tokens:
            return FinishReason.LENGTH
        if self.max_positions is not None and len(r.prompt_ids) + len(r.tokens) >= self.max_positions:
            return FinishReason.LENGTH
        return None

    def _retire(self, reqs: list[_Request], batch: KVBatch, slots: Sequence[int] | None = None) -> list[int]:
        """Resolve finished rows (storing their KV, from `slots[i]` of `batch`, by cache key); the
        indices of the others."""
        keep = []
        for row, r in enumerate(reqs):
            if r.finish is None:
                keep.append(row)
                continue
            if r.cache_key is not None and self.prefix_cache_size > 0:
                self._store(r.cache_key, (*r.prompt_ids, *r.tokens[:-1]),
                            batch.row_kv(slots[row] if slots is not None else row))
            r.future.set_result(Completion(tuple(r.tokens), tuple(r.logprobs), r.finish, r.version, r.prompt_tokens,
                                           tuple(r.top_logprobs)))
        return keep

    def _lookup(self, r: _Request) -> list[KV] | None:
        entry = self._prefix.get(r.cache_key) if r.cache_key is not None else None
        if entry is None:
            return None
        self._prefix.move_to_end(r.cache_key)  # type: ignore[arg-type]
        limit = min(len(entry.tokens), len(r.prompt_ids) - 1)
        n = 0
        while n < limit and entry.tokens[n] == r.prompt_ids[n]:
            n += 1
        if n == 0:
            return None
        return [(k[:, :, :n], v[:, :, :n]) for k, v in entry.kv]

    def _store(self, key: str, tokens: tuple[int, ...], kv: list[KV]) -> None:
        if kv and kv[0][0].shape[2] != len(tokens):
            return
        self._prefix[key] = _PrefixEntry(tokens, kv)
        self._prefix.move_to_end(key)
        while len(self._prefix) > self.prefix_cache_size:
            self._prefix.popitem(last=False)


def sample_tokens(logits_B_V: torch.Tensor, params: Sequence[SamplingParams],
                  generators: Sequence[torch.Generator | None]) -> tuple[list[int], list[float]]:
    """One token per row and its logprob (see the module docstring for the convention)."""
    batch, vocab = logits_B_V.shape
    tokens = torch.empty(batch, dtype=torch.long)
    logprobs = torch.empty(batch, dtype=torch.float32)
    greedy = [i for i, p in enumerate(params) if p.temperature <= 0]
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if greedy:
        logits = logits_B_V[greedy].cpu()
        tok = logits.argmax(dim=-1)
        tokens[greedy] = tok
        logprobs[greedy] = (logits.gather(1, tok[:, None]) - logits.logsumexp(dim=-1, keepdim=True)).squeeze(1)
    if sampled:
        temps = torch.tensor([params[i].temperature for i in sampled], dtype=torch.float32)
        logp = torch.log_softmax(logits_B_V[sampled].cpu() / temps[:, None], dim=-1)
        probs = logp.exp()
        top_p = torch.tensor([params[i].top_p for i in sampled], dtype=torch.float32)
        index = None
        if bool((top_p < 1).any()):
            probs, index = probs.sort(dim=-1, descending=True)
            mass_before = probs.cumsum(dim=-1) - probs
            probs = probs * (mass_before < top_p[:, None])
        cdf = probs.cumsum(dim=-1)
        u = torch.stack([torch.rand((), generator=generators[i]) for i in sampled])
        pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp(max=vocab - 1)
        tok = (index.gather(1, pick) if index is not None else pick).squeeze(1)
        tokens[sampled] = tok
        logprobs[sampled] = logp.gather(1, tok[:, None]).squeeze(1)
    return tokens.tolist(), logprobs.tolist()


def _plen(prefix: list[KV] | None) -> int:
    return int(prefix[0][0].shape[2]) if prefix else 0


def _live(slots: Sequence[_Request | None]) -> list[_Request]:
    return [r for r in slots if r is not None]


def _fail(reqs: Sequence[_Request], error: BaseException) -> None:
    for r in reqs:
        if not r.future.done():
            r.future.set_exception(error)
