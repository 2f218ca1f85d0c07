"""Negative log marginal likelihood of target answers, RAG-Token and RAG-Sequence (differentiable).

    RAG-Sequence: -log sum_z p(z|x) prod_i p(y_i|x,z,y_<i)
    RAG-Token:    -sum_i log sum_z p(z|x) p(y_i|x,z,y_<i)

Averaged over the batch. Gradients reach the generator (LoRA weights of a PEFT model) and, when
`doc_scores` requires grad, the retriever scores. Labels follow transformers' seq2seq convention:
[B, T] target tokens, IGNORE_INDEX (-100) where no loss is taken; the decoder input is the labels
shifted right behind the decoder start token (seq2seq), or following the prompt (causal).

Label smoothing `epsilon` follows transformers' RagTokenForGeneration / RagSequenceForGeneration
`get_nll`: loss = (1-eps) * nll + eps/V * smooth, where smooth is minus the sum over positions and
vocabulary of the marginal log-probs (token), or minus logsumexp_z(log p(z|x) + that sum under
passage z) (sequence). transformers adds the document log prior to every vocabulary entry in the
sequence case (V times); here it is added once.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from app.errors import InvalidInputError
from app.generation.family import Family
from app.generation.rag import IGNORE_INDEX, check_layout, doc_prior

Mode = Literal["token", "sequence"]


def marginal_nll(
    logits: Tensor,  # [B*K, T, V] per-passage next-token logits at the label positions
    doc_scores: Tensor,  # [B, K]
    labels: Tensor,  # [B, T], IGNORE_INDEX where no loss
    mode: Mode,
    epsilon: float = 0.0,
) -> Tensor:
    """Per-question loss [B] from per-passage logits; the math shared by both architectures."""
    batch, n_docs = doc_scores.shape
    lp = torch.log_softmax(logits.float(), dim=-1).view(batch, n_docs, *logits.shape[1:])
    log_prior = doc_prior(doc_scores)[:, :, None]  # [B, K, 1]
    valid = labels != IGNORE_INDEX  # [B, T]
    target = labels.clamp(min=0)[:, None, :, None].expand(batch, n_docs, -1, 1)
    token_lp = lp.gather(-1, target).squeeze(-1)  # [B, K, T]
    if mode == "token":
        marg = torch.logsumexp(lp + log_prior[..., None], dim=1)  # [B, T, V]
        ll = marg.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)  # [B, T]
        nll = -(ll * valid).sum(-1)
        smooth = -(marg.sum(-1) * valid).sum(-1)
    elif mode == "sequence":
        seq_lp = (token_lp * valid[:, None]).sum(-1)  # [B, K]
        nll = -torch.logsumexp(seq_lp + log_prior[..., 0], dim=1)
        vocab_sum = (lp.sum(-1) * valid[:, None]).sum(-1)  # [B, K]
        smooth = -torch.logsumexp(vocab_sum + log_prior[..., 0], dim=1)
    else:
        raise InvalidInputError(f"mode must be 'token' or 'sequence', got {mode!r}")
    if epsilon == 0.0:
        return nll
    return (1.0 - epsilon) * nll + epsilon / lp.shape[-1] * smooth


def _check(labels: Tensor, batch: int, epsilon: float) -> None:
    if labels.dim() != 2 or labels.shape[0] != batch:
        raise InvalidInputError(f"labels must be [B={batch}, T], got {tuple(labels.shape)}")
    if not 0.0 <= epsilon < 1.0:
        raise InvalidInputError(f"label smoothing epsilon must be in [0, 1), got {epsilon}")


def rag_nll(
    family: Family,
    model: Any,
    context_input_ids: Tensor,  # [B*K, L] one prompt per (question, passage), any padding
    context_attention_mask: Tensor,  # [B*K, L]
    doc_scores: Tensor,  # [B, K]
    labels: Tensor,  # [B, T]
    *,
    mode: Mode,
    n_docs: int,
    epsilon: float = 0.0,
    **model_kwargs: Any,
) -> Tensor:
    """Mean marginal NLL of `labels`; one teacher-forced forward over the B*K rows, by the
    model's family (app/generation/family.py)."""
    batch = check_layout(context_input_ids, doc_scores, n_docs)
    doc_scores = doc_scores.to(context_input_ids.device)
    _check(labels, batch, epsilon)
    answers = labels.repeat_interleave(n_docs, 0)  # [B*K, T]
    logits = family.answer_logits(
        model,
        context_input_ids,
        context_attention_mask,
        answers,
        (answers != IGNORE_INDEX).long(),
        model_kwargs,
    )
    return marginal_nll(logits, doc_scores, labels, mode, epsilon).mean()
