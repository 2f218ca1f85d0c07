"""TrainingConfig: what adapter training takes from the service's settings.

Training reads the same index, encoder and adapters root as the server, so an adapter trained
here fits what serves it; `answer_reserve` is /ask's default answer budget, so training prompts
are cut to leave the same room as served ones.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.retrieval.config import EncoderSpec
    from app.retrieval.interface import PassageStore


@dataclass(frozen=True)
class TrainingConfig:
    adapters_dir: Path  # adapters are written to adapters_dir/<name>
    cache_dir: Path  # the converted default generator
    # the passage store for an encoder fingerprint, closed on exit (app.wiring.opened_store);
    # its active index gives passages to examples that bring none
    store: Callable[[str], AbstractContextManager[PassageStore]] = field(compare=False)
    encoder: EncoderSpec
    base: str = "default"  # the generator trained on when the options name none
    top_k: int = 5  # passages per question when the options say none
    answer_reserve: int = 64  # tokens left for the answer when prompts are cut

    def __post_init__(self) -> None:
        if not self.base:
            raise ValueError("base generator spec is empty: name a hub id, a path or 'default'")
        for name in ("top_k", "answer_reserve"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
