"""Answer a batch of rows, each in its own decoding mode.

- concat: the generator reads the question with all k passages in one prompt (one row).
- token: RAG-Token, p(y_i|x, y_<i) = sum_z p(z|x) p(y_i|x, z, y_<i), one row per passage.
- sequence: RAG-Sequence, per-passage hypotheses marginalized over passages ("thorough"
  rescoring, or "fast", where a passage that did not propose a hypothesis contributes 0).

The marginalized modes return the posterior p(z|x, y) over the passages for the answer they
chose, which is what the citations report; concat leaves the weights to the caller (the
retrieval prior). Rows that can share one decoding call (same mode, number of passages and,
where the search is not prefix-consistent, answer length) are batched together, each with its
own adapter.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import BatchEncoding

from app.contracts import GenRow
from app.generation.backends import Generator
from app.generation.rag import RagOutput
from app.generation.rag_sequence import causal_rag_sequence_generate, rag_sequence_generate
from app.generation.rag_token import causal_rag_token_generate, rag_token_generate


@dataclass(frozen=True, slots=True)
class Answer:
    text: str
    weights: list[float] | None  # p(z|x, y) per passage for token/sequence; None for concat
    tokens: int = 0  # tokens generated for the answer


class RagDecoder:
    def __init__(
        self, generator: Generator, *, num_beams: int = 1, min_prior: float | None = None
    ) -> None:
        self.generator = generator
        self.num_beams = num_beams
        self.min_prior = min_prior

    def run(self, rows: Sequence[GenRow]) -> list[Answer]:
        answers: list[Answer | None] = [None] * len(rows)
        groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
        for i, row in enumerate(rows):
            groups[self._group_key(row)].append(i)
        for key, members in groups.items():
            batch = [rows[i] for i in members]
            if key[0] == "concat":
                done = [
                    Answer(d.text, None, d.tokens) for d in self.generator.generate_decoded(batch)
                ]
            else:
                done = self._marginalized(batch)
            for i, answer in zip(members, done, strict=True):
                answers[i] = answer
        return [a for a in answers if a is not None]

    def _group_key(self, row: GenRow) -> tuple[Any, ...]:
        if row.mode == "concat":
            return ("concat",)
        # greedy RAG-Token is prefix-consistent, so rows of any length share a call and are cut
        # to their own limit; beams and RAG-Sequence's hypotheses are not, so lengths split
        exact_length = row.mode == "sequence" or self.num_beams > 1
        return (
            row.mode,
            row.decoding,
            len(row.passages),
            row.max_new_tokens if exact_length else None,
        )

    def _marginalized(self, rows: Sequence[GenRow]) -> list[Answer]:
        gen = self.generator
        n_docs = len(rows[0].passages)
        if n_docs == 0:
            return [Answer("", []) for _ in rows]
        longest = max(r.max_new_tokens for r in rows)
        encodings = [
            gen.encode_pairs(r.question, r.passages, reserve=r.max_new_tokens) for r in rows
        ]
        ids, mask = _stack(encodings, gen.tokenizer.pad_token_id, left=gen.kind == "causal")
        scores = torch.tensor([list(r.scores) for r in rows], dtype=torch.float32)  # [B, K]
        extra = gen.adapter_kwargs([r.adapter for r in rows for _ in range(n_docs)])
        if rows[0].mode == "token" and self.num_beams == 1:  # rows of any length share a call
            extra["limits"] = [r.max_new_tokens for r in rows]
        out = self._search(rows[0])(
            ids, mask, scores.to(ids.device), n_docs=n_docs, max_new_tokens=longest, **extra
        )
        answers = []
        for b, row in enumerate(rows):
            decoded = gen.decode_answer(out.sequences[b, : row.max_new_tokens])
            answers.append(Answer(decoded.text, out.doc_posterior[b].tolist(), decoded.tokens))
        return answers

    def _search(self, row: GenRow) -> Callable[..., RagOutput]:
        gen = self.generator
        model = gen.model
        common: dict[str, Any] = {
            "eos_token_id": rag_eos_id(gen),
            "pad_token_id": gen.tokenizer.pad_token_id,
            "num_beams": self.num_beams,
            "min_prior": self.min_prior,
        }
        if row.mode == "sequence":
            common["decoding"] = row.decoding
        if gen.kind == "seq2seq":
            config: Any = model.config
            common["decoder_start_token_id"] = config.decoder_start_token_id
            fn: Callable[..., RagOutput] = (
                rag_token_generate if row.mode == "token" else rag_sequence_generate
            )
        else:
            fn = causal_rag_token_generate if row.mode == "token" else causal_rag_sequence_generate

        def call(*args: Any, **kwargs: Any) -> RagOutput:
            with torch.inference_mode():
                return fn(model, *args, **common, **kwargs)

        return call


def _stack(
    encodings: Sequence[BatchEncoding], pad_id: int, *, left: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate per-question [K, L_b] encodings into [B*K, max L], padding each to max L."""
    width = max(int(e["input_ids"].shape[1]) for e in encodings)
    ids, masks = [], []
    for e in encodings:
        gap = width - int(e["input_ids"].shape[1])
        pad = (gap, 0) if left else (0, gap)
        ids.append(torch.nn.functional.pad(e["input_ids"], pad, value=pad_id))
        masks.append(torch.nn.functional.pad(e["attention_mask"], pad, value=0))
    return torch.cat(ids), torch.cat(masks)


def rag_eos_id(gen: Generator) -> int:
    """The one end token the RAG search stops on: the tokenizer's (<|im_end|> for chat models)."""
    eos = gen.tokenizer.eos_token_id
    return int(eos) if eos is not None else min(gen.eos_ids)
