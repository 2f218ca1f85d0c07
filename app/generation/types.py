"""What the engine hands a generator backend: one row per request."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from app.retrieval.types import Passage

Mode = Literal["concat", "token", "sequence"]
Decoding = Literal["thorough", "fast"]


@dataclass(frozen=True, slots=True)
class GenRow:
    question: str
    passages: Sequence[Passage]
    adapter: str | None  # the PEFT adapter name installed in the model; None = the base
    max_new_tokens: int
    mode: Mode = "concat"
    decoding: Decoding = "thorough"  # RAG-Sequence only
    scores: Sequence[float] = ()  # retrieval scores of the passages: the prior's logits
