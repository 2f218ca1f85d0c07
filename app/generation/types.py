"""What the engine hands a generator backend: one row per request."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from app.retrieval.types import Passage


@dataclass(frozen=True, slots=True)
class GenRow:
    question: str
    passages: Sequence[Passage]
    adapter: str | None  # the PEFT adapter name installed in the model; None = the base
    max_new_tokens: int
