"""Prompt reuse across requests in the step batch: prompt-prefix KV blocks (decoder-only
rows) and whole inputs' encoder outputs (encoder-decoder rows).

RAG prompts are long and answers short, and on a CPU prefill is compute-bound, so batching
cannot share it; not computing the same tokens twice can. lorag lays its prompts out so that
what repeats comes first: the system prompt, then (in a RAG-Token or RAG-Sequence row) the one
passage, then the question. A row whose prompt starts with blocks another row already
prefilled under the same weights takes their keys and values and prefills only the rest.

Block-granular, like vLLM's automatic prefix caching, not a radix tree like SGLang's: blocks of
`BLOCK` tokens keyed by the adapter the row runs under and every token up to the block's end
(exact: a tuple of ids, no hash collisions), so a lookup walks a prompt's blocks from the start
until the first miss. A block is a unit of eviction too: least recently used first, within a
byte budget. Blocks are cheaper to reason about than a tree (no splits), and at 16 tokens the
few tokens a block boundary leaves uncached are a small share of a ~500-token RAG prompt.

Exact reuse only: a cached block holds the keys and values that a causal model computed for
exactly those tokens at exactly those positions, which is what it would compute again (a
token attends only to tokens before it). The batch drops every entry whenever the model's
weights change (an adapter installed, swapped, unloaded, merged or unmerged: `clear`), so a
block never serves under weights other than the ones it was computed with.

Rows that arrive together and share a prefix that is not cached yet (a popular question asked
by several clients at once, a passage that several joiners retrieved) would each compute it in
the one prefill of their join; `shared_blocks` finds them, and the step batch prefills such
followers in a second call after their leaders' blocks are stored (`StepBatch.join_requests`).

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
from collections.abc import Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

BLOCK = 16  # tokens per cached block

Key = tuple[str | None, tuple[int, ...]]  # (adapter the row runs under, tokens up to the end)
InputKey = tuple[str, str | None, tuple[int, ...]]  # ("encoder", adapter, the whole input)
Blocks = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys [H, n, D], values [H, n, D])


@dataclass(slots=True)
class PrefixStats:
    looked_up: int = 0  # prompt tokens of rows that looked
    reused: int = 0  # of those, tokens whose keys and values came from the cache
    evictions: int = 0  # blocks (and encoder outputs) dropped for the budget
    clears: int = 0  # times the weights changed and every block went


class PrefixCache:
    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.bytes = 0
        self.stats = PrefixStats()
        # a block's key -> per layer (keys [H, BLOCK, D], values [H, BLOCK, D]), an input's
        # key -> its encoder output [S, d]; least recently used first
        self._blocks: OrderedDict[Key | InputKey, Blocks | torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def clear(self) -> None:
        """Forget every block and encoder output (the model's weights changed)."""
        if self._blocks:
            self._blocks.clear()
            self.bytes = 0
            self.stats.clears += 1

    def lookup(
        self, adapter: str | None, prompt: Sequence[int]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The cached keys and values of prompt's longest cached prefix, per layer
        ([H, n, D] each, n a multiple of BLOCK, at most len(prompt) - 1: the last token is
        always prefilled, for the next token's logits); [] when none is cached."""
        self.stats.looked_up += len(prompt)
        found: list[Blocks] = []
        for end in range(BLOCK, len(prompt), BLOCK):
            block = self._blocks.get((adapter, tuple(prompt[:end])))
            if not isinstance(block, list):
                break
            self._blocks.move_to_end((adapter, tuple(prompt[:end])))
            found.append(block)
        if not found:
            return []
        self.stats.reused += BLOCK * len(found)
        layers = len(found[0])
        return [
            (
                torch.cat([b[i][0] for b in found], dim=1),
                torch.cat([b[i][1] for b in found], dim=1),
            )
            for i in range(layers)
        ]

    def covered(self, adapter: str | None, prompt: Sequence[int]) -> int:
        """How many leading tokens of prompt a lookup would reuse now (no stats, no LRU)."""
        n = 0
        for end in range(BLOCK, len(prompt), BLOCK):
            if (adapter, tuple(prompt[:end])) not in self._blocks:
                break
            n = end
        return n

    def missing(self, adapter: str | None, prompt: Sequence[int]) -> bool:
        """Whether some full block of prompt is not cached (store() would add it)."""
        if self.budget <= 0:
            return False
        return any(
            (adapter, tuple(prompt[:end])) not in self._blocks
            for end in range(BLOCK, len(prompt), BLOCK)
        )

    def store(
        self,
        adapter: str | None,
        prompt: Sequence[int],
        layers: Sequence[tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        """Keep the full blocks of prompt, given its keys and values per layer ([H, L, D],
        column t for prompt token t)."""
        if self.budget <= 0:
            return
        for end in range(BLOCK, len(prompt), BLOCK):
            key = (adapter, tuple(prompt[:end]))
            if key in self._blocks:
                self._blocks.move_to_end(key)
                continue
            block = [
                (k[:, end - BLOCK : end].clone(), v[:, end - BLOCK : end].clone())
                for k, v in layers
            ]
            if not self._add(key, block):
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

    def _add(self, key: Key | InputKey, entry: Blocks | torch.Tensor) -> bool:
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


def _nbytes(entry: Blocks | torch.Tensor) -> int:
    if isinstance(entry, torch.Tensor):
        return entry.nbytes
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
