"""What every decoding mode implements: a request's rows, and one step of its search."""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers.generation.logits_process import TopPLogitsWarper

from app.contracts import GREEDY, Sampling
from app.generation.rag import Candidate

Finish = Literal["stop", "length"]  # an end token or a stop string; or max_new_tokens


@dataclass(frozen=True, slots=True)
class Answer:
    """One request's decoded answer. Two answers are equal when their text, weights and token
    counts are (what a client sees); the rest is detail for references and scoring."""

    text: str
    weights: list[float] | None  # p(z|x, y) per passage for token/sequence; None for concat
    tokens: int = 0  # tokens generated for the answer, its end token included
    ids: tuple[int, ...] = field(default=(), compare=False)  # those tokens
    # the RAG modes: log p(y|x) under the mode, log p(y|x,z) per passage (-inf where pruned,
    # or in "fast" RAG-Sequence where the passage did not propose y), RAG-Sequence's distinct
    # hypotheses best first
    logprob: float | None = field(default=None, compare=False)
    doc_logprob: tuple[float, ...] = field(default=(), compare=False)
    candidates: tuple[Candidate, ...] = field(default=(), compare=False)
    finish_reason: Finish = field(default="length", compare=False)
    prompt_tokens: int = field(default=0, compare=False)  # the tokens its prompts hold
    reused_tokens: int = field(default=0, compare=False)  # of those, taken from the prefix cache


@dataclass(frozen=True, slots=True)
class Found:
    """A request's answer as token ids, before the batch turns them into text."""

    ids: list[int]
    weights: list[float] | None = None
    logprob: float | None = None
    doc_logprob: tuple[float, ...] = ()
    candidates: tuple[Candidate, ...] = ()


@dataclass(slots=True)
class Step:
    """What a request does with one step: its answer when it ends here; else the rows (its own
    indices, a row may appear twice: a beam continued by two beams) that go on decoding, and
    the token each of them feeds next."""

    done: Found | None = None
    keep: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


class Request(ABC):
    """One request in the step batch: its rows (contiguous in the batch) and its search.

    `prompts` are the rows' prompt token ids at join (one per row); `adapter` is the PEFT
    name its rows run under (None: the base, or its adapter merged into the weights), which
    the batch re-sets when the registry renames the request's version.
    """

    def __init__(
        self, key: Hashable, adapter: str | None, limit: int, sampling: Sampling = GREEDY
    ) -> None:
        self.key = key
        self.adapter = adapter
        self.limit = limit  # max_new_tokens
        self.prompts: list[list[int]] = []
        self.sampling = sampling
        self._rng: torch.Generator | None = None  # the request's own stream, when it samples
        self.reused = 0  # prompt tokens whose keys and values came from the prefix cache

    def pick(self, scores: torch.Tensor, greedy: int) -> int:
        """The next token from scores [V] (logits or log-probs): greedy's argmax, or a draw."""
        s = self.sampling
        if s.greedy:
            return greedy
        if self._rng is None:
            self._rng = torch.Generator(device=scores.device)
            self._rng.manual_seed(s.seed if s.seed is not None else random.getrandbits(63))
        return sample(scores, s, self._rng)

    @property
    @abstractmethod
    def n(self) -> int:
        """Its batch rows now."""

    @abstractmethod
    def advance(self, logits: torch.Tensor, greedy: Sequence[int]) -> Step:
        """One step from its rows' logits [n, V] (greedy: their argmax, computed once for the
        batch)."""

    def prefilled(self, encoder_states: torch.Tensor | None) -> None:  # noqa: B027
        """Called after the prefill with its rows' encoder states [n, S, d] (seq2seq); most
        modes need nothing from it."""

    def partial(self) -> list[int] | None:
        """The answer's tokens so far, as its final answer will begin; None when the answer is
        chosen only at the end (beam search, RAG-Sequence)."""
        return None

    def stop_here(self) -> Found:
        """Its answer as the tokens so far (a stop string ended it); modes with partial()."""
        raise NotImplementedError(f"{type(self).__name__} chooses its answer at the end")


def sample(scores: torch.Tensor, s: Sampling, rng: torch.Generator) -> int:
    """A draw from softmax(scores / temperature) after top-p filtering (transformers' own
    TopPLogitsWarper, so the nucleus is the one generate() samples from)."""
    x = scores.float()[None] / s.temperature  # [1, V]
    if s.top_p < 1.0:
        x = TopPLogitsWarper(s.top_p)(None, x)
    probs = torch.softmax(x, dim=-1)[0]
    return int(torch.multinomial(probs, 1, generator=rng))


def tokens_until(ids: Sequence[int], eos: int) -> list[int]:
    """ids up to and including the first eos."""
    out = list(ids)
    return out[: out.index(eos) + 1] if eos in out else out
