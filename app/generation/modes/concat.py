"""concat: the question with all k passages in one prompt, one batch row, greedy."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from collections.abc import Set as AbstractSet

import torch

from app.contracts import GREEDY, Sampling
from app.generation.modes.base import Found, Request, Step


class Concat(Request):
    def __init__(
        self,
        key: Hashable,
        adapter: str | None,
        limit: int,
        prompt: list[int],
        eos: AbstractSet[int],
        sampling: Sampling = GREEDY,
    ) -> None:
        super().__init__(key, adapter, limit, sampling)
        self.prompts = [prompt]
        self.eos = eos  # every end token of the generation config, as generate() stops
        self.ids: list[int] = []

    @property
    def n(self) -> int:
        return 1

    def advance(self, logits: torch.Tensor, greedy: Sequence[int]) -> Step:
        token = self.pick(logits[0], greedy[0])  # argmax, as generate()'s greedy search
        self.ids.append(token)
        if token in self.eos or len(self.ids) >= self.limit:
            return Step(Found(self.ids))
        return Step(None, [0], [token])

    def partial(self) -> list[int]:
        return self.ids

    def stop_here(self) -> Found:
        return Found(self.ids)
