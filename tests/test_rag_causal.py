"""RAG with a decoder-only model, checked against brute force on a tiny Llama.

The reference runs the full model without cache on each unpadded (passage prompt + answer
prefix), one sequence at a time, and marginalizes by hand. Ours decodes all B*K prompts in one
left-padded batch with one shared cache.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor
from transformers import LlamaForCausalLM

from app.generation.rag import IGNORE_INDEX
from tests.tensor_rag import (
    causal_rag_sequence_generate,
    causal_rag_sequence_nll,
    causal_rag_token_generate,
    causal_rag_token_nll,
)
from tests.tiny import RAG_EOS, RAG_PAD, RAG_VOCAB, rag_llama

VOCAB, PAD, EOS = RAG_VOCAB, RAG_PAD, RAG_EOS


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models: intra-op thread hand-offs cost more than the math (6x on 2 busy cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(seed: int = 0) -> LlamaForCausalLM:
    # EOS likely enough that answers end at various lengths
    return rag_llama(seed=seed, eos_scale=3.0).eval()


def _prompts(batch: int, k: int, seed: int) -> list[list[Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        lengths = torch.randint(3, 9, (k,), generator=g).tolist()
        out.append([torch.randint(3, VOCAB, (n,), generator=g) for n in lengths])
    return out


def _pack(prompts: list[list[Tensor]], side: str) -> tuple[Tensor, Tensor]:
    rows = [p for q in prompts for p in q]
    width = max(len(p) for p in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(rows):
        sl = slice(0, len(p)) if side == "right" else slice(width - len(p), width)
        ids[i, sl], mask[i, sl] = p, 1
    return ids, mask


@torch.no_grad()
def _next_logprobs(model: LlamaForCausalLM, prompt: Tensor, prefix: list[int]) -> Tensor:
    seq = torch.cat([prompt, torch.tensor(prefix, dtype=torch.long)])[None]
    return torch.log_softmax(model(input_ids=seq).logits[0, -1], -1)


def _brute_token_greedy(
    model: LlamaForCausalLM, prompts: list[Tensor], log_prior: Tensor, new: int
) -> list[int]:
    prefix: list[int] = []
    for _ in range(new):
        lps = torch.stack([_next_logprobs(model, p, prefix) for p in prompts])  # [K, V]
        tok = int(torch.logsumexp(log_prior[:, None] + lps, 0).argmax())
        prefix.append(tok)
        if tok == EOS:
            break
    return prefix


@torch.no_grad()
def _brute_doc_logprob(model: LlamaForCausalLM, prompt: Tensor, answer: list[int]) -> Tensor:
    """log p(answer_t | prompt, answer_<t) [T], no cache, no padding."""
    seq = torch.cat([prompt, torch.tensor(answer, dtype=torch.long)])[None]
    lp = torch.log_softmax(model(input_ids=seq).logits[0, len(prompt) - 1 : -1], -1)
    return lp.gather(1, torch.tensor(answer)[:, None]).squeeze(1)


def _strip(row: Tensor) -> list[int]:
    out = []
    for t in row.tolist():
        out.append(t)
        if t == EOS:
            break
    return out


@pytest.mark.parametrize(("k", "seed"), [(3, 0), (5, 1)])
def test_token_greedy_equals_brute_force(k: int, seed: int) -> None:
    model = _model(seed)
    prompts = _prompts(3, k, seed=10 + seed)
    scores = torch.randn(3, k, generator=torch.Generator().manual_seed(seed)) * 2
    prior = torch.log_softmax(scores, -1)
    # precondition: the passages lead to different next tokens
    first = [{int(_next_logprobs(model, p, []).argmax()) for p in q} for q in prompts]
    assert sum(len(f) > 1 for f in first) >= 2, first
    expected = [_brute_token_greedy(model, prompts[b], prior[b], 8) for b in range(3)]
    for side in ("left", "right"):
        ids, mask = _pack(prompts, side)
        out = causal_rag_token_generate(
            model, ids, mask, scores, n_docs=k, max_new_tokens=8, eos_token_id=EOS,
            pad_token_id=PAD,
        )  # fmt: skip
        assert [_strip(r) for r in out.sequences] == expected, side
        # per-passage scores carried along equal a fresh no-cache pass
        for b in range(3):
            doc_lp = torch.stack(
                [_brute_doc_logprob(model, p, expected[b]).sum() for p in prompts[b]]
            )
            torch.testing.assert_close(out.doc_logprob[b], doc_lp, atol=1e-4, rtol=1e-4)
            posterior = torch.softmax(prior[b] + doc_lp, -1)
            torch.testing.assert_close(out.doc_posterior[b], posterior, atol=1e-5, rtol=1e-4)


def test_prompt_is_prefilled_once_and_steps_feed_one_token() -> None:
    model = _model(2)
    prompts = _prompts(2, 3, seed=20)
    ids, mask = _pack(prompts, "right")
    widths: list[tuple[int, int]] = []
    handle = model.model.register_forward_pre_hook(
        lambda _m, _a, kw: widths.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    try:
        for beams in (1, 3):
            widths.clear()
            causal_rag_token_generate(
                model, ids, mask, torch.zeros(2, 3), n_docs=3, max_new_tokens=5,
                num_beams=beams, eos_token_id=EOS, pad_token_id=PAD,
            )  # fmt: skip
            assert widths[0] == (6, ids.shape[1])  # all B*K prompts, once
            assert all(w[1] == 1 for w in widths[1:]), widths  # then one token per row
    finally:
        handle.remove()


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_nll_equals_brute_force(mode: str) -> None:
    model = _model(3)
    prompts = _prompts(3, 4, seed=30)
    scores = torch.randn(3, 4, generator=torch.Generator().manual_seed(3))
    prior = torch.log_softmax(scores, -1)
    g = torch.Generator().manual_seed(31)
    labels = torch.randint(3, VOCAB, (3, 5), generator=g)
    labels[:, -1] = EOS
    labels[1, 2:] = IGNORE_INDEX
    expected = []
    for b in range(3):
        answer = [t for t in labels[b].tolist() if t != IGNORE_INDEX]
        per_doc = torch.stack([_brute_doc_logprob(model, p, answer) for p in prompts[b]])  # [K, T]
        if mode == "token":
            expected.append(-torch.logsumexp(prior[b][:, None] + per_doc, 0).sum())
        else:
            expected.append(-torch.logsumexp(prior[b] + per_doc.sum(-1), 0))
    ids, mask = _pack(prompts, "right")
    with torch.no_grad():
        loss_fn = causal_rag_token_nll if mode == "token" else causal_rag_sequence_nll
        ours = loss_fn(model, ids, mask, scores, labels, n_docs=4, pad_token_id=PAD)
    torch.testing.assert_close(ours, torch.stack(expected).mean(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("decoding", ["thorough", "fast"])
def test_sequence_generate_equals_brute_force(decoding: str) -> None:
    model = _model(4)
    prompts = _prompts(3, 3, seed=40)
    scores = torch.randn(3, 3, generator=torch.Generator().manual_seed(4)) * 2
    prior = torch.log_softmax(scores, -1)
    ids, mask = _pack(prompts, "left")
    out = causal_rag_sequence_generate(
        model, ids, mask, scores, n_docs=3, max_new_tokens=6, eos_token_id=EOS,
        pad_token_id=PAD, decoding=decoding,  # type: ignore[arg-type]
    )  # fmt: skip
    n_distinct = 0
    for b in range(3):
        proposals = [_brute_token_greedy(model, [p], torch.zeros(1), 6) for p in prompts[b]]
        candidates = list(dict.fromkeys(tuple(c) for c in proposals))
        n_distinct += len(candidates) > 1
        table = torch.full((len(candidates), 3), float("-inf"))
        for c, cand in enumerate(candidates):
            for k, p in enumerate(prompts[b]):
                if decoding == "thorough" or tuple(proposals[k]) == cand:
                    table[c, k] = _brute_doc_logprob(model, p, list(cand)).sum()
        marginal = torch.logsumexp(prior[b] + table, -1)
        best = int(marginal.argmax())
        # every distinct hypothesis comes back, ranked by log p(y|x)
        ranked = sorted(range(len(candidates)), key=lambda c: -float(marginal[c]))
        assert [c.tokens for c in out.candidates[b]] == [candidates[c] for c in ranked]
        got = torch.tensor([c.logprob for c in out.candidates[b]])
        torch.testing.assert_close(got, marginal[ranked], atol=1e-4, rtol=1e-5)
        assert _strip(out.sequences[b]) == list(candidates[best])
        torch.testing.assert_close(out.logprob[b], marginal[best], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(out.doc_logprob[b], table[best], atol=1e-4, rtol=1e-5)
    assert n_distinct >= 2  # passages proposed different answers


def test_beam_search_scores_its_answer_exactly() -> None:
    model = _model(5)
    prompts = _prompts(2, 3, seed=50)
    scores = torch.randn(2, 3, generator=torch.Generator().manual_seed(5))
    prior = torch.log_softmax(scores, -1)
    ids, mask = _pack(prompts, "right")
    beam = causal_rag_token_generate(
        model, ids, mask, scores, n_docs=3, max_new_tokens=6, num_beams=4, eos_token_id=EOS,
        pad_token_id=PAD,
    )  # fmt: skip
    for b in range(2):
        answer = _strip(beam.sequences[b])
        per_doc = torch.stack([_brute_doc_logprob(model, p, answer) for p in prompts[b]])
        token_marginal = torch.logsumexp(prior[b][:, None] + per_doc, 0).sum()
        torch.testing.assert_close(beam.logprob[b], token_marginal, atol=1e-4, rtol=1e-5)
        doc_lp = per_doc.sum(-1)
        torch.testing.assert_close(beam.doc_logprob[b], doc_lp, atol=1e-4, rtol=1e-5)
