"""RAG-Sequence decoding: p(y|x) = sum_z p(z|x) p(y|x,z), from per-passage hypotheses.

Each kept (question, passage) pair proposes `num_beams` hypotheses by its own greedy/beam search;
the distinct hypotheses of a question are then scored one of two ways (Lewis et al. 2020, 2.4):

- "thorough": every hypothesis is teacher-forced under every passage of its question (one
  forward pass for all of them, reusing the encoder states of the search), and marginalized;
- "fast": a passage whose beam did not produce the hypothesis contributes p(y|x,z) = 0, the
  producing passages contribute their beam scores; no extra forward pass.

The best hypothesis by marginal log-probability wins (no length normalization, as transformers'
`RagSequenceForGeneration.generate`). With `min_prior`, pruned passages neither propose nor score.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from app.errors import InvalidInputError
from app.generation.rag import (
    Candidate,
    RagOutput,
    check_layout,
    doc_posterior,
    doc_prior,
    select_row_kwargs,
)
from app.generation.rag_runners import CausalRunner, Runner, Seq2SeqRunner
from app.generation.rag_search import Hypotheses, search

Decoding = Literal["thorough", "fast"]


class _Candidates:
    """Distinct hypotheses per question and, for "fast", which passages produced them."""

    def __init__(self, batch: int) -> None:
        self.tokens: list[list[tuple[int, ...]]] = [[] for _ in range(batch)]
        self.produced: list[list[dict[int, float]]] = [[] for _ in range(batch)]

    def add(self, b: int, tokens: tuple[int, ...], doc: int, logprob: float) -> None:
        try:
            c = self.tokens[b].index(tokens)
        except ValueError:
            c = len(self.tokens[b])
            self.tokens[b].append(tokens)
            self.produced[b].append({})
        self.produced[b][c][doc] = max(logprob, self.produced[b][c].get(doc, float("-inf")))


def _collect(hyps: Hypotheses, pairs: Tensor, n_docs: int, batch: int) -> _Candidates:
    cands = _Candidates(batch)
    for row, pair in enumerate(pairs.tolist()):
        b, k = divmod(pair, n_docs)
        for i in range(hyps.sequences.shape[1]):
            length = int(hyps.lengths[row, i])
            if length == 0:  # fewer finished hypotheses than beams
                continue
            seq = tuple(hyps.sequences[row, i, :length].tolist())
            cands.add(b, seq, k, float(hyps.logprob[row, i]))
    return cands


def _thorough(
    runner: Runner, cands: _Candidates, slot: Tensor, n_docs: int, pad: int
) -> list[Tensor]:
    """log p(y_c|x,z_k) [C_b, K] per question; one teacher-forced pass over all (c, k) pairs."""
    rows, answers, where = [], [], []
    for b, seqs in enumerate(cands.tokens):
        for c, seq in enumerate(seqs):
            for k in range(n_docs):
                if int(slot[b, k]) >= 0:
                    rows.append(int(slot[b, k]))
                    answers.append(seq)
                    where.append((b, c, k))
    width = max(len(a) for a in answers)
    device = slot.device
    ans = torch.full((len(answers), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros_like(ans)
    for i, a in enumerate(answers):
        ans[i, : len(a)] = torch.tensor(a, device=device)
        mask[i, : len(a)] = 1
    seq_lp = runner.score(torch.tensor(rows, device=device), ans, mask).sum(-1)  # [P]
    out = [torch.full((len(s), n_docs), float("-inf"), device=device) for s in cands.tokens]
    for (b, c, k), value in zip(where, seq_lp, strict=True):
        out[b][c, k] = value
    return out


def _fast(cands: _Candidates, n_docs: int, device: torch.device) -> list[Tensor]:
    out = []
    for produced in cands.produced:
        table = torch.full((len(produced), n_docs), float("-inf"), device=device)
        for c, by_doc in enumerate(produced):
            for k, value in by_doc.items():
                table[c, k] = value
        out.append(table)
    return out


def _decode(
    runner: Runner,
    log_prior: Tensor,  # [B, K]
    pairs: Tensor,  # [P0] flat (b*K + k) of the runner's rows
    *,
    decoding: Decoding,
    max_new_tokens: int,
    num_beams: int,
    eos_token_id: int,
    pad_token_id: int,
    length_penalty: float,
) -> RagOutput:
    check_decoding(decoding)
    hyps = search(
        runner,
        log_prior.new_zeros(pairs.shape[0], 1),  # one passage per group: plain decoding
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        num_return=num_beams,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        length_penalty=length_penalty,
    )
    return rank(runner, log_prior, pairs, hyps, decoding=decoding, pad_token_id=pad_token_id)


def check_decoding(decoding: str) -> None:
    if decoding not in ("thorough", "fast"):
        raise InvalidInputError(f"decoding must be 'thorough' or 'fast', got {decoding!r}")


def rank(
    runner: Runner | None,
    log_prior: Tensor,  # [B, K]
    pairs: Tensor,  # [P0] flat (b*K + k) of the runner's rows
    hyps: Hypotheses,  # [P0, N, T] the pairs' hypotheses
    *,
    decoding: Decoding,
    pad_token_id: int,
) -> RagOutput:
    """Marginalize the pairs' hypotheses per question ("thorough": scored under every kept
    passage by runner.score; "fast": by their producers' scores, no runner needed) and rank
    them."""
    batch, n_docs = log_prior.shape
    cands = _collect(hyps, pairs, n_docs, batch)
    slot = torch.full((batch * n_docs,), -1, dtype=torch.long, device=pairs.device)
    slot[pairs] = torch.arange(pairs.shape[0], device=pairs.device)
    slot = slot.view(batch, n_docs)  # runner row of (b, k), -1 if pruned
    if decoding == "thorough":
        if runner is None:
            raise ValueError("thorough RAG-Sequence scores with a runner")
        tables = _thorough(runner, cands, slot, n_docs, pad_token_id)
    else:
        tables = _fast(cands, n_docs, log_prior.device)
    best_seq: list[tuple[int, ...]] = []
    logprob, doc_lp = [], []
    ranked: list[tuple[Candidate, ...]] = []
    for b, table in enumerate(tables):
        marginal = torch.logsumexp(log_prior[b] + table, dim=-1)  # [C_b]
        order = torch.argsort(marginal, descending=True, stable=True).tolist()
        ranked.append(tuple(Candidate(cands.tokens[b][c], float(marginal[c])) for c in order))
        c = order[0]
        best_seq.append(cands.tokens[b][c])
        logprob.append(marginal[c])
        doc_lp.append(table[c])
    width = max(len(s) for s in best_seq)
    seqs = torch.full((batch, width), pad_token_id, dtype=torch.long, device=log_prior.device)
    for b, s in enumerate(best_seq):
        seqs[b, : len(s)] = torch.tensor(s, device=log_prior.device)
    doc_logprob = torch.stack(doc_lp)  # [B, K]
    return RagOutput(
        sequences=seqs,
        logprob=torch.stack(logprob),
        doc_logprob=doc_logprob,
        doc_posterior=doc_posterior(log_prior, doc_logprob),
        candidates=tuple(ranked),
    )


def _pairs(log_prior: Tensor) -> Tensor:
    return torch.isfinite(log_prior).reshape(-1).nonzero().squeeze(-1)  # [P0] kept b*K+k


@torch.no_grad()
def rag_sequence_generate(
    model: nn.Module,
    context_input_ids: Tensor,  # [B*K, L] passage+question, K docs of a question contiguous
    context_attention_mask: Tensor,  # [B*K, L]
    doc_scores: Tensor,  # [B, K]
    *,
    n_docs: int,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    decoder_start_token_id: int,
    decoding: Decoding = "thorough",
    num_beams: int = 1,
    length_penalty: float = 1.0,
    min_prior: float | None = None,
    **model_kwargs: Any,
) -> RagOutput:
    """RAG-Sequence decoding with an encoder-decoder model; the encoder runs once per pair."""
    check_layout(context_input_ids, doc_scores, n_docs)
    log_prior = doc_prior(doc_scores.to(context_input_ids.device), min_prior)
    pairs = _pairs(log_prior)
    runner = Seq2SeqRunner(
        model,
        context_input_ids.index_select(0, pairs),
        context_attention_mask.index_select(0, pairs),
        decoder_start_token_id,
        pad_token_id,
        select_row_kwargs(model_kwargs, context_input_ids.shape[0], pairs),
    )
    return _decode(
        runner,
        log_prior,
        pairs,
        decoding=decoding,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        length_penalty=length_penalty,
    )


@torch.no_grad()
def causal_rag_sequence_generate(
    model: nn.Module,
    context_input_ids: Tensor,  # [B*K, L] one prompt (passage + question) per row, any padding
    context_attention_mask: Tensor,  # [B*K, L]
    doc_scores: Tensor,  # [B, K]
    *,
    n_docs: int,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    decoding: Decoding = "thorough",
    num_beams: int = 1,
    length_penalty: float = 1.0,
    min_prior: float | None = None,
    **model_kwargs: Any,
) -> RagOutput:
    """RAG-Sequence decoding with a decoder-only model; "thorough" re-reads prompt+answer."""
    check_layout(context_input_ids, doc_scores, n_docs)
    log_prior = doc_prior(doc_scores.to(context_input_ids.device), min_prior)
    pairs = _pairs(log_prior)
    runner = CausalRunner(
        model,
        context_input_ids.index_select(0, pairs),
        context_attention_mask.index_select(0, pairs),
        pad_token_id,
        select_row_kwargs(model_kwargs, context_input_ids.shape[0], pairs),
    )
    return _decode(
        runner,
        log_prior,
        pairs,
        decoding=decoding,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        length_penalty=length_penalty,
    )
