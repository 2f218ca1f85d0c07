"""Step-level (continuous) decoding: requests join a running batch between two decoding steps
and leave the step they finish. It is the one decoding path: a whole batch is a step batch
whose requests all join at step 0 (`decode`).

The engine keeps one `StepBatch` on its model thread and, at every step boundary, drops the
rows that finished (their KV cache rows go), prefills the rows that arrived (together, in one
call) and merges their caches in (app/generation/kv.py). Each request is a group of rows,
contiguous in the batch, and its decoding mode (app/generation/modes/) decides what a step does
with its rows' logits; the backend family (app/generation/seq2seq.py, causal.py) runs the model.

Exactness: tokens equal transformers' greedy generate() on the row alone, and RAG answers and
weights equal transformers' RAG classes (tests/test_rag_seq2seq.py, test_rag_causal.py) and the
request alone, for rows joining at different steps, leaving, and under mixed adapters
(tests/test_stepping.py). Where a family cannot pad per row exactly (other seq2seq position
schemes, sliding-window caches) `cannot_join` says why, and the engine starts every batch whole.

The one second path, and why: a model whose generation config adds logits processors (BART
checkpoints' forced BOS/EOS, n-gram blocking), or a decoder-only model whose forward takes no
position ids, answers concat rows through transformers' own generate(), which applies them;
re-implementing each processor per row here would be a copy of transformers' code. Its RAG
rows step here as on any model (the RAG modes apply no processors).

transformers' own continuous batching (generation/continuous_batching) is decoder-only and
packs the rows into one sequence for paged attention, which per-row LoRA indexed by batch row
(app/lora/batched.py) cannot follow; and it has no encoder-decoder path, which lorag serves
first.

Threads: the model thread only (the engine's).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from collections.abc import Set as AbstractSet
from contextlib import AbstractContextManager, nullcontext
from typing import Any, NamedTuple, Protocol

import torch

from app.contracts import GREEDY, GenRow, Passage, Sampling, Turn
from app.errors import InvalidInputError
from app.generation import kv
from app.generation.config import DecodingConfig
from app.generation.family import Family
from app.generation.modes.base import Answer, Found, Request
from app.generation.modes.concat import Concat
from app.generation.modes.sequence import RagSequence
from app.generation.modes.token import RagToken
from app.generation.prefix_cache import Climb, PrefixCache, shared_blocks
from app.lora.batched import BatchedLora, RowPlan
from app.lora.peft_host import untouched_layers

log = logging.getLogger(__name__)

# A model call's fixed cost on a CPU, in prompt tokens: about what prefilling a few dozen
# tokens costs (bench/RESULTS.md, "Prefix cache"). A joiner is prefilled in a second call after
# the others when it would reuse at least this many of their prompt tokens (`_followers`), and
# the engine prefills joiners with fewer than this to compute (prefix-cache hits) before the
# others, in a call of their own (app/engine/session.cheap_first).
CALL_COST_TOKENS = 64

Finished = tuple[Hashable, Answer]  # a request's key and its answer


class Decoded(NamedTuple):
    text: str
    tokens: int  # tokens the model generated for it, its end-of-sequence token included


class Host(Protocol):
    """What the step batch needs of a generator (app/generation/generator.py)."""

    family: Family
    device: torch.device
    batched: BatchedLora | None  # stacked per-row LoRA, when attached
    eos_ids: set[int]  # every end token (concat stops on any)
    rag_eos: int  # the one end token the RAG searches stop on
    pad_id: int
    weights_epoch: int  # changes whenever the model's weights do
    base_epoch: int  # changes whenever the base weights do (a merge, an unmerge)

    @property
    def model(self) -> Any: ...  # read at every call: the registry may swap it between steps

    def adapter_kwargs(self, adapters: Sequence[str | None]) -> dict[str, Any]: ...
    def decode_answer(self, ids: Sequence[int]) -> Decoded: ...
    def cannot_step(self) -> str | None: ...
    def concat_prompt(self, row: GenRow) -> list[int]: ...
    def passage_prompts(
        self, question: str, passages: Sequence[Passage], new: int, history: Sequence[Turn] = ()
    ) -> list[list[int]]: ...
    def generate_whole(self, rows: Sequence[GenRow]) -> list[Decoded]: ...


class StepBatch:
    """The running batch on the model thread.

        batch = StepBatch(generator)
        done = batch.join(rows, keys)   # prefill new rows; rows done at once come back
        while len(batch):
            done += batch.step()        # one token for every row; finished rows leave
        batch.drop({key})               # a row whose client left

    Adapters: each request's rows run under its PEFT adapter name; the caller re-sets names
    with `rename` when the registry changes what a request's version is called (a merge or an
    unmerge).
    """

    def __init__(
        self, host: Host, decoding: DecodingConfig | None = None, *, in_place_cache: bool = True
    ) -> None:
        self.host = host
        decoding = decoding or DecodingConfig()
        self.num_beams = decoding.num_beams  # the RAG modes' beam search (1: greedy)
        self.min_prior = decoding.min_prior  # the RAG modes' prior pruning
        self._in_place = in_place_cache  # False: transformers' concatenating layers (benchmarks)
        dtype = next(host.model.parameters()).dtype
        self._dtype = dtype  # what decoding runs in, and what a prefill's keys and values get
        # bfloat16 prefill: matmuls under autocast, on a float32 model only (see _prefill_context)
        self._autocast = decoding.prefill_dtype == "bfloat16" and dtype == torch.float32
        self._requests: list[Request] = []
        self._state: kv.State | None = None
        self._plan: tuple[tuple[str | None, ...], Any, RowPlan] | None = None
        self.concat_whole = host.cannot_step()  # why concat rows use generate(), or None
        family = host.family
        reuse = decoding.prefix_cache_bytes > 0 and (
            family.reuses_inputs  # encoder outputs of identical inputs
            or (family.reuses_prefixes and family.cannot_join() is None)  # compact() after
        )
        self.prefixes = PrefixCache(decoding.prefix_cache_bytes) if reuse else None
        # the weights (and base weights) the cache was last checked against (None: never)
        self._epoch: int | None = None
        self._base_epoch: int | None = None
        if self.concat_whole is not None:
            log.warning("concat rows decode through generate(): %s", self.concat_whole)

    @property
    def cannot_join(self) -> str | None:
        """Why rows cannot join a running batch exactly (start every batch whole), or None."""
        return self.host.family.cannot_join()

    def __len__(self) -> int:
        """Running requests."""
        return len(self._requests)

    @property
    def width(self) -> int:
        """Running batch rows (a RAG request has one per kept passage and open beam)."""
        return sum(r.n for r in self._requests)

    @property
    def keys(self) -> list[Hashable]:
        return [r.key for r in self._requests]

    def rows_for(self, mode: str, passages: int) -> int:
        """Batch rows a request may take (the RAG modes: one per passage before pruning, times
        the beams)."""
        return 1 if mode == "concat" else max(1, passages) * self.num_beams

    def prompt_tokens(self, row: GenRow) -> int:
        """The tokens join() would compute now for such a request: its prompt (concat), or its
        passages' prompts padded to the longest (the RAG modes; pruning not counted), each
        less the prefix the cache holds for it under row.adapter (decoder-only rows). The
        engine's prefill budget counts these, as vLLM's scheduler counts a request's tokens
        after its prefix-cache hits: a joiner whose prompt is cached costs what it computes."""
        if row.mode == "concat":
            prompts = [self.host.concat_prompt(row)]
        elif row.passages:
            prompts = self.host.passage_prompts(row.question, row.passages, row.max_new_tokens)
        else:
            return 0
        cache = self._live_cache() if self.host.family.reuses_prefixes else None
        if cache is None:
            return len(prompts) * max(len(p) for p in prompts)
        return len(prompts) * max(len(p) - cache.covered(row.adapter, p) for p in prompts)

    def text_of(self, key: Hashable) -> str | None:
        """The answer so far of a running request, as its final answer will begin; None for
        RAG-Sequence and beam search, whose answer is chosen at the end, and for a key not
        running."""
        for r in self._requests:
            if r.key == key:
                ids = r.partial()
                if ids is None:
                    return None
                return visible(self.host.decode_answer(ids).text, r.sampling.stop)
        return None

    @property
    def adapters(self) -> list[str | None]:
        """The PEFT adapter name of every batch row."""
        return _row_names(self._requests)

    def rename(self, adapters: dict[Hashable, str | None]) -> None:
        """Set the PEFT adapter name of the requests named by key."""
        for r in self._requests:
            if r.key in adapters:
                r.adapter = adapters[r.key]

    def clear(self) -> list[Hashable]:
        """Drop every request (after a failed step); returns their keys."""
        keys = self.keys
        self._requests, self._state, self._plan = [], None, None
        return keys

    def drop(self, keys: AbstractSet[Hashable]) -> None:
        """Take the requests with these keys out (their clients left)."""
        keep = [i for i, r in enumerate(self._requests) if r.key not in keys]
        if len(keep) < len(self._requests):
            self._keep(keep)

    # ---- joining --------------------------------------------------------------------------

    def request(self, row: GenRow, key: Hashable) -> Request:
        """The request that decodes row in its mode (its prompts tokenized)."""
        h = self.host
        if row.mode == "concat":
            prompt = h.concat_prompt(row)
            return Concat(key, row.adapter, row.max_new_tokens, prompt, h.eos_ids, row.sampling)
        prompts = h.passage_prompts(row.question, row.passages, row.max_new_tokens, row.history)
        return self.rag_request(
            key,
            row.adapter,
            row.max_new_tokens,
            row.mode,
            prompts,
            row.scores,
            row.decoding,
            row.sampling,
        )

    def rag_request(
        self,
        key: Hashable,
        adapter: str | None,
        limit: int,
        mode: str,
        prompts: Sequence[list[int]],
        scores: Sequence[float],
        decoding: str = "thorough",
        sampling: Sampling = GREEDY,
    ) -> Request:
        """A RAG-Token or RAG-Sequence request over prompts (one per passage)."""
        if self.num_beams > 1 and not sampling.greedy:
            raise InvalidInputError(
                f"temperature {sampling.temperature} samples, and the RAG modes here search "
                f"with {self.num_beams} beams (LORAG_NUM_BEAMS): use temperature 0"
            )
        h = self.host
        common: dict[str, Any] = {
            "eos": h.rag_eos,
            "pad": h.pad_id,
            "min_prior": self.min_prior,
            "num_beams": self.num_beams,
            "device": h.device,
            "sampling": sampling,
        }
        if mode == "token":
            return RagToken(key, adapter, limit, prompts, scores, **common)
        if mode == "sequence":
            return RagSequence(
                key, adapter, limit, prompts, scores, decoding=decoding,  # type: ignore[arg-type]
                scorer=self._score, **common,
            )  # fmt: skip
        raise ValueError(f"no decoding mode {mode!r}")

    def join(self, rows: Sequence[GenRow], keys: Sequence[Hashable]) -> list[Finished]:
        """Prefill rows (together) and add them to the batch. Each row's first token comes
        from the prefill; a row that is finished by it (an end token, or max_new_tokens 1) is
        returned and not added. Raises (and adds nothing) when the prefill fails."""
        finished: list[Finished] = []
        whole: list[tuple[Hashable, GenRow]] = []
        requests: list[Request] = []
        for key, row in zip(keys, rows, strict=True):
            if row.mode == "concat" and self.concat_whole is not None:
                whole.append((key, row))
            elif row.mode != "concat" and not row.passages:  # nothing to marginalize over
                finished.append((key, Answer("", [], 0)))
            else:
                requests.append(self.request(row, key))
        if whole:
            if any(not r.sampling.greedy or r.sampling.stop for _, r in whole):
                raise InvalidInputError(
                    f"this model decodes through generate() ({self.concat_whole}): "
                    "greedy only, without stop strings"
                )
            done = self.host.generate_whole([r for _, r in whole])
            for (k, r), d in zip(whole, done, strict=True):
                prompt = len(self.host.concat_prompt(r))
                finished.append((k, Answer(d.text, None, d.tokens, prompt_tokens=prompt)))
        return finished + self.join_requests(requests)

    def join_requests(self, requests: Sequence[Request]) -> list[Finished]:
        """Prefill requests (their prompts together) and add them to the batch. With the
        prefix cache, requests whose prompts start with blocks that an earlier joiner's prompt
        computes too are prefilled after those blocks are cached (`_followers`), and rows are
        prefilled in calls of similar lengths left to compute (`_by_length`). Nothing joins
        the batch until every call is done, so a failure in any adds nothing."""
        if not requests:
            return []
        later = self._followers(requests)
        first = [r for i, r in enumerate(requests) if i not in later]
        second = [r for i, r in enumerate(requests) if i in later]
        groups = self._by_length(first)
        parts = [self._prefill(g) for g in groups]
        later_groups = self._by_length(second)  # looked up after first's blocks are stored
        parts += [self._prefill(g) for g in later_groups]
        requests = [r for g in groups + later_groups for r in g]  # the rows' order in parts
        state, logits = parts[0]
        if len(parts) > 1:
            with torch.inference_mode():
                for other, _ in parts[1:]:
                    kv.merge(state, other)
                logits = torch.cat([x for _, x in parts])
        at = 0
        for r in requests:
            states = state.enc_hidden[at : at + r.n] if state.enc_hidden is not None else None
            r.prefilled(states)
            at += r.n
        if self._in_place:
            kv.grow_in_place(state)
        done, keep, nxt = self._advance(requests, logits)
        ended = {k for k, _ in done}
        alive = [r for r in requests if r.key not in ended]
        if alive:
            if keep != list(range(state.rows)):
                state = kv.select(state, keep)
            state.last = torch.tensor(nxt, dtype=torch.long, device=state.mask.device)
            self._requests += alive
            if self._state is None:
                self._state = state
            else:
                kv.merge(self._state, state)
        return done

    def _prefill(self, requests: Sequence[Request]) -> tuple[kv.State, torch.Tensor]:
        """One prefill of the requests' rows, each after its longest cached prefix; their
        prompt blocks are offered to the cache. Returns the state (holes compacted) and the
        logits of each row's last prompt token [rows, V]."""
        h = self.host
        ids = [p for r in requests for p in r.prompts]
        names = _row_names(requests)
        if self.prefixes is not None and h.family.reuses_inputs:
            return self._prefill_encoded(requests, names, ids)
        climbed = self._climb(names, ids)
        ctx, extra = self._adapters(names, keep=False)
        found = self._cached(names, ids)
        cached = [layers[0][0].shape[1] if layers else 0 for layers in found]
        left = h.family.padding_side == "left"
        tokens, mask = pad(
            [p[n:] for p, n in zip(ids, cached, strict=True)], h.pad_id, left=left, device=h.device
        )
        past = _past(found, cached, h.device) if any(cached) else None
        split = self.prefixes.split if self.prefixes is not None else 0
        entering = h.family.capture(h.model, split) if split else nullcontext([])
        with torch.inference_mode(), ctx, self._prefill_context(), entering as hidden:
            state, logits = h.family.prefill(h.model, tokens, mask, extra, past)
        kv.check_filled(state)  # refuse caches we cannot step, before merging
        logits = self._decoding_dtype(state, logits)
        self._keep_prefixes(names, ids, cached, state, hidden[0] if hidden else None)
        if past is not None:
            with torch.inference_mode():
                state = kv.compact(state)
        reused = self._take_climbed(cached, climbed)
        for r, n in zip(requests, _per_request(requests, reused), strict=True):
            r.reused = n
        return state, logits

    def _climb(self, names: Sequence[str | None], ids: Sequence[list[int]]) -> list[Climb | None]:
        """Rows whose prompt blocks are cached further below the split (another adapter's rows
        prefilled them) than in every layer under their own adapter: the upper layers run on
        the kept hidden states of those blocks, in one call, and are kept under the row's
        adapter, so the lookup that follows finds the blocks whole. Returns each row's climb."""
        cache = self._live_cache()
        if cache is None or not cache.split:
            return [None] * len(ids)
        climbs = [cache.climb(n, p) for n, p in zip(names, ids, strict=True)]
        rows = [i for i, c in enumerate(climbs) if c is not None]
        if not rows:
            return climbs
        h = self.host
        todo = [c for c in climbs if c is not None]
        width = max(c.shared - c.full for c in todo)
        # [J, T, d] left padded, as the tokens of a prefill after a cached prefix are
        hidden = todo[0].hidden.new_zeros(len(todo), width, todo[0].hidden.shape[-1])
        mask = torch.zeros(len(todo), width, dtype=torch.long, device=h.device)
        for j, c in enumerate(todo):
            hidden[j, width - len(c.hidden) :] = c.hidden
            mask[j, width - len(c.hidden) :] = 1
        # every layer's keys and values of the tokens cached whole: the lower layers' for the
        # masks (they read the first layer's length), the upper ones' for attention
        found = [
            [(k[:, : c.full], v[:, : c.full]) for k, v in c.lower] + c.upper if c.full else []
            for c in todo
        ]
        full = [c.full for c in todo]
        past = _past(found, full, h.device) if any(full) else None
        ctx, extra = self._adapters([names[i] for i in rows], keep=False)
        with torch.inference_mode(), ctx, self._prefill_context():
            state, _ = h.family.climb(h.model, hidden, mask, extra, past, cache.split)
            upper = state.self_layers()[cache.split :]
            for j, i in enumerate(rows):
                columns = state.mask[j].nonzero().squeeze(-1)  # tokens [0, shared), in order
                kept = [
                    (x.keys[j][:, columns].to(self._dtype), x.values[j][:, columns].to(self._dtype))
                    for x in upper
                ]
                cache.store_upper(names[i], ids[i][: todo[j].shared + 1], kept)
        return climbs

    def _take_climbed(self, cached: Sequence[int], climbs: Sequence[Climb | None]) -> list[int]:
        """What each row reused: its cached tokens, less the upper layers' share of those a
        climb computed (the cache's stats likewise)."""
        cache = self.prefixes
        out = list(cached)
        if cache is None or not cache.split:
            return out
        for i, c in enumerate(climbs):
            if c is None:
                continue
            climbed = max(0, min(cached[i], c.shared) - c.full)
            debit = climbed * (cache.layers - cache.split) // cache.layers
            out[i] -= debit
            cache.stats.reused -= debit
            cache.stats.climbed += climbed
        return out

    def _prefill_encoded(
        self, requests: Sequence[Request], names: Sequence[str | None], ids: Sequence[list[int]]
    ) -> tuple[kv.State, torch.Tensor]:
        """_prefill for encoder-decoder rows with the cache: the encoder runs only on the
        inputs not cached under their adapter (each once, however many rows hold it), and
        the decoder's first step on every row's encoder output."""
        h = self.host
        states, reused = self._encoder_states(names, ids)
        tokens, mask = pad(ids, h.pad_id, left=h.family.padding_side == "left", device=h.device)
        ctx, extra = self._adapters(names, keep=False)
        with torch.inference_mode(), ctx, self._prefill_context():
            state, logits = h.family.prefill(h.model, tokens, mask, extra, states=states)
        kv.check_filled(state)
        logits = self._decoding_dtype(state, logits)
        for r, n in zip(requests, _per_request(requests, reused), strict=True):
            r.reused = n
        return state, logits

    def _encoder_states(
        self, names: Sequence[str | None], ids: Sequence[list[int]]
    ) -> tuple[torch.Tensor, list[int]]:
        """Every row's encoder output [rows, S, d] (S the longest input; zeros after a row's
        input, where its mask is 0), and the tokens each row reused: a row whose exact input
        is cached under its adapter, or is an earlier row's of this call, takes that output;
        the others are encoded in one call and kept."""
        h = self.host
        cache = self._live_cache()
        assert cache is not None
        found = [cache.encoded(n, p) for n, p in zip(names, ids, strict=True)]
        todo: dict[tuple[str | None, tuple[int, ...]], int] = {}  # input -> row of the call
        reused = []
        for n, p, hit in zip(names, ids, found, strict=True):
            key = (n, tuple(p))
            if hit is None and key in todo:  # a repeat within this call: encoded once
                cache.stats.reused += len(p)
            reused.append(len(p) if hit is not None or key in todo else 0)
            if hit is None:
                todo.setdefault(key, len(todo))
        new = None
        if todo:
            inputs = list(todo)
            tokens, mask = pad([list(x) for _, x in inputs], h.pad_id, left=False, device=h.device)
            ctx, extra = self._adapters([n for n, _ in inputs], keep=False)
            with torch.inference_mode(), ctx, self._prefill_context():
                new = h.family.encode(h.model, tokens, mask, extra).to(self._dtype)
            for (n, x), i in todo.items():
                cache.keep_encoded(n, x, new[i, : len(x)])
        like = new[0] if new is not None else next(x for x in found if x is not None)
        states = like.new_zeros(len(ids), max(len(p) for p in ids), like.shape[-1])
        for i, (n, p, hit) in enumerate(zip(names, ids, found, strict=True)):
            if hit is None:
                assert new is not None
                hit = new[todo[(n, tuple(p))], : len(p)]
            states[i, : len(p)] = hit
        return states, reused

    def _prefill_context(self) -> AbstractContextManager[Any]:
        """Where prefill_dtype is "bfloat16", autocast for a prefill (or encoder) call: its
        matmuls in bfloat16, the residual stream and norms in float32. Prefill is compute-bound
        on a CPU and bfloat16 matmuls run about twice as fast where the CPU has them (AVX512-BF16,
        AMX), while decoding steps are memory-bound and ran slower in bfloat16, so they stay in
        the model's dtype (bench/RESULTS.md, "Prefill in bfloat16"). Cache hits stay exact:
        every prefill, whole prompt or suffix after a cached prefix, runs the same way."""
        if not self._autocast:
            return nullcontext()
        return torch.autocast(self.host.device.type, dtype=torch.bfloat16)

    def _decoding_dtype(self, state: kv.State, logits: torch.Tensor) -> torch.Tensor:
        """A prefill's keys, values and encoder output, and its logits, in the decoding dtype."""
        if self._autocast:
            with torch.inference_mode():
                kv.cast(state, self._dtype)
                logits = logits.to(self._dtype)
        return logits

    def _by_length(self, requests: Sequence[Request]) -> list[list[Request]]:
        """The requests in prefill calls of similar lengths to compute (prompt tokens after
        the cached prefix), longest first. A call pads every row to its longest, and on a CPU
        a padded token costs what a real one does, so one row that reuses most of its prompt
        beside one that reuses nothing would save nothing; without the cache the groups are
        the whole join (one call), as before."""
        cache = self.prefixes
        if cache is None or not self.host.family.reuses_prefixes or len(requests) < 2:
            return [list(requests)] if requests else []

        # each request's longest row, in tokens after its cached prefix (a lookup walks the
        # prompt's blocks, so once per request)
        todo = [(max(len(p) - cache.covered(r.adapter, p) for p in r.prompts), r) for r in requests]
        todo.sort(key=lambda item: item[0], reverse=True)
        groups: list[list[Request]] = []
        top = 0
        for n, r in todo:
            if groups and top - n <= max(CALL_COST_TOKENS, top // 4):
                groups[-1].append(r)
            else:
                groups.append([r])
                top = n
        return groups

    def _followers(self, requests: Sequence[Request]) -> set[int]:
        """The requests worth prefilling after the others: those that the others' prefill
        would spare at least CALL_COST_TOKENS prompt tokens of computing, over what the cache
        spares them now. An earlier joiner's prompt that starts the same way under the same
        adapter computes those blocks whole; under another adapter, where blocks are split,
        their layers below the split, which a climb then takes (split / layers of each token,
        where the climb is worth its call). Below CALL_COST_TOKENS, a second model call costs
        more than it saves."""
        if not self.host.family.reuses_prefixes or len(requests) < 2:
            return set()
        cache = self._live_cache()  # its split follows the adapters installed now
        if cache is None:
            return set()
        ids = [p for r in requests for p in r.prompts]
        names = _row_names(requests)
        whole = shared_blocks(names, ids)
        # below the split every adapter's rows compute the same keys and values
        below = shared_blocks([None] * len(ids), ids) if cache.split else whole
        gain = []
        for n, p, w, b in zip(names, ids, whole, below, strict=True):
            cached, cached_below = cache.reach(n, p)
            after = max(cached, w)
            now = cache.covers(cached, cached_below)
            gain.append(max(0, cache.covers(after, max(cached_below, b, after)) - now))
        per = _per_request(requests, gain)
        return {i for i, g in enumerate(per) if g >= CALL_COST_TOKENS}

    # ---- stepping -------------------------------------------------------------------------

    def step(self) -> list[Finished]:
        """One decoding step for every row; returns the requests that finished (they leave)."""
        state = self._state
        if state is None:
            return []
        h = self.host
        ctx, extra = self._adapters(self.adapters, keep=True)
        with torch.inference_mode(), ctx:
            logits = h.family.decode(h.model, state, extra)
        finished, keep, nxt = self._advance(self._requests, logits)
        if finished:
            done = {k for k, _ in finished}
            self._requests = [r for r in self._requests if r.key not in done]
        if not keep:
            self._state = None
            return finished
        if len(keep) == state.rows:  # no row left: at most beams were reordered
            kv.reorder(state, keep)
        else:
            state = self._state = kv.select(state, keep)
        state.last = torch.tensor(nxt, dtype=torch.long, device=state.mask.device)
        return finished

    def _advance(
        self, requests: Sequence[Request], logits: torch.Tensor
    ) -> tuple[list[Finished], list[int], list[int]]:
        """Each request's step on its rows' logits [rows, V]: the requests that end here, with
        their answers; the batch rows that go on decoding, and the token each feeds next."""
        greedy = logits.float().argmax(-1).tolist()  # [rows], one call for the whole batch
        finished: list[Finished] = []
        keep: list[int] = []
        nxt: list[int] = []
        at = 0
        for r in requests:
            n = r.n
            step = r.advance(logits[at : at + n], greedy[at : at + n])
            if step.done is None and r.sampling.stop and self._stopped(r):
                step.done = r.stop_here()
            if step.done is not None:
                finished.append((r.key, self._answer(r, step.done)))
            else:
                keep += [at + i for i in step.keep]
                nxt += step.tokens
            at += n
        return finished, keep, nxt

    def _cached(
        self, names: Sequence[str | None], ids: Sequence[list[int]]
    ) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Each row's longest cached prompt prefix (keys and values per layer), or []."""
        cache = self._live_cache()
        if cache is None:
            return [[] for _ in ids]
        return [cache.lookup(n, p) for n, p in zip(names, ids, strict=True)]

    def _live_cache(self) -> PrefixCache | None:
        """The cache, checked first when the model's weights changed since it last served.
        Entries are keyed by the PEFT name a row runs under, which the registry never reuses
        for other weights, so an adapter installed, swapped or unloaded leaves every other
        adapter's entries (and the base's) right: a swapped or unloaded one's are never asked
        for again and age out. The cache is emptied when the base weights changed (a merge or
        an unmerge: while merged the base's name serves the merged adapter, and an unmerge
        puts the weights back only within rounding), or when the layers the installed
        adapters leave alone did (`_split`)."""
        cache = self.prefixes
        h = self.host
        if cache is not None and h.weights_epoch != self._epoch:
            split = self._split()
            if h.base_epoch != self._base_epoch or split != (cache.split, cache.layers):
                cache.clear(*split)
                # a climb is a model call of its own: worth it when it saves what a call costs
                cache.least_climb = CALL_COST_TOKENS * split[1] // split[0] if split[0] else 0
            self._epoch, self._base_epoch = h.weights_epoch, h.base_epoch
        return cache

    def _split(self) -> tuple[int, int]:
        """(split, layers): how many of the model's decoder layers no installed adapter
        changes, so that every adapter's rows compute the same keys and values there, and how
        many layers it has; (0, 0) where nothing is gained or the model cannot start a forward
        partway exactly (checked on a few tokens: the climb must give the whole forward's
        logits)."""
        h = self.host
        layers = h.family.stack(h.model) if h.family.reuses_prefixes else None
        if layers is None:
            return 0, 0
        split = untouched_layers(h.model, layers)
        if not 0 < split < len(layers):
            return 0, 0
        ids = torch.arange(2, 8, device=h.device)[None]  # [1, 6]
        mask = torch.ones_like(ids)
        ctx, extra = self._adapters([None], keep=False)
        with torch.inference_mode(), ctx, h.family.capture(h.model, split) as hidden:
            _, want = h.family.prefill(h.model, ids, mask, extra)
        ctx, extra = self._adapters([None], keep=False)
        with torch.inference_mode(), ctx:
            _, got = h.family.climb(h.model, hidden[0], mask, extra, None, split)
        if not torch.allclose(got.float(), want.float(), rtol=1e-4, atol=1e-4):
            log.warning(
                "prefix blocks are not shared across adapters: this model's forward does not "
                "start at layer %d exactly from the hidden states entering it",
                split,
            )
            return 0, 0
        log.info("prefix blocks: layers 0-%d shared across adapters, of %d", split - 1, len(layers))
        return split, len(layers)

    def _keep_prefixes(
        self,
        names: Sequence[str | None],
        ids: Sequence[list[int]],
        cached: Sequence[int],
        state: kv.State,
        hidden: torch.Tensor | None = None,
    ) -> None:
        """Offer every prefilled row's prompt blocks to the cache (column t: prompt token t),
        with what entered the split layer for the tokens it computed (hidden [J, T, d], T the
        prefill's input columns), where blocks are split."""
        cache = self.prefixes
        if cache is None:
            return
        layers = state.self_layers()
        computed = state.mask.shape[1] - (hidden.shape[1] if hidden is not None else 0)
        for i, (name, prompt) in enumerate(zip(names, ids, strict=True)):
            if not cache.missing(name, prompt):
                continue
            columns = state.mask[i].nonzero().squeeze(-1)  # [L_i] its real tokens, in order
            entering = None
            if hidden is not None:  # [L_i - cached_i, d]: what it computed, tokens cached_i on
                new = state.mask[i, computed:].nonzero().squeeze(-1)
                entering = hidden[i, new].to(self._dtype)
            cache.store(
                name,
                prompt,
                [(x.keys[i][:, columns], x.values[i][:, columns]) for x in layers],
                entering,
                cached[i],
            )

    def _stopped(self, r: Request) -> bool:
        """Whether a stop string has appeared in the request's answer so far."""
        ids = r.partial()
        text = self.host.decode_answer(ids).text if ids is not None else ""
        return any(stop in text for stop in r.sampling.stop)

    def _answer(self, r: Request, found: Found) -> Answer:
        h = self.host
        decoded = h.decode_answer(found.ids)
        text, cut = until_stop(decoded.text, r.sampling.stop)
        ended = bool(found.ids) and (found.ids[-1] in h.eos_ids or found.ids[-1] == h.rag_eos)
        return Answer(
            text,
            found.weights,
            decoded.tokens,
            tuple(found.ids),
            found.logprob,
            found.doc_logprob,
            found.candidates,
            "stop" if cut or ended else "length",
            sum(len(p) for p in r.prompts),
            r.reused,
        )

    def _score(
        self, r: RagSequence, rows: torch.Tensor, answers: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Teacher-forced log p(answer_t|...) [P, T] of answers [P, T] under a RAG-Sequence
        request's kept passages rows [P], with its adapter as it is named now (a merge between
        two steps renames it) and PEFT's adapter_names."""
        h = self.host
        family = h.family
        prompts = [r.prompts[i] for i in rows.tolist()]
        ids, prompt_mask = pad(
            prompts, h.pad_id, left=family.padding_side == "left", device=h.device
        )
        states = None
        if r.encoder_states is not None:  # seq2seq "thorough": the prefill's
            states = r.encoder_states.index_select(0, rows)[:, : ids.shape[1]]
        extra = h.adapter_kwargs([r.adapter] * len(prompts))
        logits = family.answer_logits(h.model, ids, prompt_mask, answers, mask, extra, states)
        lp = torch.log_softmax(logits.float(), -1)
        picked = lp.gather(-1, answers.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [P, T]
        return picked.masked_fill(mask == 0, 0.0)

    def _adapters(
        self, names: Sequence[str | None], *, keep: bool
    ) -> tuple[AbstractContextManager[None], dict[str, Any]]:
        """The context and kwargs that give row i adapter names[i]: the stacked per-row LoRA
        when attached (its plan kept across steps while the rows and the stacks stay the
        same), else PEFT's adapter_names."""
        h = self.host
        extra = h.adapter_kwargs(names)
        batched = h.batched
        if batched is None or "adapter_names" not in extra:
            return nullcontext(), extra
        extra.pop("adapter_names")
        if not keep:
            return batched.rows(names), extra
        key = tuple(names)
        cached = self._plan
        if (
            cached is None
            or cached[0] != key
            or cached[1] is not batched
            or not batched.fresh(cached[2])
        ):
            cached = (key, batched, batched.plan(names))
            self._plan = cached
        return batched.rows(cached[2]), extra

    def _keep(self, keep: list[int]) -> None:
        """Keep the requests at these indices (and their batch rows)."""
        spans = _spans(self._requests, keep)
        self._requests = [self._requests[i] for i in keep]
        if not keep or self._state is None:
            self._state = None
            return
        self._state = kv.select(self._state, spans)


def decode(
    host: Host, rows: Sequence[GenRow], decoding: DecodingConfig | None = None
) -> list[Answer]:
    """Every row's answer, in its own mode, as one batch that they all join at step 0."""
    batch = StepBatch(host, decoding)
    done = dict(batch.join(rows, range(len(rows))))
    while len(batch):
        done.update(batch.step())
    return [done[i] for i in range(len(rows))]


def until_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """text up to the first stop string (not included), and whether one was found."""
    at = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:at].rstrip(), True) if at >= 0 else (text, False)


def visible(text: str, stops: Sequence[str]) -> str:
    """What may be streamed of an answer so far: up to a stop string, and not a tail that may
    yet become one."""
    text, cut = until_stop(text, stops)
    if not cut:
        for stop in stops:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    text = text[:-n]
                    break
    return text


def pad(
    ids: Sequence[list[int]], pad_id: int, *, left: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists padded into input ids and attention mask [B, L] (on the left or right)."""
    width = max(len(x) for x in ids)
    tokens = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        span = slice(width - len(x), width) if left else slice(0, len(x))
        tokens[i, span] = torch.tensor(x, dtype=torch.long)
        mask[i, span] = 1
    return tokens.to(device), mask.to(device)


def _past(
    found: Sequence[list[tuple[torch.Tensor, torch.Tensor]]],
    cached: Sequence[int],
    device: torch.device,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """The rows' cached prefixes as one left-padded past: per layer keys and values
    [J, H, P, D], and its mask [J, P] (P the longest prefix)."""
    width = max(cached)
    template = next(layers for layers in found if layers)
    rows = len(found)
    mask = torch.zeros(rows, width, dtype=torch.long, device=device)
    out = []
    for layer, (k0, v0) in enumerate(template):
        keys = k0.new_zeros(rows, k0.shape[0], width, k0.shape[2])
        values = v0.new_zeros(rows, v0.shape[0], width, v0.shape[2])
        for i, layers in enumerate(found):
            if layers:
                keys[i, :, width - cached[i] :] = layers[layer][0]
                values[i, :, width - cached[i] :] = layers[layer][1]
        out.append((keys, values))
    for i, n in enumerate(cached):
        mask[i, width - n :] = 1 if n else 0
    return out, mask


def _per_request(requests: Sequence[Request], per_row: Sequence[int]) -> list[int]:
    """Per-row counts summed over each request's rows."""
    out, at = [], 0
    for r in requests:
        out.append(sum(per_row[at : at + r.n]))
        at += r.n
    return out


def _row_names(requests: Sequence[Request]) -> list[str | None]:
    """The adapter of every batch row of these requests."""
    return [r.adapter for r in requests for _ in range(r.n)]


def _spans(requests: Sequence[Request], keep: Sequence[int]) -> list[int]:
    """The batch rows of the requests requests[i], i in keep."""
    starts = [0]
    for r in requests:
        starts.append(starts[-1] + r.n)
    return [j for i in keep for j in range(starts[i], starts[i + 1])]
