"""What the engine takes and gives, and the interfaces it needs of the layers below it."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Protocol

from app.contracts import GREEDY, Decoding, GenRow, Mode, Passage, Sampling, Template, Turn
from app.generation.modes.base import Answer
from app.generation.prefix_cache import PrefixCache
from app.lora.registry import Lease


class Stepper(Protocol):
    """A batch that decodes a step at a time (app/generation/step_batch.StepBatch)."""

    @property
    def cannot_join(self) -> str | None: ...  # why rows cannot join a running batch, or None
    @property
    def width(self) -> int: ...  # running batch rows
    @property
    def prefixes(self) -> PrefixCache | None: ...  # the prompt-prefix cache, when on
    def __len__(self) -> int: ...  # running requests
    def rows_for(self, mode: str, passages: int) -> int: ...
    def prompt_tokens(self, row: GenRow) -> int: ...
    def join(
        self, rows: Sequence[GenRow], keys: Sequence[Hashable]
    ) -> list[tuple[Hashable, Answer]]: ...
    def step(self) -> list[tuple[Hashable, Answer]]: ...
    def drop(self, keys: AbstractSet[Hashable]) -> None: ...
    def clear(self) -> list[Hashable]: ...
    def rename(self, adapters: dict[Hashable, str | None]) -> None: ...
    def text_of(self, key: Hashable) -> str | None: ...


class AdapterResolver(Protocol):
    """The adapter registry as the engine sees it (app/lora/registry.AdapterRegistry)."""

    def begin_batch(
        self, names: Sequence[str | None], running: Sequence[str | None] = ()
    ) -> None: ...  # usage counts and the merge policy, before rows are admitted
    def peft_name_of(self, lease: Lease) -> str | None: ...  # the model's name for it now


@dataclass(frozen=True, slots=True)
class EngineResult:
    answer: Answer
    adapter_version: str | None  # the weights the row actually ran with


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """One request to generate. `adapter` is the public adapter name (usage counts, the merge
    policy); the request runs on the version its `lease` names, taken when it was admitted
    (AdapterRegistry.acquire), so an adapter comes with its lease."""

    question: str
    passages: Sequence[Passage]
    adapter: str | None
    max_new_tokens: int
    mode: Mode = "concat"
    decoding: Decoding = "thorough"
    scores: Sequence[float] = ()
    lease: Lease | None = None
    sampling: Sampling = GREEDY
    history: tuple[Turn, ...] = ()
    template: Template = "rag"
    # called on the event loop with the answer's text so far, as it grows (concat and greedy
    # RAG-Token; other searches choose their answer at the end)
    on_text: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        if (self.adapter is None) != (self.lease is None):
            raise ValueError(f"adapter {self.adapter!r} and its lease go together")

    def row(self, adapter: str | None) -> GenRow:
        """The row to decode, under the model's name for its adapter version now."""
        return GenRow(
            self.question,
            self.passages,
            adapter,
            self.max_new_tokens,
            self.mode,
            self.decoding,
            self.scores,
            self.sampling,
            self.history,
            self.template,
        )


@dataclass(frozen=True, slots=True)
class Observers:
    """Metrics hooks, called on the event loop."""

    on_batch: Callable[[int, float], None] | None = None  # rows admitted together, seconds
    on_first_token: Callable[[float], None] | None = None  # arrival to first token
    on_token_gap: Callable[[float], None] | None = None  # between two steps of running rows
