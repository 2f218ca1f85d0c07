"""The training objectives, as (summed NLL, answer tokens) of a batch of examples.

concat: the server's prompt (every passage in one prompt, built by the generator's own
    PromptBuilder with the same token budget) and the teacher-forced answer; prompt tokens carry
    no loss. What the adapter learns is exactly what /ask will ask of it.
token / sequence: RAG-Token / RAG-Sequence marginal likelihood (app/generation/rag_loss.py), one
    prompt per (question, passage) pair, the document prior the softmax of the retrieval scores
    (uniform for explicit passages without scores).

Returning the sum and the count, not a mean, lets held-out loss be one per-token figure that does
not depend on how the examples were batched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from app.contracts import Passage
from app.generation.generator import Generator
from app.generation.rag import IGNORE_INDEX
from app.generation.rag_loss import Mode, rag_nll
from app.training.options import Objective


@dataclass(frozen=True, slots=True)
class Sample:
    """A training example with its passages settled (given in the data, or retrieved)."""

    question: str
    answer: str
    passages: tuple[Passage, ...]
    scores: tuple[float, ...] | None  # None: uniform prior


def answer_ids(g: Generator, answers: Sequence[str]) -> list[list[int]]:
    """Target token ids per answer, ending where generation stops (EOS)."""
    tok = g.tokenizer
    if g.kind == "seq2seq":
        # the tokenizer's own target encoding (T5 appends </s>; BART wraps in <s> ... </s>)
        return [list(ids) for ids in tok(text_target=list(answers))["input_ids"]]
    eos = tok.eos_token_id
    rows = tok(list(answers), add_special_tokens=False)["input_ids"]
    return [[*ids, eos] for ids in rows]


def _labels(rows: Sequence[Sequence[int]], device: torch.device) -> Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out.to(device)  # [B, T]


def batch_nll(
    g: Generator,
    samples: Sequence[Sample],
    objective: Objective,
    *,
    reserve: int,
    doc_scores: Tensor | None = None,
) -> tuple[Tensor, int]:
    """(sum of answer-token NLL over the batch, number of answer tokens); differentiable.

    reserve: the max_new_tokens the server will budget prompts with (so prompts match /ask).
    doc_scores: [B, K] retrieval scores that carry gradient to a question encoder (token and
    sequence only; -inf where a question has fewer passages); overrides the samples' scores.
    """
    targets = answer_ids(g, [s.answer for s in samples])
    reserve = max(reserve, max(len(t) for t in targets))
    labels = _labels(targets, g.device)  # [B, T]
    n_tokens = int((labels != IGNORE_INDEX).sum())
    if objective == "concat":
        return _concat_nll(g, samples, labels, reserve), n_tokens
    return _marginal_nll(g, samples, labels, objective, reserve, doc_scores), n_tokens


def _concat_nll(g: Generator, samples: Sequence[Sample], labels: Tensor, reserve: int) -> Tensor:
    limit = g.max_input_tokens(reserve)
    prompts = [g.prompts.build(s.question, s.passages, limit) for s in samples]
    enc = g._encode(prompts, limit)  # [B, L], the padding side the backend serves with
    if g.kind == "seq2seq":
        out = g.model(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels
        )
        n = int((labels != IGNORE_INDEX).sum())
        return out.loss * n  # transformers averages over non-ignored tokens
    valid = labels != IGNORE_INDEX
    logits = g.family.answer_logits(
        g.model, enc["input_ids"], enc["attention_mask"], labels.clamp(min=0), valid.long(), {}
    )  # [B, T, V]
    nll = F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="sum")
    return nll


def _marginal_nll(
    g: Generator,
    samples: Sequence[Sample],
    labels: Tensor,
    mode: Objective,
    reserve: int,
    doc_scores: Tensor | None = None,
) -> Tensor:
    limit = g.max_input_tokens(reserve)
    n_docs = max(len(s.passages) for s in samples)
    prompts: list[str] = []
    scores = torch.full((len(samples), n_docs), float("-inf"))  # [B, K]; -inf = no passage
    for b, s in enumerate(samples):
        # a question with fewer passages repeats its first one with zero prior weight
        padded = list(s.passages) + [s.passages[0]] * (n_docs - len(s.passages))
        prompts += [g.prompts.build(s.question, [p], limit) for p in padded]
        given = s.scores if s.scores is not None else (0.0,) * len(s.passages)
        scores[b, : len(given)] = torch.tensor(given)
    enc = g._encode(prompts, limit)  # [B*K, L]
    if doc_scores is not None:
        if tuple(doc_scores.shape) != tuple(scores.shape):
            raise ValueError(f"doc_scores {tuple(doc_scores.shape)} != {tuple(scores.shape)}")
        scores = doc_scores
    scores = scores.to(g.device)
    mode_: Mode = "token" if mode == "token" else "sequence"
    mean = rag_nll(
        g.family,
        g.model,
        enc["input_ids"],
        enc["attention_mask"],
        scores,
        labels,
        mode=mode_,
        n_docs=n_docs,
    )
    return mean * len(samples)  # rag losses average the per-question NLL
