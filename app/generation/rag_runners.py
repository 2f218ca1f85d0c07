"""Incremental decoding over (question, passage) rows with one shared KV cache.

A runner owns the model state of R decoding rows, each tied to one base (question, passage)
pair. `start()` runs the context once (the encoder for seq2seq, the prompt prefill for a
decoder-only model) and returns next-token log-probs; `step(tokens, src)` first moves row i's
state to come from old row src[i] (beam reordering, or growing 1 beam into N), then feeds one
token per row. Both runners keep one cache for all rows; nothing re-encodes a passage.

`score()` teacher-forces whole candidate answers under chosen pairs in one forward pass (the
RAG-Sequence "thorough" rescoring); the seq2seq runner reuses the encoder states from `start()`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from app.generation.rag import select_row_kwargs


class Runner(Protocol):
    def start(self) -> Tensor:
        """Run the context of every base row once; -> next-token log-probs [R0, V]."""
        ...

    def step(self, tokens: Tensor, src: Tensor | None) -> Tensor:
        """Reorder rows (src [R] into the previous rows, None = unchanged), feed tokens [R]."""
        ...

    def score(self, pairs: Tensor, answers: Tensor, answer_mask: Tensor) -> Tensor:
        """Teacher-forced log p(answer_t|...) [P, T] of answers [P, T] under base rows pairs [P]."""
        ...


def left_pad(input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Move each row's padding to the left (a shared cache appends every row at one column)."""
    order = torch.argsort(attention_mask.ne(0).to(torch.int8), dim=1, stable=True)  # pads first
    return input_ids.gather(1, order), attention_mask.gather(1, order)


def positions(attention_mask: Tensor) -> Tensor:
    """Position ids that skip left padding, as transformers' generate computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _reorder(cache: Any, src: Tensor, self_attention_only: bool) -> None:
    # An encoder-decoder cache's cross-attention part depends only on the base pair; when rows keep
    # their pair (beam reordering inside a question/passage) only the self-attention part moves.
    if self_attention_only and hasattr(cache, "self_attention_cache"):
        cache.self_attention_cache.reorder_cache(src)
    else:
        cache.reorder_cache(src)


def _gather_tokens(logprobs: Tensor, answers: Tensor, answer_mask: Tensor) -> Tensor:
    picked = logprobs.gather(-1, answers.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [P, T]
    return picked.masked_fill(answer_mask == 0, 0.0)


class Seq2SeqRunner:
    """Encoder-decoder rows: the encoder runs once (inside the first forward) for all base rows."""

    def __init__(
        self,
        model: nn.Module,
        input_ids: Tensor,  # [R0, L]
        attention_mask: Tensor,  # [R0, L]
        decoder_start_token_id: int,
        pad_token_id: int,
        model_kwargs: Mapping[str, Any],
    ) -> None:
        self.model = model
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.start_id = decoder_start_token_id
        self.pad_id = pad_token_id
        self.kwargs = dict(model_kwargs)
        self.n_base = input_ids.shape[0]
        self.base_of = torch.arange(self.n_base, device=input_ids.device)  # [R] base pair per row
        self.encoder_states: Tensor | None = None  # [R0, L, D]
        self.cache: Any = None
        self._row_mask = attention_mask  # [R, L] encoder mask per current row
        self._row_states: Tensor | None = None
        self._row_kwargs: dict[str, Any] = self.kwargs

    def start(self) -> Tensor:
        start = self.input_ids.new_full((self.n_base, 1), self.start_id)
        out = self.model(
            input_ids=self.input_ids,
            attention_mask=self.attention_mask,
            decoder_input_ids=start,
            use_cache=True,
            return_dict=True,
            **self.kwargs,
        )
        self.encoder_states = out.encoder_last_hidden_state
        self._row_states = self.encoder_states
        self.cache = out.past_key_values
        return torch.log_softmax(out.logits[:, -1].float(), dim=-1)

    def step(self, tokens: Tensor, src: Tensor | None) -> Tensor:
        assert self.encoder_states is not None, "start() first"
        if src is not None:
            new_base = self.base_of.index_select(0, src)
            same_pairs = new_base.shape == self.base_of.shape and torch.equal(
                new_base, self.base_of
            )
            _reorder(self.cache, src, self_attention_only=same_pairs)
            if not same_pairs:
                self.base_of = new_base
                self._row_states = self.encoder_states.index_select(0, new_base)
                self._row_mask = self.attention_mask.index_select(0, new_base)
                self._row_kwargs = select_row_kwargs(self.kwargs, self.n_base, new_base)
        out = self.model(
            encoder_outputs=(self._row_states,),
            attention_mask=self._row_mask,
            decoder_input_ids=tokens.unsqueeze(-1),
            past_key_values=self.cache,
            use_cache=True,
            return_dict=True,
            **self._row_kwargs,
        )
        self.cache = out.past_key_values
        return torch.log_softmax(out.logits[:, -1].float(), dim=-1)

    def score(self, pairs: Tensor, answers: Tensor, answer_mask: Tensor) -> Tensor:
        assert self.encoder_states is not None, "start() first"
        filled = answers.masked_fill(answer_mask == 0, self.pad_id)  # [P, T]
        start = filled.new_full((filled.shape[0], 1), self.start_id)
        decoder_input_ids = torch.cat([start, filled[:, :-1]], dim=1)  # shifted right
        out = self.model(
            encoder_outputs=(self.encoder_states.index_select(0, pairs),),
            attention_mask=self.attention_mask.index_select(0, pairs),
            decoder_input_ids=decoder_input_ids,
            use_cache=False,
            return_dict=True,
            **select_row_kwargs(self.kwargs, self.n_base, pairs),
        )
        return _gather_tokens(torch.log_softmax(out.logits.float(), -1), answers, answer_mask)


def causal_answer_logits(
    model: nn.Module,
    prompt_ids: Tensor,  # [P, L] left-padded
    prompt_mask: Tensor,  # [P, L]
    answers: Tensor,  # [P, T]
    answer_mask: Tensor,  # [P, T]
    pad_token_id: int,
    model_kwargs: Mapping[str, Any],
) -> Tensor:
    """Logits [P, T, V] predicting each answer token after its prompt (one teacher-forced pass)."""
    width = answers.shape[1]
    input_ids = torch.cat([prompt_ids, answers.masked_fill(answer_mask == 0, pad_token_id)], 1)
    mask = torch.cat([prompt_mask, answer_mask.to(prompt_mask.dtype)], dim=1)  # [P, L+T]
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions(mask),
        use_cache=False,
        logits_to_keep=width + 1,
        return_dict=True,
        **model_kwargs,
    )
    # position L-1+t predicts answer token t
    return out.logits[:, -(width + 1) : -1]


class CausalRunner:
    """Decoder-only rows: prompt = passage + question, left-padded, prefilled once."""

    def __init__(
        self,
        model: nn.Module,
        input_ids: Tensor,  # [R0, L] prompts (any padding side)
        attention_mask: Tensor,  # [R0, L]
        pad_token_id: int,
        model_kwargs: Mapping[str, Any],
    ) -> None:
        self.model = model
        self.input_ids, self.attention_mask = left_pad(input_ids, attention_mask)
        self.pad_id = pad_token_id
        self.kwargs = dict(model_kwargs)
        self.n_base = input_ids.shape[0]
        self.base_of = torch.arange(self.n_base, device=input_ids.device)
        self.cache: Any = None
        self._mask = self.attention_mask  # [R, L + steps]
        self._pos = positions(self.attention_mask)[:, -1]  # [R] position of the last token
        self._row_kwargs: dict[str, Any] = self.kwargs

    def start(self) -> Tensor:
        out = self.model(
            input_ids=self.input_ids,
            attention_mask=self.attention_mask,
            position_ids=positions(self.attention_mask),
            use_cache=True,
            logits_to_keep=1,
            return_dict=True,
            **self.kwargs,
        )
        self.cache = out.past_key_values
        return torch.log_softmax(out.logits[:, -1].float(), dim=-1)

    def step(self, tokens: Tensor, src: Tensor | None) -> Tensor:
        if src is not None:
            self.cache.reorder_cache(src)
            self._mask = self._mask.index_select(0, src)
            self._pos = self._pos.index_select(0, src)
            new_base = self.base_of.index_select(0, src)
            if not torch.equal(new_base, self.base_of):
                self._row_kwargs = select_row_kwargs(self.kwargs, self.n_base, new_base)
            self.base_of = new_base
        self._mask = torch.cat([self._mask, self._mask.new_ones((self._mask.shape[0], 1))], 1)
        self._pos = self._pos + 1
        out = self.model(
            input_ids=tokens.unsqueeze(-1),
            attention_mask=self._mask,
            position_ids=self._pos.unsqueeze(-1),
            past_key_values=self.cache,
            use_cache=True,
            return_dict=True,
            **self._row_kwargs,
        )
        self.cache = out.past_key_values
        return torch.log_softmax(out.logits[:, -1].float(), dim=-1)

    def score(self, pairs: Tensor, answers: Tensor, answer_mask: Tensor) -> Tensor:
        # Recomputes the prompts (one pass over prompt+answer); the prefill cache has been
        # extended by decoding by now, and copying it per candidate would cost as much memory.
        logits = causal_answer_logits(
            self.model,
            self.input_ids.index_select(0, pairs),
            self.attention_mask.index_select(0, pairs),
            answers,
            answer_mask,
            self.pad_id,
            select_row_kwargs(self.kwargs, self.n_base, pairs),
        )
        return _gather_tokens(torch.log_softmax(logits.float(), -1), answers, answer_mask)
