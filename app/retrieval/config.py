"""EncoderSpec: which question/passage encoder to load, and the one place that loads it.

A plain frozen dataclass: app/settings.py builds it without importing torch; `load` imports
the encoders only when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.retrieval.encoders import EncoderKind, PassageAutocast, TextEncoder


@dataclass(frozen=True)
class EncoderSpec:
    spec: str = "default"  # hub id, local folder, or "default" (the packaged all-MiniLM-L6-v2)
    kind: EncoderKind = "sentence-transformers"
    device: str = "cpu"
    context_spec: str | None = None  # the DPR passage encoder (kind="dpr" only)

    def __post_init__(self) -> None:
        if not self.spec:
            raise ValueError("encoder spec is empty: name a hub id, a path or 'default'")
        if not self.device:
            raise ValueError("encoder device is empty: name a torch device (cpu, cuda, mps)")

    def load(self, *, passage_autocast: PassageAutocast = None) -> TextEncoder:
        """The encoder; mismatches of kind and context encoder are refused by name there."""
        from app.retrieval.encoders import load_encoder

        return load_encoder(
            self.spec,
            self.kind,
            device=self.device,
            context_spec=self.context_spec,
            passage_autocast=passage_autocast,
        )
