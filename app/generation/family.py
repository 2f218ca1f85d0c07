"""What a backend family (encoder-decoder, decoder-only) does, behind one small interface.

The step batch, the RAG modes and the training losses call a family; none of them asks which
kind of model it is. A family is built once from the base model and is told the model to call
at every call, since the adapter registry may wrap, merge or unmerge it in between.

A new family (say, a model with its own cache layout) is one module that implements this and
one line in `family_for`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, ClassVar, Literal, Protocol

import torch
from transformers import PreTrainedTokenizerBase

from app.contracts import GeneratorKind
from app.generation.kv import State

# keys and values per layer ([J, H, P, D] each) that come before the rows' prompts, left
# padded, and their mask [J, P]
Past = tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]


class Family(Protocol):
    kind: ClassVar[GeneratorKind]
    padding_side: ClassVar[Literal["left", "right"]]  # how prompts are padded for the model
    reuses_prefixes: ClassVar[bool]  # whether prefill takes a cached prompt prefix (`past`)
    reuses_inputs: ClassVar[bool]  # whether prefill takes given encoder output (`states`)

    def cannot_join(self) -> str | None:
        """None when rows can join a batch that is already decoding, exactly; else why not
        (then every batch starts whole and only shrinks)."""

    def cannot_step(self) -> str | None:
        """None when the step batch decodes this model exactly; else why not (then concat
        rows go through transformers' generate())."""

    def prefill(
        self,
        model: Any,
        ids: torch.Tensor,
        mask: torch.Tensor,
        extra: dict[str, Any],
        past: Past | None = None,
        states: torch.Tensor | None = None,
    ) -> tuple[State, torch.Tensor]:
        """Run prompts ids [J, L] (padded on padding_side; mask [J, L]) once: their state and
        the logits [J, V] of each row's first answer token. With `past`, ids are what follows
        each row's cached prefix (reuses_prefixes families only); with `states`, the encoder
        output of ids [J, L, d], which the prefill then does not compute (reuses_inputs)."""

    def encode(
        self, model: Any, ids: torch.Tensor, mask: torch.Tensor, extra: dict[str, Any]
    ) -> torch.Tensor:
        """The encoder's output [J, L, d] for ids [J, L] (reuses_inputs families only)."""

    def stack(self, model: Any) -> torch.nn.ModuleList | None:
        """The decoder layers a prefill can start partway through (`climb`), or None."""

    def climb(
        self,
        model: Any,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        extra: dict[str, Any],
        past: Past | None,
        start: int,
    ) -> tuple[State, torch.Tensor]:
        """prefill from layer `start` on: hidden [J, L, d] is what enters that layer for the
        rows' tokens (mask [J, L], after `past` as in prefill). Its state's layers below
        `start` hold only the past (stack() families only)."""

    def capture(self, model: Any, layer: int) -> AbstractContextManager[list[torch.Tensor]]:
        """Inside it, every call of the model appends what enters decoder layer `layer`
        ([J, L, d]) to the list it gives (stack() families only)."""

    def decode(self, model: Any, state: State, extra: dict[str, Any]) -> torch.Tensor:
        """Feed state.last (one token per row) and return the next logits [B, V]."""

    def answer_logits(
        self,
        model: Any,
        prompt_ids: torch.Tensor,  # [P, L] either padding side
        prompt_mask: torch.Tensor,  # [P, L]
        answers: torch.Tensor,  # [P, T] any value where answer_mask is 0
        answer_mask: torch.Tensor,  # [P, T]
        extra: dict[str, Any],
        encoder_states: torch.Tensor | None = None,  # [P, L, d] seq2seq: skip the encoder
    ) -> torch.Tensor:
        """Teacher-forced logits [P, T, V] predicting each answer token (one forward pass)."""

    def max_input_tokens(self, window: int | None, max_new_tokens: int) -> int:
        """Longest prompt that leaves room for max_new_tokens of answer in window."""

    def batch_window(self, window: int | None) -> int | None:
        """The bound on a generate() batch's longest prompt + longest answer; None: none."""

    def tokenize(
        self, tokenizer: PreTrainedTokenizerBase, prompt: str, max_length: int, *, chat: bool
    ) -> list[int]:
        """The prompt's input ids, at most max_length of them."""

    def generated(self, output: torch.Tensor, prompt_width: int) -> torch.Tensor:
        """The new tokens [B, T] of generate()'s output for prompts prompt_width wide."""


def family_for(model: Any) -> Family:
    """The family of a transformers model (or a PeftModel around one)."""
    from app.generation.causal import Causal
    from app.generation.seq2seq import Seq2Seq

    if getattr(model.config, "is_encoder_decoder", False):
        return Seq2Seq(model)
    return Causal(model)


def core(model: Any) -> Any:
    """The transformers model under a PeftModel (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def fill(answers: torch.Tensor, answer_mask: torch.Tensor, pad: int) -> torch.Tensor:
    """answers with token pad where the mask is 0 (labels say -100 there)."""
    return answers.masked_fill(answer_mask == 0, pad)
