"""Step-level (continuous) greedy decoding: rows join a running batch between two decoding
steps and leave the step they finish.

`Generator.generate_decoded` runs a batch to the end of its longest answer: a row that ended
early is carried along (31 % of row-steps on the default model, bench/RESULTS.md "What
step-level batching could add"), and a request that arrives meanwhile waits for the whole
batch. Here the engine keeps one `StepBatch` on its model thread and, at every step boundary,
drops the rows that finished (their KV cache rows go: `index_select` on the batch dimension),
prefills the rows that arrived (together, in one call) and merges their caches in.

Rows of different lengths share one cache by left padding: every row's self-attention keys
end at the same column, and the padding columns are masked. What each model needs for that to
be exact, per row, as if the row were decoded alone:
- decoder-only models: the positions of the new token, per row (`position_ids`, the count of
  the row's real tokens), as generate() derives them from the mask;
- T5 (relative position bias): nothing; a bias that depends on key - query distance does not
  see a shift of both;
- BART (learned absolute positions, counted from the cache length for the whole batch): the
  decoder's position embedding is shifted per row for the step (`_bart_positions`).
The encoder side of a seq2seq row (its encoder states, cross-attention keys and values, mask)
is padded on the right, as generate() pads a batch's prompts. Between joins and leaves, a step
appends its keys and values in place, into spare columns of the self-attention cache
(`_GrowingLayer`), instead of transformers' concatenation of the whole cache at every step.

RAG-Token requests (greedy) step here too: a request is a group of rows, one per (kept)
passage, contiguous in the batch; at each step the group's next-token log-probs are
marginalized over its passages with its prior (as app/generation/rag_search.greedy_search) and
the one chosen token is fed to all its rows. Its answer carries p(z|x,y) over its own tokens.
With beams (num_beams > 1), its rows are beams x kept passages, and each step is a step of its
beam search (rag_search.BeamGroup, the same search RagDecoder runs): the rows are reordered
and forked as the beams are, at that step boundary.
RAG-Sequence requests (greedy) too: each kept passage's row decodes its own hypothesis and
leaves when that ends; when the last has ended, the hypotheses are marginalized as
app/generation/rag_sequence.rank does ("thorough": one teacher-forced pass of every hypothesis
under every kept passage, then, on the model thread, between two steps). With beams, each kept
passage runs its own beam search (its rows: its open beams) and leaves when that closes.

Greedy decoding is exact here: tokens equal `generate_decoded` on the row alone, and RAG-Token
and RAG-Sequence answers and weights equal `RagDecoder.run` on the request alone
(tests/test_stepping.py, every backend, rows joining at different steps, mixed adapters).
Models this does not know how to pad exactly (other seq2seq position schemes, caches that are
not plain dynamic layers: sliding windows) or whose generation config adds logits processors
(BART checkpoints' forced BOS/EOS, n-gram blocking) are refused by `step_support`; the engine
then batches whole requests, as before.

transformers' own continuous batching (generation/continuous_batching) is decoder-only and
packs the rows into one sequence for paged attention, which per-row LoRA indexed by batch row
(app/lora/batched.py) cannot follow; and it has no encoder-decoder path, which is what lorag
serves first.

Threads: the model thread only (the engine's).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Hashable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from app.contracts import Decoding, GenRow, Passage
from app.generation.backends import Generator
from app.generation.decoding import Answer, rag_eos_id
from app.generation.rag import doc_posterior, doc_prior, expand_to_docs, kept_docs
from app.generation.rag_runners import CausalRunner, Runner, Seq2SeqRunner
from app.generation.rag_search import BeamGroup, Hypotheses, marginal, pack
from app.generation.rag_sequence import check_decoding, rank
from app.lora.batched import RowPlan

log = logging.getLogger(__name__)

RELATIVE_POSITIONS = frozenset({"t5", "mt5"})  # left padding is exact as it is
SHIFTED_POSITIONS = frozenset({"bart"})  # exact with the decoder's positions shifted per row

Finished = tuple[Hashable, Answer]  # a request's key and its answer


def step_support(generator: Generator) -> str | None:
    """None when `generator` can decode step by step exactly; otherwise why it cannot."""
    model = generator._hf
    config = model.config
    if generator.kind == "seq2seq":
        kind = getattr(config, "model_type", "?")
        if kind not in RELATIVE_POSITIONS | SHIFTED_POSITIONS:
            return f"seq2seq model type {kind!r}: per-row decoder positions not known"
    else:
        params = inspect.signature(_core(model).forward).parameters
        if "position_ids" not in params:
            return "the model's forward takes no position_ids"
        kinds = {type(layer).__name__ for layer in DynamicCache(config=config).layers}
        if kinds != {"DynamicLayer"}:
            return f"cache layers {sorted(kinds)} (sliding windows) cannot be padded per row"
    try:
        processors = model._get_logits_processor(
            generator._greedy(1), input_ids_seq_length=1, device="cpu", model_kwargs={}
        )
    except Exception as exc:  # a transformers without this private helper: be safe
        return f"cannot tell the generation config's logits processors ({exc})"
    if len(processors):
        names = ", ".join(type(p).__name__ for p in processors)
        return f"the generation config adds logits processors ({names})"
    return None


def _core(model: Any) -> Any:
    """The transformers model under a PeftModel (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


@dataclass
class _Marginal:
    """A RAG-Token request's passages: its prior and its per-passage log-likelihoods so far."""

    prior: torch.Tensor  # [1, K'] log p(z|x) of the kept passages
    doc_index: torch.Tensor  # [1, K'] which of the request's passages each row reads
    n_docs: int  # K, the request's passages
    eos: int  # the one end token RAG-Token stops on
    doc_lp: torch.Tensor  # [K'] log p(y|x,z) of the tokens so far (greedy)
    beams: BeamGroup | None = None  # with num_beams > 1: its beam search (open beams x K' rows)


@dataclass
class _Hypotheses:
    """A RAG-Sequence request's passages, each decoding its own hypothesis."""

    log_prior: torch.Tensor  # [1, K] log p(z|x), -inf where pruned
    pairs: torch.Tensor  # [P] the kept passages (rag_sequence's flat b*K + k, b = 0)
    decoding: Decoding
    eos: int
    prompt_ids: torch.Tensor  # [P, L] the kept passages' prompts (encode_pairs), for scoring
    prompt_mask: torch.Tensor  # [P, L]
    open: list[int]  # the pairs still decoding, in batch-row order
    tokens: list[list[int]]  # [P] each pair's hypothesis so far
    logprob: torch.Tensor  # [P] log p(hypothesis so far | x, z)
    encoder_states: torch.Tensor | None = None  # [P, L, d] seq2seq "thorough": from the prefill
    # with num_beams > 1: each pair's beam search (its rows: its open beams), instead of tokens
    beams: list[BeamGroup] | None = None

    @property
    def rows(self) -> int:
        if self.beams is None:
            return len(self.open)
        return sum(self.beams[p].n for p in self.open)


@dataclass
class _Row:
    """One request: one batch row (concat), one row per kept passage (RAG-Token), or one per
    kept passage still decoding its hypothesis (RAG-Sequence)."""

    key: Hashable
    adapter: str | None  # PEFT name (None: the base, or the adapter merged into the weights)
    limit: int
    tokens: list[int] = field(default_factory=list)
    rag: _Marginal | None = None
    seq: _Hypotheses | None = None

    @property
    def n(self) -> int:
        if self.rag is not None:
            k = int(self.rag.prior.shape[1])
            return k * self.rag.beams.n if self.rag.beams is not None else k
        if self.seq is not None:
            return self.seq.rows
        return 1


@dataclass
class _State:
    """The running rows' tensors, row i of each for _Row i. Self-attention caches are padded
    on the left (the mask says which columns are real); encoder-side tensors on the right."""

    cache: Cache
    mask: torch.Tensor  # [B, T] self-attention mask (causal: prompt + answer; seq2seq: answer)
    last: torch.Tensor  # [B] the token each row feeds next
    enc_hidden: torch.Tensor | None = None  # [B, S, d] seq2seq encoder output
    enc_mask: torch.Tensor | None = None  # [B, S]

    def self_layers(self) -> list[DynamicLayer]:
        cache = self.cache
        if isinstance(cache, EncoderDecoderCache):
            cache = cache.self_attention_cache
        return _dynamic_layers(cache)

    def cross_layers(self) -> list[DynamicLayer]:
        if isinstance(self.cache, EncoderDecoderCache):
            return _dynamic_layers(self.cache.cross_attention_cache)
        return []


class _GrowingLayer(DynamicLayer):
    """A self-attention cache layer that appends each step's keys and values in place, into
    spare columns, where DynamicLayer concatenates the whole cache into a new tensor at every
    step (for 16 rows of SmolLM2 with ~700-token prompts that copy is ~0.5 GB a step). Attention
    reads a view of the filled columns. Joins and leaves rebuild it (adopt)."""

    SPARE = 64  # columns of room made at each (re)build; doubled when outgrown

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self._k = self._v = keys.new_empty(0)
        self._n = 0
        self.adopt(keys, values)

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, spare: int = SPARE) -> None:
        """Hold these keys and values [B, H, T, D], with room for `spare` more columns."""
        b, h, t, d = keys.shape
        self._k = keys.new_empty(b, h, t + spare, d)
        self._v = values.new_empty(b, h, t + spare, values.shape[-1])
        self._k[:, :, :t] = keys
        self._v[:, :, :t] = values
        self._n = t
        self.keys, self.values = self._k[:, :, :t], self._v[:, :, :t]
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = key_states.shape[-2]
        if self._n + n > self._k.shape[-2]:
            self.adopt(self._k[:, :, : self._n], self._v[:, :, : self._n], max(n, self._n))
        self._k[:, :, self._n : self._n + n] = key_states
        self._v[:, :, self._n : self._n + n] = value_states
        self._n += n
        self.keys, self.values = self._k[:, :, : self._n], self._v[:, :, : self._n]
        return self.keys, self.values


def _grow_in_place(state: _State) -> None:
    """Give state's self-attention cache layers in-place appends (_GrowingLayer)."""
    cache = state.cache
    if isinstance(cache, EncoderDecoderCache):
        cache = cache.self_attention_cache
    layers = getattr(cache, "layers", [])
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer:
            layers[i] = _GrowingLayer(*_kv(layer))


def _check_cache(state: _State) -> None:
    for layer in state.self_layers() + state.cross_layers():
        _kv(layer)


def _dynamic_layers(cache: Cache) -> list[DynamicLayer]:
    layers = list(getattr(cache, "layers", []))
    if not layers or any(type(layer) not in (DynamicLayer, _GrowingLayer) for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers})
        raise TypeError(f"step-level decoding needs plain DynamicLayer caches, got {kinds}")
    return layers


def _kv(layer: DynamicLayer) -> tuple[torch.Tensor, torch.Tensor]:
    keys, values = layer.keys, layer.values
    if keys is None or values is None:
        raise TypeError("a cache layer the prefill did not fill")
    return keys, values


def _set(layer: DynamicLayer, keys: torch.Tensor, values: torch.Tensor) -> None:
    if isinstance(layer, _GrowingLayer):
        layer.adopt(keys, values)
    else:
        layer.keys, layer.values = keys, values


def _merge_layer(a: DynamicLayer, b: DynamicLayer, size: int, *, left: bool) -> None:
    """Layer a's keys and values followed by b's (new rows), both padded to size columns."""
    (ak, av), (bk, bv) = _kv(a), _kv(b)
    _set(a, _cat_padded(ak, bk, size, left=left), _cat_padded(av, bv, size, left=left))


def _cat_padded(
    a: torch.Tensor, b: torch.Tensor, size: int, *, left: bool, dim: int = -2
) -> torch.Tensor:
    """a and b padded along dim to size, stacked along the batch dimension."""
    if a.dim() == 2:
        dim = -1
    return torch.cat([_pad_to(a, dim, size, left=left), _pad_to(b, dim, size, left=left)])


def _pad_to(t: torch.Tensor, dim: int, size: int, *, left: bool) -> torch.Tensor:
    """t zero-padded along dim (counted from the end, negative) to size."""
    gap = size - t.shape[dim]
    if gap == 0:
        return t
    pad = [0, 0] * (-dim - 1) + ([gap, 0] if left else [0, gap])
    return F.pad(t, pad)


class StepBatch:
    """The running batch on the model thread: concat rows, RAG requests as groups of rows.

        batch = StepBatch(generator)
        done = batch.join(rows, keys)   # prefill new rows; rows done at once come back
        while len(batch):
            done += batch.step()        # one token for every row; finished rows leave
        batch.drop({key})               # a row whose client left

    Adapters: row i runs under its PEFT adapter name, as in `Generator.generate_decoded`; the
    caller re-sets names with `rename` when the registry changes what a row's version is called
    (a merge or an unmerge). The generator's model is read at every call, since the registry
    may swap it (merged, unmerged) between two steps.
    """

    def __init__(
        self,
        generator: Generator,
        *,
        in_place_cache: bool = True,
        rag_token: bool = True,
        rag_sequence: bool = True,
        min_prior: float | None = None,
        num_beams: int = 1,
    ) -> None:
        why = step_support(generator)
        if why is not None:
            raise ValueError(f"step-level decoding is not supported: {why}")
        self.g = generator
        self.rag_token = rag_token  # take RAG-Token requests
        self.rag_sequence = rag_sequence  # take RAG-Sequence requests
        self.num_beams = num_beams  # the RAG modes' beam search, as RagDecoder's (1: greedy)
        self.min_prior = min_prior  # the RAG modes' prior pruning, as RagDecoder's
        self._in_place = in_place_cache  # False: transformers' concatenating layers (benchmarks)
        self._rows: list[_Row] = []
        self._state: _State | None = None
        self._plan: tuple[tuple[str | None, ...], Any, RowPlan] | None = None
        self._keep_logits = (
            "logits_to_keep" in inspect.signature(_core(generator._hf).forward).parameters
        )
        self._seq2seq = generator.kind == "seq2seq"
        self._shift_positions = (
            self._seq2seq and getattr(generator._hf.config, "model_type", "") in SHIFTED_POSITIONS
        )

    def __len__(self) -> int:
        """Running requests."""
        return len(self._rows)

    @property
    def width(self) -> int:
        """Running batch rows (a RAG request has one per kept passage and open beam)."""
        return sum(r.n for r in self._rows)

    def takes_mode(self, mode: str) -> bool:
        """Whether join() takes rows of this decoding mode (concat; the RAG modes when on)."""
        return (
            mode == "concat"
            or (mode == "token" and self.rag_token)
            or (mode == "sequence" and self.rag_sequence)
        )

    def rows_for(self, mode: str, passages: int) -> int:
        """Batch rows a request may take (the RAG modes: one per passage before pruning, times
        the beams)."""
        if mode == "concat":
            return 1
        return max(1, passages) * self.num_beams

    @property
    def keys(self) -> list[Hashable]:
        return [r.key for r in self._rows]

    def prompt_tokens(
        self, question: str, passages: Sequence[Passage], max_new_tokens: int, mode: str
    ) -> int:
        """The tokens join() would prefill for such a request: its prompt (concat), or its
        passages' prompts padded to the longest (the RAG modes; pruning not counted)."""
        g = self.g
        if mode == "concat":
            limit = g.max_input_tokens(max_new_tokens)
            return len(g._tokenize(g.prompt(question, passages, max_new_tokens), limit))
        if not passages:
            return 0
        enc = g.encode_pairs(question, passages, reserve=max_new_tokens)
        return int(enc["input_ids"].numel())

    def text_of(self, key: Hashable) -> str | None:
        """The answer so far of a running request, as its final answer will begin (concat and
        RAG-Token: greedy tokens are final once chosen); None for RAG-Sequence and beam search,
        whose answer is chosen at the end, and for a key not running."""
        for row in self._rows:
            if row.key == key:
                if row.seq is not None or (row.rag is not None and row.rag.beams is not None):
                    return None
                return self.g.decode_answer(torch.tensor(row.tokens)).text
        return None

    @property
    def adapters(self) -> list[str | None]:
        """The PEFT adapter name of every batch row."""
        return _row_names(self._rows)

    def rename(self, adapters: dict[Hashable, str | None]) -> None:
        """Set the PEFT adapter name of the rows named by key."""
        for row in self._rows:
            if row.key in adapters:
                row.adapter = adapters[row.key]

    def clear(self) -> list[Hashable]:
        """Drop every row (after a failed step); returns their keys."""
        keys = self.keys
        self._rows, self._state, self._plan = [], None, None
        return keys

    def drop(self, keys: AbstractSet[Hashable]) -> None:
        """Take the rows with these keys out (their clients left)."""
        keep = [i for i, r in enumerate(self._rows) if r.key not in keys]
        if len(keep) < len(self._rows):
            self._select(keep)

    def join(self, rows: Sequence[GenRow], keys: Sequence[Hashable]) -> list[Finished]:
        """Prefill rows (together) and add them to the batch. Each row's first token comes
        from the prefill; a row that is finished by it (an end token, or max_new_tokens 1) is
        returned and not added. Raises (and adds nothing) when the prefill fails, and
        ValueError for a row of a mode it does not take (takes_mode)."""
        if not rows:
            return []
        g = self.g
        ids: list[list[int]] = []
        joined: list[_Row] = []
        finished: list[Finished] = []
        for key, r in zip(keys, rows, strict=True):
            if not self.takes_mode(r.mode):
                raise ValueError(f"a {r.mode!r} row cannot decode step by step")
            if r.mode == "concat":
                limit = g.max_input_tokens(r.max_new_tokens)
                ids.append(g._tokenize(g.prompt(r.question, r.passages, r.max_new_tokens), limit))
                joined.append(_Row(key, r.adapter, r.max_new_tokens))
            elif not r.passages:  # as RagDecoder: nothing to marginalize over
                finished.append((key, Answer("", [], 0)))
            elif r.mode == "token":
                pairs, rag = self._pairs(r)
                ids += pairs
                joined.append(_Row(key, r.adapter, r.max_new_tokens, rag=rag))
            else:
                check_decoding(r.decoding)
                pairs, seq = self._hypotheses(r)
                ids += pairs
                joined.append(_Row(key, r.adapter, r.max_new_tokens, seq=seq))
        if not joined:
            return finished
        ctx, extra = self._adapters(_row_names(joined), keep=False)
        enc = g._pad(ids)
        with torch.inference_mode(), ctx:
            if self._seq2seq:
                state, logits = self._prefill_seq2seq(enc, extra)
            else:
                state, logits = self._prefill_causal(enc, extra)
        _check_cache(state)  # refuse caches we cannot pad, before merging
        self._keep_encoder_states(joined, state)
        if self._in_place:
            _grow_in_place(state)
        done, keep, nxt = self._advance(joined, state, logits)
        keys_done = {k for k, _ in done}
        alive = [r for r in joined if r.key not in keys_done]
        if alive:
            if keep != list(range(state.mask.shape[0])):
                state = _select_state(state, keep)
            state.last = torch.tensor(nxt, dtype=torch.long, device=state.mask.device)
            self._merge(alive, state)
        return finished + done

    def step(self) -> list[Finished]:
        """One decoding step for every row; returns the rows that finished (they leave)."""
        state = self._state
        if state is None:
            return []
        ctx, extra = self._adapters(self.adapters, keep=True)
        with torch.inference_mode(), ctx:
            if self._seq2seq:
                logits = self._decode_seq2seq(state, extra)
            else:
                logits = self._decode_causal(state, extra)
        finished, keep, nxt = self._advance(self._rows, state, logits)
        if finished:
            done = {k for k, _ in finished}
            self._rows = [r for r in self._rows if r.key not in done]
        if not keep:
            self._state = None
            return finished
        if len(keep) == state.mask.shape[0]:  # no row left: at most beams were reordered
            with torch.inference_mode():  # the cache is made of inference tensors
                _reorder_beams(state, keep)
        else:
            state = self._state = _select_state(state, keep)
        state.last = torch.tensor(nxt, dtype=torch.long, device=state.mask.device)
        return finished

    def _hypotheses(self, row: GenRow) -> tuple[list[list[int]], _Hypotheses]:
        """A RAG-Sequence request's prompts, one per kept passage (as RagDecoder encodes them)."""
        g = self.g
        enc, log_prior = self._passage_prompts(row)
        log_prior = log_prior.to(g.device)
        pairs = torch.isfinite(log_prior).reshape(-1).nonzero().squeeze(-1)  # as rag_sequence
        ids, mask = enc["input_ids"], enc["attention_mask"]
        kept_ids, kept_mask = ids.index_select(0, pairs), mask.index_select(0, pairs)
        prompts = [
            r[m.bool()].tolist() for r, m in zip(kept_ids.cpu(), kept_mask.cpu(), strict=True)
        ]
        n = len(prompts)
        seq = _Hypotheses(
            log_prior,
            pairs,
            row.decoding,
            rag_eos_id(g),
            kept_ids,
            kept_mask,
            list(range(n)),
            [[] for _ in range(n)],
            torch.zeros(n, device=g.device),
        )
        if self.num_beams > 1:
            pad = g.tokenizer.pad_token_id
            seq.beams = [
                BeamGroup(1, self.num_beams, seq.eos, pad, 1.0, g.device) for _ in range(n)
            ]
        return prompts, seq

    def _keep_encoder_states(self, rows: Sequence[_Row], state: _State) -> None:
        """Keep each seq2seq "thorough" RAG-Sequence request's encoder states for its scoring
        pass (the prefill's, cut to the request's own prompt width)."""
        at = 0
        for row in rows:
            seq = row.seq
            if seq is not None and seq.decoding == "thorough" and self._seq2seq:
                assert state.enc_hidden is not None
                width = seq.prompt_mask.shape[1]
                seq.encoder_states = state.enc_hidden[at : at + row.n, :width].clone()
            at += row.n

    def _scorer(self, row: _Row, seq: _Hypotheses) -> Runner | None:
        """What scores a "thorough" request's hypotheses under its passages, with the row's
        adapter as it is named now (a merge between two steps renames it) and PEFT's
        adapter_names, as RagDecoder scores."""
        if seq.decoding != "thorough":
            return None
        g = self.g
        kwargs = g.adapter_kwargs([row.adapter] * len(seq.tokens))
        pad = g.tokenizer.pad_token_id
        if not self._seq2seq:
            return CausalRunner(g.model, seq.prompt_ids, seq.prompt_mask, pad, kwargs)
        start = int(g._hf.config.decoder_start_token_id)
        runner = Seq2SeqRunner(g.model, seq.prompt_ids, seq.prompt_mask, start, pad, kwargs)
        runner.encoder_states = seq.encoder_states
        return runner

    def _passage_prompts(self, row: GenRow) -> tuple[Any, torch.Tensor]:
        """A RAG request's (question, passage) prompts, encoded as RagDecoder encodes them, and
        its log prior [1, K] (-inf where min_prior prunes)."""
        enc = self.g.encode_pairs(row.question, row.passages, reserve=row.max_new_tokens)
        scores = torch.tensor([list(row.scores)], dtype=torch.float32)  # [1, K]
        return enc, doc_prior(scores, self.min_prior)

    def _pairs(self, row: GenRow) -> tuple[list[list[int]], _Marginal]:
        """A RAG-Token request's prompts, one per kept passage (as RagDecoder encodes them)."""
        g = self.g
        enc, log_prior = self._passage_prompts(row)
        doc_index, prior = kept_docs(log_prior)  # [1, K']
        ids = enc["input_ids"].cpu()
        mask = enc["attention_mask"].cpu().bool()
        pairs = [ids[j][mask[j]].tolist() for j in doc_index[0].tolist()]
        rag = _Marginal(
            prior.to(g.device),
            doc_index,
            len(row.passages),
            rag_eos_id(g),
            torch.zeros(prior.shape[1], device=g.device),
        )
        if self.num_beams > 1:
            pad = g.tokenizer.pad_token_id
            rag.beams = BeamGroup(prior.shape[1], self.num_beams, rag.eos, pad, 1.0, g.device)
        return pairs, rag

    # ---- model calls ----------------------------------------------------------------------

    def _prefill_causal(self, enc: Any, extra: dict[str, Any]) -> tuple[_State, torch.Tensor]:
        mask = enc["attention_mask"]  # [J, L], left padded
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # as generate() derives them
        if self._keep_logits:
            extra = {**extra, "logits_to_keep": 1}
        out = self.g._hf(
            input_ids=enc["input_ids"],
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **extra,
        )
        return _State(out.past_key_values, mask.long(), mask.new_zeros(0)), out.logits[:, -1]

    def _decode_causal(self, state: _State, extra: dict[str, Any]) -> torch.Tensor:
        positions = state.mask.sum(1, keepdim=True)  # [B, 1] the row's real tokens so far
        state.mask = F.pad(state.mask, (0, 1), value=1)
        out = self.g._hf(
            input_ids=state.last[:, None],
            attention_mask=state.mask,
            position_ids=positions,
            past_key_values=state.cache,
            use_cache=True,
            **extra,
        )
        logits: torch.Tensor = out.logits[:, -1]
        return logits

    def _prefill_seq2seq(self, enc: Any, extra: dict[str, Any]) -> tuple[_State, torch.Tensor]:
        model = self.g._hf
        n = enc["input_ids"].shape[0]
        start = _decoder_start(model)
        out = model(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            decoder_input_ids=torch.full((n, 1), start, dtype=torch.long, device=self.g.device),
            use_cache=True,
            **extra,
        )
        state = _State(
            out.past_key_values,
            torch.ones(n, 1, dtype=torch.long, device=self.g.device),
            torch.zeros(0, dtype=torch.long),
            out.encoder_last_hidden_state,
            enc["attention_mask"].long(),
        )
        return state, out.logits[:, -1]

    def _decode_seq2seq(self, state: _State, extra: dict[str, Any]) -> torch.Tensor:
        assert state.enc_hidden is not None
        width = state.mask.shape[1]
        shift = width - state.mask.sum(1)  # [B] left padding of each row's decoder cache
        state.mask = F.pad(state.mask, (0, 1), value=1)
        positions = _bart_positions(self.g._hf, shift) if self._shift_positions else nullcontext()
        with positions:
            out = self.g._hf(
                encoder_outputs=BaseModelOutput(last_hidden_state=state.enc_hidden),
                attention_mask=state.enc_mask,
                decoder_input_ids=state.last[:, None],
                decoder_attention_mask=state.mask,
                past_key_values=state.cache,
                use_cache=True,
                **extra,
            )
        logits: torch.Tensor = out.logits[:, -1]
        return logits

    # ---- bookkeeping ------------------------------------------------------------------------

    def _adapters(
        self, names: Sequence[str | None], *, keep: bool
    ) -> tuple[AbstractContextManager[None], dict[str, Any]]:
        """The context and kwargs that give row i adapter names[i], as generate_decoded does:
        the stacked per-row LoRA when attached (its plan kept across steps while the rows and
        the stacks stay the same), else PEFT's adapter_names."""
        g = self.g
        extra = g.adapter_kwargs(names)
        batched = g.batched
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

    def _advance(
        self, rows: Sequence[_Row], state: _State, logits: torch.Tensor
    ) -> tuple[list[Finished], list[int], list[int]]:
        """Append each request's next token; the requests that end here, with their answers;
        the batch rows that go on decoding (a row may appear twice: a beam continued by two
        beams), and the token each of them feeds next.

        logits [rows' width, V]: a concat request's row gives its token (argmax, as generate()'s
        greedy search); a RAG-Token request's rows give one token for all of them (argmax of
        the marginal, as rag_search.greedy_search); a RAG-Sequence request's rows each give
        their own (argmax of the log-probs, the same search with one passage per group); a
        RAG-Token request with beams takes a beam-search step (rag_search.BeamGroup)."""
        chosen = logits.float().argmax(-1)  # [B]
        picks = chosen.tolist()
        eos = self.g.eos_ids
        finished: list[Finished] = []
        keep: list[int] = []
        nxt: list[int] = []
        at = 0
        for row in rows:
            n = row.n
            rag, seq = row.rag, row.seq
            if seq is not None:
                going, tokens = self._advance_hypotheses(row, seq, logits[at : at + n])
                if seq.open:
                    keep += [at + i for i in going]
                    nxt += tokens
                else:
                    finished.append((row.key, self._rank(row, seq)))
                at += n
                continue
            if rag is not None and rag.beams is not None:
                group, k = rag.beams, rag.prior.shape[1]
                lp = torch.log_softmax(logits[at : at + n].float(), dim=-1).view(group.n, k, -1)
                beams = group.advance(rag.prior[0], lp)
                if group.closed or group.t >= row.limit:
                    finished.append((row.key, self._beam_answer(row, rag, group)))
                else:
                    for beam, tok in beams:
                        keep += range(at + beam * k, at + beam * k + k)
                        nxt += [tok] * k
                at += n
                continue
            if rag is None:
                token = picks[at]
                ended = token in eos
            else:
                lp = torch.log_softmax(logits[at : at + n].float(), dim=-1)  # [K', V]
                token = int(marginal(rag.prior, lp[None, None])[0, 0].argmax())
                rag.doc_lp += lp[:, token]
                chosen[at : at + n] = token
                ended = token == rag.eos
            row.tokens.append(token)
            if ended or len(row.tokens) >= row.limit:
                if rag is None:
                    decoded = self.g.decode_answer(torch.tensor(row.tokens))
                    finished.append((row.key, Answer(decoded.text, None, decoded.tokens)))
                else:
                    finished.append((row.key, _rag_answer(self.g, row, rag)))
            else:
                keep += range(at, at + n)
                nxt += [token] * n
            at += n
        return finished, keep, nxt

    def _beam_answer(self, row: _Row, rag: _Marginal, group: BeamGroup) -> Answer:
        """A RAG-Token beam search's answer, as rag_token._decode makes it."""
        g = self.g
        hyps = pack([group.finish()], 1, g.tokenizer.pad_token_id, rag.prior.device)
        doc_lp = hyps.doc_logprob[:, 0].masked_fill(~torch.isfinite(rag.prior), float("-inf"))
        posterior = doc_posterior(rag.prior, doc_lp)  # [1, K']
        weights = expand_to_docs(posterior, rag.doc_index.to(posterior.device), rag.n_docs, 0.0)
        decoded = g.decode_answer(hyps.sequences[0, 0, : row.limit])
        return Answer(decoded.text, weights[0].tolist(), decoded.tokens)

    def _advance_hypotheses(
        self, row: _Row, seq: _Hypotheses, logits: torch.Tensor
    ) -> tuple[list[int], list[int]]:
        """One step of each open pair of a RAG-Sequence request: the rows (among its rows) that
        go on and their next tokens. A pair whose hypothesis ended (greedy), or whose beam
        search did, closes: its rows leave."""
        lp = torch.log_softmax(logits.float(), dim=-1)  # [rows, V]
        going: list[int] = []
        tokens: list[int] = []
        still: list[int] = []
        if seq.beams is not None:
            at = 0
            for pair in seq.open:
                group = seq.beams[pair]
                m = group.n
                beams = group.advance(seq.log_prior.new_zeros(1), lp[at : at + m, None])
                if not group.closed and group.t < row.limit:
                    still.append(pair)
                    going += [at + beam for beam, _ in beams]
                    tokens += [tok for _, tok in beams]
                at += m
            seq.open = still
            return going, tokens
        for i, pair in enumerate(seq.open):
            token = int(lp[i].argmax())
            seq.tokens[pair].append(token)
            seq.logprob[pair] += lp[i, token]
            if token != seq.eos and len(seq.tokens[pair]) < row.limit:
                going.append(i)
                tokens.append(token)
                still.append(pair)
        seq.open = still
        return going, tokens

    def _rank(self, row: _Row, seq: _Hypotheses) -> Answer:
        """A RAG-Sequence request's answer: its hypotheses marginalized (rag_sequence.rank)."""
        g = self.g
        pad = g.tokenizer.pad_token_id
        if seq.beams is not None:  # every pair's num_beams best, as rag_sequence searches
            hyps = pack([b.finish() for b in seq.beams], self.num_beams, pad, g.device)
        else:
            n = len(seq.tokens)
            width = max(len(t) for t in seq.tokens)
            seqs = torch.full((n, 1, width), pad, dtype=torch.long, device=g.device)
            for i, t in enumerate(seq.tokens):
                seqs[i, 0, : len(t)] = torch.tensor(t, device=g.device)
            lengths = torch.tensor([[len(t)] for t in seq.tokens], device=g.device)
            logprob = seq.logprob[:, None]
            hyps = Hypotheses(seqs, lengths, logprob, logprob[:, :, None], logprob / lengths)
        with torch.inference_mode():
            out = rank(
                self._scorer(row, seq),
                seq.log_prior,
                seq.pairs,
                hyps,
                decoding=seq.decoding,
                pad_token_id=pad,
            )
        decoded = g.decode_answer(out.sequences[0, : row.limit])
        return Answer(decoded.text, out.doc_posterior[0].tolist(), decoded.tokens)

    def _merge(self, rows: list[_Row], new: _State) -> None:
        old = self._state
        self._rows += rows
        if old is None:
            self._state = new
            return
        width = max(old.mask.shape[1], new.mask.shape[1])
        for a, b in zip(old.self_layers(), new.self_layers(), strict=True):
            _merge_layer(a, b, width, left=True)
        old.mask = _cat_padded(old.mask, new.mask, width, left=True)
        old.last = torch.cat([old.last, new.last])
        if old.enc_hidden is not None and new.enc_hidden is not None:
            assert old.enc_mask is not None and new.enc_mask is not None
            span = max(old.enc_mask.shape[1], new.enc_mask.shape[1])
            for a, b in zip(old.cross_layers(), new.cross_layers(), strict=True):
                _merge_layer(a, b, span, left=False)
            old.enc_hidden = _cat_padded(old.enc_hidden, new.enc_hidden, span, left=False, dim=-2)
            old.enc_mask = _cat_padded(old.enc_mask, new.enc_mask, span, left=False)

    def _select(self, keep: list[int]) -> None:
        """Keep the requests at these indices (and their batch rows)."""
        spans = _spans(self._rows, keep)
        self._rows = [self._rows[i] for i in keep]
        if not keep or self._state is None:
            self._state = None
            return
        self._state = _select_state(self._state, spans)


def _row_names(rows: Sequence[_Row]) -> list[str | None]:
    """The adapter of every batch row of these requests."""
    return [r.adapter for r in rows for _ in range(r.n)]


def _spans(rows: Sequence[_Row], keep: Sequence[int]) -> list[int]:
    """The batch rows of the requests rows[i], i in keep."""
    starts = [0]
    for r in rows:
        starts.append(starts[-1] + r.n)
    return [j for i in keep for j in range(starts[i], starts[i + 1])]


def _rag_answer(g: Generator, row: _Row, rag: _Marginal) -> Answer:
    """A RAG-Token request's answer, with p(z|x,y) over its passages (0 where pruned)."""
    posterior = doc_posterior(rag.prior, rag.doc_lp[None])  # [1, K']
    weights = expand_to_docs(posterior, rag.doc_index.to(posterior.device), rag.n_docs, 0.0)
    decoded = g.decode_answer(torch.tensor(row.tokens))
    return Answer(decoded.text, weights[0].tolist(), decoded.tokens)


def _reorder_beams(state: _State, keep: list[int]) -> None:
    """Row i of state becomes a copy of row keep[i], in place, for the rows that change: a
    beam-search step, whose new beams continue beams of the same request and passage, so the
    encoder side (cross-attention, encoder states) is the same for both rows and stays."""
    moved = [(i, j) for i, j in enumerate(keep) if i != j]
    if not moved:
        return
    dst = torch.tensor([i for i, _ in moved], dtype=torch.long, device=state.mask.device)
    src = torch.tensor([j for _, j in moved], dtype=torch.long, device=state.mask.device)
    state.mask[dst] = state.mask[src]
    for layer in state.self_layers():
        if isinstance(layer, _GrowingLayer):  # the whole buffer, spare columns included
            layer._k[dst] = layer._k[src]
            layer._v[dst] = layer._v[src]
        else:
            keys, values = _kv(layer)
            keys[dst] = keys[src]
            values[dst] = values[src]


def _select_state(state: _State, keep: list[int]) -> _State:
    """Rows `keep` of state (in place), with the padding columns no row needs any more cut."""
    idx = torch.tensor(keep, dtype=torch.long, device=state.mask.device)
    mask = state.mask.index_select(0, idx)
    real = mask.any(0)
    first = int(real.nonzero()[0]) if bool(real.any()) else 0  # leading columns all padding
    state.mask = mask[:, first:]
    for layer in state.self_layers():
        _set(layer, *(t.index_select(0, idx)[:, :, first:] for t in _kv(layer)))
    if state.last.numel():  # (a fresh prefill's state has no next tokens yet)
        state.last = state.last.index_select(0, idx)
    if state.enc_hidden is not None and state.enc_mask is not None:
        enc_mask = state.enc_mask.index_select(0, idx)
        used = enc_mask.any(0)
        end = int(used.nonzero()[-1]) + 1 if bool(used.any()) else enc_mask.shape[1]
        state.enc_mask = enc_mask[:, :end]
        state.enc_hidden = state.enc_hidden.index_select(0, idx)[:, :end]
        for layer in state.cross_layers():
            _set(layer, *(t.index_select(0, idx)[:, :, :end] for t in _kv(layer)))
    return state


def _decoder_start(model: Any) -> int:
    start = getattr(model.generation_config, "decoder_start_token_id", None)
    if start is None:
        start = model.config.decoder_start_token_id
    return int(start)


@contextmanager
def _bart_positions(model: Any, shift: torch.Tensor) -> Iterator[None]:
    """BART's decoder position embedding for one step, with row i's positions moved back by
    shift[i] (its left padding): BartDecoder numbers the new token by the cache length, which
    is the batch's, not the row's."""
    emb = model.get_decoder().embed_positions
    offset = emb.offset

    def forward(
        input_ids: torch.Tensor,
        past_key_values_length: int = 0,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if position_ids is None:
            seq = input_ids.shape[1]
            position_ids = torch.arange(
                past_key_values_length, past_key_values_length + seq, device=emb.weight.device
            )
        rows = position_ids.view(1, -1) - shift.view(-1, 1).to(position_ids.device)  # [B, seq]
        out: torch.Tensor = torch.nn.Embedding.forward(emb, rows + offset)
        return out

    emb.forward = forward
    try:
        yield
    finally:
        del emb.forward
