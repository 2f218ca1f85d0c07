"""RAG-Token decoding: p(y_i|x,y_<i) = sum_z p(z|x) p(y_i|x,z,y_<i), greedy or beam search.

All B*K (question, passage) rows decode in lockstep with one shared KV cache; the context of
each pair is encoded (seq2seq) or prefilled (decoder-only) exactly once. With `min_prior`, pruned
passages are dropped before encoding when every question has fewer survivors than K (rows are
compacted to the largest survivor count; a question with fewer survivors fills the remaining
slots with passages of prior 0, which are computed but weigh nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from app.generation.rag import (
    RagOutput,
    check_layout,
    doc_posterior,
    doc_prior,
    expand_to_docs,
    kept_docs,
    pair_rows,
    select_row_kwargs,
)
from app.generation.rag_runners import CausalRunner, Runner, Seq2SeqRunner
from app.generation.rag_search import search


def _decode(
    runner: Runner,
    log_prior: Tensor,  # [B, K'] compacted
    doc_index: Tensor,  # [B, K']
    n_docs: int,
    *,
    max_new_tokens: int,
    num_beams: int,
    eos_token_id: int,
    pad_token_id: int,
    length_penalty: float,
    limits: Sequence[int] | None,
) -> RagOutput:
    hyps = search(
        runner,
        log_prior,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        num_return=1,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        length_penalty=length_penalty,
        limits=limits,
    )
    doc_lp = hyps.doc_logprob[:, 0].masked_fill(~torch.isfinite(log_prior), float("-inf"))
    posterior = doc_posterior(log_prior, doc_lp)  # [B, K']
    return RagOutput(
        sequences=hyps.sequences[:, 0],
        logprob=hyps.logprob[:, 0],
        doc_logprob=expand_to_docs(doc_lp, doc_index, n_docs, float("-inf")),
        doc_posterior=expand_to_docs(posterior, doc_index, n_docs, 0.0),
    )


def _rows(
    context_input_ids: Tensor, doc_scores: Tensor, n_docs: int, min_prior: float | None
) -> tuple[Tensor, Tensor, Tensor]:
    check_layout(context_input_ids, doc_scores, n_docs)
    log_prior = doc_prior(doc_scores.to(context_input_ids.device), min_prior)
    doc_index, log_prior = kept_docs(log_prior)
    return doc_index, log_prior, pair_rows(doc_index, n_docs)


@torch.no_grad()
def rag_token_generate(
    model: nn.Module,
    context_input_ids: Tensor,  # [B*K, L] passage+question, K docs of a question contiguous
    context_attention_mask: Tensor,  # [B*K, L]
    doc_scores: Tensor,  # [B, K] retrieval inner products
    *,
    n_docs: int,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    decoder_start_token_id: int,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    min_prior: float | None = None,
    limits: Sequence[int] | None = None,
    **model_kwargs: Any,
) -> RagOutput:
    """RAG-Token decoding with an encoder-decoder model (BART, T5, a PEFT model around one).

    limits: per-question max_new_tokens (greedy only), each at most max_new_tokens.
    model_kwargs go to every model call; per-row ones (`adapter_names` of length B*K) follow
    their rows through pruning and beam search.
    """
    doc_index, log_prior, rows = _rows(context_input_ids, doc_scores, n_docs, min_prior)
    runner = Seq2SeqRunner(
        model,
        context_input_ids.index_select(0, rows),
        context_attention_mask.index_select(0, rows),
        decoder_start_token_id,
        pad_token_id,
        select_row_kwargs(model_kwargs, context_input_ids.shape[0], rows),
    )
    return _decode(
        runner,
        log_prior,
        doc_index,
        n_docs,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        length_penalty=length_penalty,
        limits=limits,
    )


@torch.no_grad()
def causal_rag_token_generate(
    model: nn.Module,
    context_input_ids: Tensor,  # [B*K, L] one prompt (passage + question) per row, any padding
    context_attention_mask: Tensor,  # [B*K, L]
    doc_scores: Tensor,  # [B, K]
    *,
    n_docs: int,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    min_prior: float | None = None,
    limits: Sequence[int] | None = None,
    **model_kwargs: Any,
) -> RagOutput:
    """RAG-Token decoding with a decoder-only model; the answer tokens follow each prompt."""
    doc_index, log_prior, rows = _rows(context_input_ids, doc_scores, n_docs, min_prior)
    runner = CausalRunner(
        model,
        context_input_ids.index_select(0, rows),
        context_attention_mask.index_select(0, rows),
        pad_token_id,
        select_row_kwargs(model_kwargs, context_input_ids.shape[0], rows),
    )
    return _decode(
        runner,
        log_prior,
        doc_index,
        n_docs,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        length_penalty=length_penalty,
        limits=limits,
    )
