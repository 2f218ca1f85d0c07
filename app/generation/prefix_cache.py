"""Prompt reuse across requests in the step batch: prompt-prefix KV blocks (decoder-only
rows) and whole inputs' encoder outputs (encoder-decoder rows).

RAG prompts are long and answers short, and on a CPU prefill is compute-bound, so batching
cannot share it; not computing the same tokens twice can. lorag lays its prompts out so that
what repeats comes first: the system prompt, then (in a RAG-Token or RAG-Sequence row) the one
passage, then the question. A row whose prompt starts with blocks another row already
prefilled under the same weights takes their keys and values and prefills only the rest.

Block-granular, like vLLM's automatic prefix caching, not a radix tree like SGLang's: blocks of
`BLOCK` tokens keyed by the adapter version the row runs under (its PEFT name, which the registry
never gives other weights) and every token up to the block's end
(exact: a tuple of ids, no hash collisions), so a lookup walks a prompt's blocks from the start
until the first miss. A block is a unit of eviction too: least recently used first, within a
byte budget. Blocks are cheaper to reason about than a tree (no splits), and at 16 tokens the
few tokens a block boundary leaves uncached are a small share of a ~500-token RAG prompt.

Exact reuse only: a cached block holds the keys and values that a causal model computed for
exactly those tokens at exactly those positions, which is what it would compute again (a
token attends only to tokens before it). A block never serves under weights other than the
ones it was computed with: a swapped or unloaded adapter's version is never asked for again (its
blocks age out), and the batch drops every entry when the base weights change (a merge or an
unmerge: `clear`, StepBatch._live_cache). An adapter installed beside others leaves their
entries, and the base's, serving.

Rows that arrive together and share a prefix that is not cached yet (a popular question asked
by several clients at once, a passage that several joiners retrieved) would each compute it in
the one prefill of their join; `shared_blocks` finds them, and the step batch prefills such
followers in a second call after their leaders' blocks are stored (`StepBatch.join_requests`).

Across adapters: a LoRA adapter that changes only the upper layers of a model (the shipped ones
train the last 12 of SmolLM2's 30, `layers_to_transform`) leaves every layer below the first one
it changes computing what the base model computes. While every installed adapter leaves the
first `split` layers alone, a block is kept in two parts: those layers' keys and values with the
hidden state that enters layer `split` (keyed by the tokens alone: any adapter's rows, and the
base's, computed the same numbers), and the upper layers' keys and values (keyed by the adapter
too). A row whose prompt another adapter's row prefilled before takes the shared part and runs
only the upper layers on the kept hidden states (`climb`, the step batch's `_climb`), exactly:
the same layers on the same inputs. For the shipped SmolLM2 adapters that leaves 12 of 30 layers
to compute wherever another adapter's rows held the prompt (bench/RESULTS.md, "Prefix blocks
shared across adapters"). `split` is 0 (one part, keyed by the adapter) when no
adapter is installed, when one changes the first layer or the embeddings, or when the model
cannot start a forward partway (StepBatch._split).

Encoder-decoder rows reuse what repeats for them: an identical input's encoder output. The
encoder reads its input bidirectionally, so no prefix of it has states of its own; a row whose
exact input ids were encoded before under the same adapter takes the stored encoder output
[S, d] and skips its encoder pass (`encoded`, `keep_encoded`). Entries are keyed, cleared,
budgeted and evicted with the blocks, in the same LRU order. Not the cross-attention keys and
values the decoder's first step projects from that output: per input they take 2 x decoder
layers times the bytes of the output (24x for T5-base), for 15 % of the encoder's FLOPs
(bench/RESULTS.md, "Encoder-decoder reuse").

Threads: the model thread only.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

BLOCK = 16  # tokens per cached block

Key = tuple[str | None, tuple[int, ...]]  # (adapter the row runs under, tokens up to the end)
# ("encoder", adapter, the whole input), or ("shared", None, tokens up to the end): a block's
# layers below the split, which every adapter computes alike
InputKey = tuple[str, str | None, tuple[int, ...]]
Blocks = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys [H, n, D], values [H, n, D])


@dataclass(slots=True)
class Shared:
    """A block's layers below the split and the hidden state entering the split layer."""

    layers: Blocks  # layers [0, split)
    hidden: torch.Tensor  # [BLOCK, d]


Entry = Blocks | torch.Tensor | Shared


@dataclass(slots=True)
class Climb:
    """What a row can take from the cache when the shared part reaches further than its own
    adapter's: the upper layers are to be computed for tokens [full, shared)."""

    full: int  # leading tokens cached in every layer (a multiple of BLOCK)
    shared: int  # leading tokens cached below the split (>= full)
    lower: Blocks  # layers [0, split) for tokens [0, shared): [H, shared, D] each
    upper: Blocks  # layers [split, L) for tokens [0, full): [H, full, D] each
    hidden: torch.Tensor  # [shared - full, d] what enters layer split, tokens [full, shared)


@dataclass(slots=True)
class PrefixStats:
    looked_up: int = 0  # prompt tokens of rows that looked
    # of those, tokens whose keys and values came from the cache: a climbed token (its layers
    # below the split from the cache, the rest computed) counts split / layers of one
    reused: int = 0
    climbed: int = 0  # tokens whose upper layers were computed from kept hidden states
    evictions: int = 0  # blocks (and encoder outputs) dropped for the budget
    clears: int = 0  # times the weights changed and every block went


class PrefixCache:
    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.bytes = 0
        self.split = 0  # layers [0, split) kept once for every adapter; 0: blocks are whole
        self.layers = 0  # the model's decoder layers, where split > 0
        # tokens a climb must reach past a row's whole blocks to be worth a model call of its
        # own (the step batch sets it from what a call costs)
        self.least_climb = 0
        self.stats = PrefixStats()
        # a block's key -> per layer (keys [H, BLOCK, D], values [H, BLOCK, D]) from split on,
        # its shared key -> Shared, an input's key -> its encoder output [S, d]; least recently
        # used first
        self._blocks: OrderedDict[Key | InputKey, Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def clear(self, split: int = 0, layers: int = 0) -> None:
        """Forget every block and encoder output (the model's weights changed); from now on
        the first `split` of the model's `layers` layers are kept once for every adapter (0:
        blocks are kept whole, per adapter)."""
        self.split, self.layers = (split, layers) if 0 < split < layers else (0, 0)
        if self._blocks:
            self._blocks.clear()
            self.bytes = 0
            self.stats.clears += 1

    def lookup(
        self, adapter: str | None, prompt: Sequence[int]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The cached keys and values of prompt's longest prefix cached in every layer under
        adapter, per layer ([H, n, D] each, n a multiple of BLOCK, at most len(prompt) - 1:
        the last token is always prefilled, for the next token's logits); [] when none is."""
        self.stats.looked_up += len(prompt)
        run = self._run(adapter, prompt)
        n = _full(run)
        if not n:
            return []
        self._touch(adapter, run[:n])
        self.stats.reused += BLOCK * n
        own = _cat([block for _, block, _ in run[:n] if block is not None])
        if not self.split:
            return own
        return _cat([shared.layers for _, _, shared in run[:n] if shared is not None]) + own

    def climb(self, adapter: str | None, prompt: Sequence[int]) -> Climb | None:
        """Where the shared parts of prompt's blocks reach further than adapter's own: what
        the upper layers of those blocks are computed from; else None (no stats counted: the
        lookup after the climb counts what the row reuses)."""
        if not self.split:
            return None
        run = self._run(adapter, prompt)
        n = _full(run)
        if not self._climbable(run):
            return None
        self._touch(adapter, run)
        shared = [s for _, _, s in run if s is not None]
        return Climb(
            full=BLOCK * n,
            shared=BLOCK * len(run),
            lower=_cat([s.layers for s in shared]),
            upper=_cat([block for _, block, _ in run[:n] if block is not None]),
            hidden=torch.cat([s.hidden for s in shared[n:]]),
        )

    def covered(self, adapter: str | None, prompt: Sequence[int]) -> int:
        """How many leading tokens of prompt a prefill would not compute now (no stats, no
        LRU): those cached in every layer, and split / layers of each token that a climb
        would reach."""
        full, below = self.reach(adapter, prompt)
        return self.covers(full, below)

    def reach(self, adapter: str | None, prompt: Sequence[int]) -> tuple[int, int]:
        """(whole, below): how many leading tokens of prompt are cached in every layer under
        adapter, and below the split (whole, where blocks are not split). No stats, no LRU."""
        run = self._run(adapter, prompt)
        return BLOCK * _full(run), BLOCK * len(run)

    def covers(self, whole: int, below: int) -> int:
        """The tokens a prefill would not compute where `whole` leading tokens are cached in
        every layer and `below` below the split: the whole ones, and split / layers of those a
        climb would reach."""
        return whole + self.climb_worth(below - whole) * self.split // max(1, self.layers)

    def climb_worth(self, tokens: int) -> int:
        """tokens, where a climb over that many is worth its model call; else 0."""
        return tokens if self.split and tokens >= max(1, self.least_climb) else 0

    def missing(self, adapter: str | None, prompt: Sequence[int]) -> bool:
        """Whether some full block of prompt is not cached (store() would add it)."""
        if self.budget <= 0:
            return False
        return any(
            (adapter, tokens) not in self._blocks
            or (self.split and ("shared", None, tokens) not in self._blocks)
            for tokens in _prefixes(prompt)
        )

    def store(
        self,
        adapter: str | None,
        prompt: Sequence[int],
        layers: Sequence[tuple[torch.Tensor, torch.Tensor]],
        hidden: torch.Tensor | None = None,
        start: int = 0,
    ) -> None:
        """Keep the full blocks of prompt, given its keys and values per layer ([H, L, D],
        column t for prompt token t) and, where the blocks are split, the hidden states
        entering layer split of its tokens [start, L) ([L - start, d]; a shared part needs
        them, so one that starts before `start` is not kept)."""
        if self.budget <= 0:
            return
        for tokens in _prefixes(prompt):
            end = len(tokens)
            if self.split:
                key: Key | InputKey = ("shared", None, tokens)
                if key in self._blocks:
                    self._blocks.move_to_end(key)
                elif hidden is not None and end - BLOCK >= start:
                    part = Shared(
                        _cut(layers[: self.split], end),
                        hidden[end - BLOCK - start : end - start].clone(),
                    )
                    if not self._add(key, part):
                        return
            if not self._keep_own(adapter, tokens, layers[self.split :]):
                return

    def store_upper(
        self,
        adapter: str | None,
        prompt: Sequence[int],
        upper: Sequence[tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        """Keep the upper layers' parts of prompt's full blocks under adapter, given those
        layers' keys and values ([H, L, D] per layer from split on): what a climb computed."""
        if self.budget <= 0:
            return
        for tokens in _prefixes(prompt):
            if not self._keep_own(adapter, tokens, upper):
                return

    def encoded(self, adapter: str | None, ids: Sequence[int]) -> torch.Tensor | None:
        """The encoder output [S, d] of exactly input ids under adapter, or None; counted
        as the blocks are (its S tokens looked up, and reused when found)."""
        self.stats.looked_up += len(ids)
        key = ("encoder", adapter, tuple(ids))
        hidden = self._blocks.get(key)
        if not isinstance(hidden, torch.Tensor):
            return None
        self._blocks.move_to_end(key)
        self.stats.reused += len(ids)
        return hidden

    def keep_encoded(self, adapter: str | None, ids: Sequence[int], hidden: torch.Tensor) -> None:
        """Keep input ids' encoder output hidden [S, d] (S = len(ids)) under adapter."""
        key = ("encoder", adapter, tuple(ids))
        if self.budget > 0 and key not in self._blocks:
            self._add(key, hidden.clone())

    def _run(self, adapter: str | None, prompt: Sequence[int]) -> list[Run]:
        """Prompt's leading blocks that are cached (below the split, where blocks are split;
        else whole under adapter), each with its tokens, adapter's part (or None) and its
        shared part (None where blocks are whole)."""
        out: list[Run] = []
        for tokens in _prefixes(prompt):
            own = self._blocks.get((adapter, tokens))
            block = own if isinstance(own, list) else None
            shared = None
            if self.split:
                found = self._blocks.get(("shared", None, tokens))
                shared = found if isinstance(found, Shared) else None
            if (shared if self.split else block) is None:
                break
            out.append((tokens, block, shared))
        return out

    def _climbable(self, run: Sequence[Run]) -> int:
        """Tokens of a run that a climb would compute the upper layers of: those cached below
        the split past the row's whole blocks, where they are worth a model call (else 0)."""
        return self.climb_worth(BLOCK * (len(run) - _full(run)))

    def _touch(self, adapter: str | None, run: Sequence[Run]) -> None:
        """Mark a run's parts used now (least recently used go first)."""
        for tokens, block, shared in run:
            if block is not None:
                self._blocks.move_to_end((adapter, tokens))
            if shared is not None:
                self._blocks.move_to_end(("shared", None, tokens))

    def _keep_own(
        self,
        adapter: str | None,
        tokens: tuple[int, ...],
        layers: Sequence[tuple[torch.Tensor, torch.Tensor]],
    ) -> bool:
        """Keep the block ending at tokens' end under adapter (these layers' columns); False
        when it did not fit the budget."""
        key = (adapter, tokens)
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return True
        return self._add(key, _cut(layers, len(tokens)))

    def _add(self, key: Key | InputKey, entry: Entry) -> bool:
        """Hold entry, evicting the least recently used for the budget; False (and nothing
        held) when it alone is larger than the budget."""
        size = _nbytes(entry)
        if size > self.budget:
            return False
        self._blocks[key] = entry
        self.bytes += size
        while self.bytes > self.budget:
            _, old = self._blocks.popitem(last=False)
            self.bytes -= _nbytes(old)
            self.stats.evictions += 1
        return True


Run = tuple[tuple[int, ...], Blocks | None, Shared | None]


def _prefixes(prompt: Sequence[int]) -> Iterator[tuple[int, ...]]:
    """The tokens up to each full block's end, the last token never in one."""
    for end in range(BLOCK, len(prompt), BLOCK):
        yield tuple(prompt[:end])


def _full(run: Sequence[Run]) -> int:
    """How many leading blocks of a run hold adapter's own part too."""
    return next((i for i, (_, block, _) in enumerate(run) if block is None), len(run))


def _cat(blocks: Sequence[Blocks]) -> Blocks:
    """Consecutive blocks as one span per layer."""
    if not blocks:
        return []
    return [
        (torch.cat([b[i][0] for b in blocks], dim=1), torch.cat([b[i][1] for b in blocks], dim=1))
        for i in range(len(blocks[0]))
    ]


def _cut(layers: Sequence[tuple[torch.Tensor, torch.Tensor]], end: int) -> Blocks:
    """The block ending at column end, copied out of every layer."""
    return [(k[:, end - BLOCK : end].clone(), v[:, end - BLOCK : end].clone()) for k, v in layers]


def _nbytes(entry: Entry) -> int:
    if isinstance(entry, torch.Tensor):
        return entry.nbytes
    if isinstance(entry, Shared):
        return entry.hidden.nbytes + _nbytes(entry.layers)
    return sum(k.nbytes + v.nbytes for k, v in entry)


def shared_blocks(adapters: Sequence[str | None], prompts: Sequence[Sequence[int]]) -> list[int]:
    """For each prompt, how many leading tokens (whole blocks, short of its last token) an
    earlier prompt in the list under the same adapter also starts with. One pass over each
    prompt: a block is named by a chained hash of the blocks up to it (a collision can only
    make a split less useful, never an answer wrong: reuse itself goes by exact keys)."""
    seen: set[int] = set()
    out: list[int] = []
    for adapter, prompt in zip(adapters, prompts, strict=True):
        chain = hash(adapter)
        names = []
        for end in range(BLOCK, len(prompt), BLOCK):
            chain = hash((chain, tuple(prompt[end - BLOCK : end])))
            names.append(chain)
        n = 0
        for i, name in enumerate(names):
            if name not in seen:
                break
            n = (i + 1) * BLOCK
        out.append(n)
        seen.update(names)
    return out
