"""RAG math shared by both decoding modes (Lewis et al. 2020): document prior, posterior, pruning.

Layout convention (as transformers' RAG models): a batch of B questions with K retrieved passages
each is flattened to B*K rows, the K passages of question b contiguous (rows b*K .. b*K+K-1).
Everything here works in log space; a pruned passage has log prior -inf and weight exactly 0.

The decoding functions live in rag_token.py / rag_sequence.py, the training losses in rag_loss.py;
they take plain Hugging Face models and tensors, so a PEFT model with per-row `adapter_names`
works unchanged (see `select_row_kwargs`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from app.errors import InvalidInputError

IGNORE_INDEX = -100  # the label value that transformers' losses skip


@dataclass(frozen=True, slots=True)
class Candidate:
    """One distinct RAG-Sequence hypothesis: its tokens (EOS included) and log p(y|x)."""

    tokens: tuple[int, ...]
    logprob: float


@dataclass(frozen=True, slots=True)
class RagOutput:
    """One decoded answer per question.

    sequences: [B, T] generated tokens only (no decoder start token, no prompt), `pad_token_id`
        after the first EOS; T is the longest answer in the batch.
    logprob: [B] log p(y|x) of each answer under the mode that decoded it (RAG-Token: the sum of
        the marginal token log-probs; RAG-Sequence: log sum_z p(z|x) p(y|x,z), where "fast" counts
        only the passages whose beam produced y).
    doc_logprob: [B, K] log p(y|x,z) per passage, -inf where the passage was pruned (or, in "fast"
        RAG-Sequence, did not produce y).
    doc_posterior: [B, K] p(z|x,y) = p(z|x) p(y|x,z) / p(y|x), rows sum to 1, 0 for pruned passages.
    candidates: RAG-Sequence only: every distinct hypothesis of each question, best first
        (the first is `sequences[b]`); empty for RAG-Token.
    """

    sequences: Tensor
    logprob: Tensor
    doc_logprob: Tensor
    doc_posterior: Tensor
    candidates: tuple[tuple[Candidate, ...], ...] = ()


def doc_prior(doc_scores: Tensor, min_prior: float | None = None) -> Tensor:
    """log p(z|x) = log_softmax of the top-K retrieval scores (inner products).

    doc_scores: [B, K]. With `min_prior`, passages whose prior is below it are pruned (log prior
    -inf) and the rest renormalized; the best passage of each question is always kept.

    Effect of pruning: the result is exact RAG over the kept passages; at most K * min_prior of
    the prior mass is dropped, but a dropped passage's likelihood term is unbounded, so answers can
    change. Compute: RAG-Sequence skips pruned pairs entirely (no encoding, no hypotheses, no
    rescoring); RAG-Token drops them when it can keep a rectangular [B, K'] layout, K' = the
    largest survivor count. Measured on a tiny random BART (B=16, K=8, scores ~ N(0, 9), 12 new
    tokens): min_prior=0.05 kept 43/128 pairs; RAG-Token computed 80 rows and kept every answer,
    RAG-Sequence computed 43 rows, ran 2x faster and changed 4 answers in 16, because a
    low-prior passage can propose the hypothesis that the others then score best. Random tiny
    models have far wider likelihood ranges than trained ones, so treat this as a worst case.
    """
    if doc_scores.dim() != 2:
        raise InvalidInputError(f"doc_scores must be [B, K], got shape {tuple(doc_scores.shape)}")
    log_prior = torch.log_softmax(doc_scores.float(), dim=-1)  # [B, K]
    if min_prior is None:
        return log_prior
    if not 0.0 <= min_prior < 1.0:
        raise InvalidInputError(f"min_prior must be in [0, 1), got {min_prior}")
    keep = log_prior >= math.log(min_prior) if min_prior > 0 else torch.ones_like(log_prior).bool()
    best = log_prior.argmax(dim=-1, keepdim=True)  # [B, 1]
    keep = keep.scatter(1, best, True)
    return torch.log_softmax(log_prior.masked_fill(~keep, float("-inf")), dim=-1)


def doc_posterior(log_prior: Tensor, doc_logprob: Tensor) -> Tensor:
    """p(z|x,y) ∝ p(z|x) p(y|x,z); [B, K] log prior and [B, K] log-likelihoods -> [B, K] probs."""
    joint = log_prior + doc_logprob  # [B, K]
    return torch.softmax(joint, dim=-1)


def marginal_logprob(log_prior: Tensor, doc_logprob: Tensor) -> Tensor:
    """log p(y|x) = logsumexp_z (log p(z|x) + log p(y|x,z)); [B, K] -> [B]."""
    return torch.logsumexp(log_prior + doc_logprob, dim=-1)


def check_layout(context_input_ids: Tensor, doc_scores: Tensor, n_docs: int) -> int:
    """Validate the [B*K, L] / [B, K] layout and return B."""
    if n_docs < 1:
        raise InvalidInputError(f"n_docs must be >= 1, got {n_docs}")
    rows = context_input_ids.shape[0]
    if context_input_ids.dim() != 2 or rows % n_docs:
        raise InvalidInputError(
            f"context_input_ids must be [B*n_docs, L] with n_docs={n_docs}, "
            f"got shape {tuple(context_input_ids.shape)}"
        )
    batch = rows // n_docs
    if tuple(doc_scores.shape) != (batch, n_docs):
        raise InvalidInputError(
            f"doc_scores must be [B, n_docs] = [{batch}, {n_docs}], got {tuple(doc_scores.shape)}"
        )
    return batch


def select_row_kwargs(kwargs: Mapping[str, Any], n_rows: int, rows: Tensor) -> dict[str, Any]:
    """Re-index the per-row model kwargs for a new set of rows.

    A kwarg is per-row when it is a list/tuple of length `n_rows` or a tensor whose first dim is
    `n_rows` (PEFT's `adapter_names=[...]` is the case that matters: every row of question b
    carries b's adapter, and decoding multiplies rows by beams and candidates). Everything else is
    forwarded unchanged. rows: [R] indices into the original n_rows rows.
    """
    out: dict[str, Any] = {}
    index = rows.tolist()
    for key, value in kwargs.items():
        if isinstance(value, list | tuple) and len(value) == n_rows:
            out[key] = [value[i] for i in index]
        elif isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == n_rows:
            out[key] = value.index_select(0, rows.to(value.device))
        else:
            out[key] = value
    return out


def kept_docs(log_prior: Tensor) -> tuple[Tensor, Tensor]:
    """Compact the passages that survived pruning to the front.

    log_prior: [B, K] -> (doc_index [B, K'], compact_log_prior [B, K']) where K' is the largest
    number of kept passages in any question; slots past a question's own count hold pruned
    passages (log prior -inf, so they weigh nothing). Without pruning this is the identity.
    """
    kept = torch.isfinite(log_prior)  # [B, K]
    width = int(kept.sum(dim=-1).max())
    # stable sort puts kept passages first, each group in its original order
    order = torch.argsort((~kept).to(torch.int8), dim=-1, stable=True)[:, :width]  # [B, K']
    return order, log_prior.gather(1, order)


def expand_to_docs(compact: Tensor, doc_index: Tensor, n_docs: int, fill: float) -> Tensor:
    """Scatter [B, K'] per-passage values back to the original [B, K] order, `fill` elsewhere."""
    out = compact.new_full((compact.shape[0], n_docs), fill)
    return out.scatter(1, doc_index, compact)


def pair_rows(doc_index: Tensor, n_docs: int) -> Tensor:
    """Flat row index (b*K + k) of each kept (question, passage) pair; [B, K'] -> [B*K']."""
    batch = doc_index.shape[0]
    base = torch.arange(batch, device=doc_index.device).unsqueeze(1) * n_docs  # [B, 1]
    return (base + doc_index).reshape(-1)
