"""RAG decoding on tensors, as transformers' RAG classes take them, through the one decoding
path (app/generation/step_batch.py): the reference tests feed the same `context_input_ids`,
`context_attention_mask` and `doc_scores` to transformers and to lorag.

A question of the [B*K, L] layout is one request of the step batch, its K passages' prompts
the unpadded rows; all B join at step 0, as a whole batch does in the server. `host` stands in
for a Generator around a bare model with no tokenizer (the tests' vocabularies are ids).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftModel
from torch import Tensor

from app.contracts import BASE_ADAPTER
from app.generation.config import DecodingConfig
from app.generation.family import family_for
from app.generation.modes.base import Answer
from app.generation.rag import Candidate
from app.generation.rag_loss import rag_nll
from app.generation.step_batch import Decoded, StepBatch


@dataclass(frozen=True, slots=True)
class RagOutput:
    """One answer per question, as transformers' RAG generate returns them (and more).

    sequences [B, T] generated tokens, pad after each end; logprob [B] log p(y|x) under the
    mode; doc_logprob [B, K] log p(y|x,z), -inf where pruned; doc_posterior [B, K] p(z|x,y);
    candidates: RAG-Sequence's distinct hypotheses per question, best first.
    """

    sequences: Tensor
    logprob: Tensor
    doc_logprob: Tensor
    doc_posterior: Tensor
    candidates: tuple[tuple[Candidate, ...], ...] = ()


class BareHost:
    """What the step batch needs of a generator, for a model without a tokenizer."""

    def __init__(self, model: Any, *, eos: int, pad: int) -> None:
        self.model = model
        self.family = family_for(model)
        self.device = next(model.parameters()).device
        self.batched = None
        self.eos_ids = {eos}
        self.rag_eos = eos
        self.pad_id = pad
        self.weights_epoch = 0
        self.base_epoch = 0

    def adapter_kwargs(self, adapters: Sequence[str | None]) -> dict[str, Any]:
        if not isinstance(self.model, PeftModel):
            return {}
        return {"adapter_names": [BASE_ADAPTER if a is None else a for a in adapters]}

    def decode_answer(self, ids: Sequence[int]) -> Decoded:
        ids = list(ids)
        return Decoded("", ids.index(self.rag_eos) + 1 if self.rag_eos in ids else len(ids))

    def cannot_step(self) -> str | None:
        return None


def rag_generate(
    model: Any,
    context_input_ids: Tensor,  # [B*K, L] K passages of a question contiguous, any padding
    context_attention_mask: Tensor,  # [B*K, L]
    doc_scores: Tensor,  # [B, K]
    *,
    mode: str,
    n_docs: int,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    decoder_start_token_id: int | None = None,
    num_beams: int = 1,
    min_prior: float | None = None,
    decoding: str = "thorough",
    limits: Sequence[int] | None = None,
    adapter_names: Sequence[str] | None = None,  # [B*K] PEFT names, one per row
) -> RagOutput:
    host = BareHost(model, eos=eos_token_id, pad=pad_token_id)
    if decoder_start_token_id is not None:
        assert getattr(host.family, "start", None) == decoder_start_token_id
    batch = StepBatch(host, DecodingConfig(num_beams=num_beams, min_prior=min_prior))
    rows = context_input_ids.shape[0] // n_docs
    assert tuple(doc_scores.shape) == (rows, n_docs), "doc_scores must be [B, n_docs]"
    requests = []
    for b in range(rows):
        span = range(b * n_docs, (b + 1) * n_docs)
        prompts = [context_input_ids[i][context_attention_mask[i].bool()].tolist() for i in span]
        names = adapter_names[b * n_docs : (b + 1) * n_docs] if adapter_names else [BASE_ADAPTER]
        assert len(set(names)) == 1, "a question's passages share its adapter"
        adapter = None if names[0] == BASE_ADAPTER else names[0]
        limit = limits[b] if limits is not None else max_new_tokens
        scores = doc_scores[b].tolist()
        requests.append(batch.rag_request(b, adapter, limit, mode, prompts, scores, decoding))
    done = dict(batch.join_requests(requests))
    while len(batch):
        done.update(batch.step())
    return pack([done[b] for b in range(rows)], pad_token_id)


def pack(answers: Sequence[Answer], pad: int) -> RagOutput:
    width = max(len(a.ids) for a in answers)
    sequences = torch.full((len(answers), width), pad, dtype=torch.long)
    for b, a in enumerate(answers):
        sequences[b, : len(a.ids)] = torch.tensor(a.ids, dtype=torch.long)
    return RagOutput(
        sequences,
        torch.tensor([a.logprob for a in answers]),
        torch.tensor([list(a.doc_logprob) for a in answers]),
        torch.tensor([a.weights for a in answers]),
        tuple(a.candidates for a in answers),
    )


def rag_token_generate(model: Any, ids: Tensor, mask: Tensor, scores: Tensor, **kw: Any):
    return rag_generate(model, ids, mask, scores, mode="token", **kw)


def rag_sequence_generate(model: Any, ids: Tensor, mask: Tensor, scores: Tensor, **kw: Any):
    return rag_generate(model, ids, mask, scores, mode="sequence", **kw)


def _nll(mode: str) -> Any:
    def loss(
        model: Any,
        ids: Tensor,
        mask: Tensor,
        scores: Tensor,
        labels: Tensor,
        *,
        decoder_start_token_id: int | None = None,
        pad_token_id: int | None = None,  # the family reads both from the model's config
        **kw: Any,
    ) -> Tensor:
        family = family_for(model)
        if decoder_start_token_id is not None:
            assert getattr(family, "start", None) == decoder_start_token_id
        return rag_nll(family, model, ids, mask, scores, labels, mode=mode, **kw)  # type: ignore[arg-type]

    return loss


rag_token_nll = causal_rag_token_nll = _nll("token")
rag_sequence_nll = causal_rag_sequence_nll = _nll("sequence")
causal_rag_token_generate = rag_token_generate
causal_rag_sequence_generate = rag_sequence_generate
