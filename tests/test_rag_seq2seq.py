"""RAG-Token / RAG-Sequence on an encoder-decoder, checked against transformers' RAG models.

The references are `RagTokenForGeneration` / `RagSequenceForGeneration` built from a tiny
`RagConfig` (tests/tiny.py's rag_config: tiny DPR question encoder, tiny BART or T5 generator)
and fed `context_input_ids`, `context_attention_mask` and `doc_scores` directly (no retriever).
Our functions get the very same generator module. Conventions that differ, each accounted for
where it matters:

- LABELS: transformers' RAG `labels` double as decoder inputs, so they begin with the decoder
  start token and `get_nll` shifts them left (filling with pad) to get targets; ours are the
  targets themselves (IGNORE_INDEX = -100 where no loss), decoder inputs = shift right.
- PAD: transformers masks target positions equal to pad_token_id; we mask -100.
- REDUCE: transformers sums over the batch (reduce_loss=True) or returns per-question losses;
  we return the batch mean.
- SMOOTHING: transformers' RAG-Sequence adds the doc log prior once per vocabulary entry inside
  the smoothing term; ours adds it once (checked against a direct formula instead).
- MAX_LENGTH: `RagTokenForGeneration.generate` ignores max_new_tokens and stops at max_length,
  counting the decoder start token; its output begins with that token, ours holds new tokens.
- ONE_TOKEN: transformers' RAG-Sequence `get_nll` adds the doc log prior at the second target
  position, so the prior vanishes for a one-token target; likelihoods are compared per passage.
- NO_MASK: `RagSequenceForGeneration.generate` proposes candidates without the context
  attention mask; its comparison uses unpadded passages.
- EXCLUDE_BOS: `RagSequenceForGeneration.generate` drops the first target score when every
  candidate starts with bos_token_id; the tests assert no candidate does, so both score all.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor
from transformers import PreTrainedModel, RagSequenceForGeneration, RagTokenForGeneration

from app.errors import InvalidInputError
from app.generation.config import DecodingConfig
from app.generation.rag import IGNORE_INDEX, doc_prior
from tests.tensor_rag import (
    rag_sequence_generate,
    rag_sequence_nll,
    rag_token_generate,
    rag_token_nll,
)
from tests.tiny import RAG_BOS, RAG_EOS, RAG_PAD, RAG_VOCAB, favour_eos, rag_config

VOCAB, BOS, PAD, EOS = RAG_VOCAB, RAG_BOS, RAG_PAD, RAG_EOS


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models: intra-op thread hand-offs cost more than the math (6x on 2 busy cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _models(
    arch: str, n_docs: int, seed: int = 0
) -> tuple[RagTokenForGeneration, RagSequenceForGeneration, PreTrainedModel]:
    torch.manual_seed(seed)
    config = rag_config(arch, n_docs)
    token = RagTokenForGeneration(config).eval()
    generator = token.generator
    if arch == "bart":  # make EOS likely enough that answers end at different lengths
        favour_eos(generator)
    sequence = RagSequenceForGeneration(config).eval()
    sequence.rag.generator = generator  # both references share our generator
    return token, sequence, generator


def _start_id(generator: PreTrainedModel) -> int:
    return int(generator.config.decoder_start_token_id)


def _inputs(
    batch: int, n_docs: int, seed: int, padded: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    length = 9
    ids = torch.randint(3, VOCAB, (batch * n_docs, length), generator=g)
    mask = torch.ones_like(ids)
    for row in range(batch * n_docs if padded else 0):  # passages of different lengths
        keep = int(torch.randint(6, length + 1, (1,), generator=g))
        ids[row, keep:], mask[row, keep:] = PAD, 0
    scores = torch.randn(batch, n_docs, generator=g) * 2
    return ids, mask, scores


def _per_passage_greedy(generator: PreTrainedModel, ids: Tensor, mask: Tensor, n: int) -> Tensor:
    out = generator.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, num_beams=1
    )
    return out[:, 1:]


def _assert_passages_matter(generator: PreTrainedModel, ids: Tensor, mask: Tensor, k: int) -> None:
    """Precondition: within each question, passages lead to different greedy answers."""
    outs = _per_passage_greedy(generator, ids, mask, 6)
    outs = outs.view(-1, k, outs.shape[-1])
    distinct = [len({tuple(row.tolist()) for row in q}) for q in outs]
    assert max(distinct) > 1 and sum(d > 1 for d in distinct) >= len(distinct) // 2, distinct


def _hf_labels(labels: Tensor, start: int) -> Tensor:
    """Our targets -> transformers' RAG labels (decoder inputs): [start] + targets, pad for -100."""
    filled = labels.masked_fill(labels == IGNORE_INDEX, PAD)
    return torch.cat([torch.full((labels.shape[0], 1), start), filled], dim=1)


def _labels(batch: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(3, VOCAB, (batch, 6), generator=g)
    labels[:, -1] = EOS
    labels[0, 3:] = IGNORE_INDEX  # a shorter target
    return labels


def _rel(a: Tensor, b: Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp(min=1e-6)).max())


@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_token_nll_equals_transformers(arch: str) -> None:
    token_ref, _, gen = _models(arch, n_docs=4)
    ids, mask, scores = _inputs(3, 4, seed=1)
    _assert_passages_matter(gen, ids, mask, 4)
    labels = _labels(3, seed=2)
    hf_labels = _hf_labels(labels, _start_id(gen))
    for eps in (0.0, 0.1):
        token_ref.config.label_smoothing = eps
        with torch.no_grad():
            ref = token_ref(
                context_input_ids=ids,
                context_attention_mask=mask,
                doc_scores=scores,
                labels=hf_labels,
                n_docs=4,
                reduce_loss=True,  # REDUCE: a sum over the batch
            ).loss
            ours = rag_token_nll(
                gen, ids, mask, scores, labels, n_docs=4, decoder_start_token_id=_start_id(gen),
                pad_token_id=PAD, epsilon=eps,
            )  # fmt: skip
        assert _rel(ours * 3, ref) < 1e-4, (eps, float(ours * 3), float(ref))


@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_sequence_nll_equals_transformers(arch: str) -> None:
    _, seq_ref, gen = _models(arch, n_docs=3)
    ids, mask, scores = _inputs(4, 3, seed=3)
    _assert_passages_matter(gen, ids, mask, 3)
    labels = _labels(4, seed=4)
    with torch.no_grad():
        out = seq_ref(
            context_input_ids=ids,
            context_attention_mask=mask,
            doc_scores=scores,
            labels=_hf_labels(labels, _start_id(gen)),
            n_docs=3,
            reduce_loss=False,
            exclude_bos_score=False,
        )
        ours = rag_sequence_nll(
            gen, ids, mask, scores, labels, n_docs=3, decoder_start_token_id=_start_id(gen),
            pad_token_id=PAD,
        )  # fmt: skip
    assert _rel(ours, out.loss.mean()) < 1e-4
    # RAG-Token and RAG-Sequence losses differ on these weights: the passages matter
    with torch.no_grad():
        token = rag_token_nll(
            gen, ids, mask, scores, labels, n_docs=3, decoder_start_token_id=_start_id(gen),
            pad_token_id=PAD,
        )  # fmt: skip
    assert abs(float(token - ours)) > 1e-2

    # SMOOTHING, checked against the formula written out from transformers' forward logits
    eps = 0.2
    lp = torch.log_softmax(out.logits, -1).view(4, 3, 7, VOCAB)[:, :, :-1]  # drop the EOS step
    valid = (labels != IGNORE_INDEX)[:, None, :]
    prior = torch.log_softmax(scores, -1)
    vocab_sum = (lp.sum(-1) * valid).sum(-1)
    smooth = -torch.logsumexp(prior + vocab_sum, dim=1)
    expected = ((1 - eps) * out.loss + eps / VOCAB * smooth).mean()
    with torch.no_grad():
        smoothed = rag_sequence_nll(
            gen, ids, mask, scores, labels, n_docs=3, decoder_start_token_id=_start_id(gen),
            pad_token_id=PAD, epsilon=eps,
        )  # fmt: skip
    assert _rel(smoothed, expected) < 1e-4


@pytest.mark.parametrize(
    ("arch", "n_docs", "seed", "data_seed"),
    [("bart", 3, 0, 10), ("bart", 5, 2, 12), ("t5", 4, 2, 12)],
)
def test_token_greedy_equals_transformers(
    arch: str, n_docs: int, seed: int, data_seed: int
) -> None:
    token_ref, _, gen = _models(arch, n_docs, seed=seed)
    ids, mask, scores = _inputs(4, n_docs, seed=data_seed)
    _assert_passages_matter(gen, ids, mask, n_docs)
    new = 8
    ref = token_ref.generate(
        context_input_ids=ids,
        context_attention_mask=mask,
        doc_scores=scores,
        n_docs=n_docs,
        max_length=new + 1,  # MAX_LENGTH
        num_beams=1,
        do_sample=False,
    )[:, 1:]
    ours = rag_token_generate(
        gen, ids, mask, scores, n_docs=n_docs, max_new_tokens=new, eos_token_id=EOS,
        pad_token_id=PAD, decoder_start_token_id=_start_id(gen),
    )  # fmt: skip
    assert ours.sequences.shape == ref.shape
    assert torch.equal(ours.sequences, ref)
    if arch == "bart":  # answers of different lengths were compared
        lengths = {int((row != PAD).sum()) for row in ref}
        assert len(lengths) > 1, ref


def test_token_beam_equals_transformers() -> None:
    token_ref, _, gen = _models("bart", 3, seed=3)
    ids, mask, scores = _inputs(3, 3, seed=13)
    for beams in (2, 4):
        ref = token_ref.generate(
            context_input_ids=ids,
            context_attention_mask=mask,
            doc_scores=scores,
            n_docs=3,
            max_length=8,
            num_beams=beams,
            do_sample=False,
        )[:, 1:]
        ours = rag_token_generate(
            gen, ids, mask, scores, n_docs=3, max_new_tokens=7, num_beams=beams,
            eos_token_id=EOS, pad_token_id=PAD, decoder_start_token_id=_start_id(gen),
        )  # fmt: skip
        width = max(ref.shape[1], ours.sequences.shape[1])
        pad = torch.nn.functional.pad
        assert torch.equal(
            pad(ours.sequences, (0, width - ours.sequences.shape[1]), value=PAD),
            pad(ref, (0, width - ref.shape[1]), value=PAD),
        )


def _teacher_forced_doc_logprob(
    seq_ref: RagSequenceForGeneration, ids: Tensor, mask: Tensor, seqs: Tensor, start: int
) -> Tensor:
    """log p(y_b|x, z_k) [B, K] by transformers' forward, one row per (question, passage)."""
    k = seq_ref.config.n_docs
    labels = _hf_labels(seqs, start)
    with torch.no_grad():
        logits = seq_ref(
            context_input_ids=ids,
            context_attention_mask=mask,
            doc_scores=torch.zeros(seqs.shape[0], k),
            labels=labels,
            n_docs=k,
        ).logits
    lp = torch.log_softmax(logits, -1).view(seqs.shape[0], k, -1, VOCAB)[:, :, :-1]
    target = seqs.clamp(min=0)[:, None, :, None].expand(-1, k, -1, 1)
    valid = (seqs != PAD)[:, None]
    return (lp.gather(-1, target).squeeze(-1) * valid).sum(-1)


def test_token_logprob_and_posterior_match_teacher_forcing() -> None:
    """The per-passage scores carried along decoding equal a fresh teacher-forced pass."""
    _, seq_ref, gen = _models("bart", 4, seed=4)
    ids, mask, scores = _inputs(3, 4, seed=14)
    for beams in (1, 3):
        out = rag_token_generate(
            gen, ids, mask, scores, n_docs=4, max_new_tokens=6, num_beams=beams,
            eos_token_id=EOS, pad_token_id=PAD, decoder_start_token_id=_start_id(gen),
        )  # fmt: skip
        doc_lp = _teacher_forced_doc_logprob(seq_ref, ids, mask, out.sequences, _start_id(gen))
        torch.testing.assert_close(out.doc_logprob, doc_lp, atol=1e-4, rtol=1e-4)
        posterior = torch.softmax(torch.log_softmax(scores, -1) + doc_lp, -1)
        torch.testing.assert_close(out.doc_posterior, posterior, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.doc_posterior.sum(-1), torch.ones(3))
        # RAG-Token's log p(y|x) is a product of per-step mixtures: not the sequence mixture
        labels = out.sequences.masked_fill(out.sequences == PAD, IGNORE_INDEX)
        with torch.no_grad():
            nll = rag_token_nll(
                gen, ids, mask, scores, labels, n_docs=4, decoder_start_token_id=_start_id(gen),
                pad_token_id=PAD, epsilon=0.0,
            )  # fmt: skip
        assert math.isclose(-float(out.logprob.mean()), float(nll), rel_tol=1e-4)


@pytest.mark.parametrize(("n_docs", "beams"), [(3, 1), (4, 1), (3, 2)])
def test_sequence_generate_equals_transformers(n_docs: int, beams: int) -> None:
    _, seq_ref, gen = _models("bart", n_docs, seed=5)
    # NO_MASK: transformers' RagSequenceForGeneration.generate sets attention_mask=None when
    # its generator proposes candidates, so passages are unpadded here (mask all ones)
    ids, mask, scores = _inputs(4, n_docs, seed=20 + n_docs, padded=False)
    _assert_passages_matter(gen, ids, mask, n_docs)
    candidates = gen.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=6, num_beams=beams,
        num_return_sequences=beams, do_sample=False,
    )  # fmt: skip
    assert not bool((candidates[:, 1] == BOS).any())  # EXCLUDE_BOS does not apply
    ref = seq_ref.generate(
        context_input_ids=ids,
        context_attention_mask=mask,
        doc_scores=scores,
        n_docs=n_docs,
        max_new_tokens=6,
        num_beams=beams,
        do_sample=False,
    )[:, 1:]
    ours = rag_sequence_generate(
        gen, ids, mask, scores, n_docs=n_docs, max_new_tokens=6, num_beams=beams,
        eos_token_id=EOS, pad_token_id=PAD, decoder_start_token_id=_start_id(gen),
    )  # fmt: skip
    width = ours.sequences.shape[1]
    assert torch.equal(ours.sequences, ref[:, :width])
    assert bool((ref[:, width:] == PAD).all())
    # the reported log p(y|x): transformers' per-passage likelihoods mixed by the prior (not its
    # loss: ONE_TOKEN, its get_nll adds the prior at the second target position and so drops it
    # for a one-token answer such as a lone EOS)
    doc_lp = _teacher_forced_doc_logprob(seq_ref, ids, mask, ours.sequences, _start_id(gen))
    torch.testing.assert_close(ours.doc_logprob, doc_lp, atol=1e-4, rtol=1e-4)
    expected = torch.logsumexp(torch.log_softmax(scores, -1) + doc_lp, dim=-1)
    torch.testing.assert_close(ours.logprob, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.doc_posterior.sum(-1), torch.ones(4))


def test_encoder_runs_once_per_pair() -> None:
    """One encoder call over all B*K rows whatever the length; the decoder then gets one new
    token per row and step (its KV cache is reused), plus, for "thorough", one rescoring pass
    per question (each is scored the step its last hypothesis ends)."""
    _, _, gen = _models("bart", 3, seed=6)
    ids, mask, scores = _inputs(2, 3, seed=30)
    rows: list[int] = []
    widths: list[int] = []
    hooks = [
        gen.get_encoder().register_forward_hook(
            lambda _m, _i, out: rows.append(out.last_hidden_state.shape[0])
        ),
        gen.get_decoder().register_forward_pre_hook(
            lambda _m, _a, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True
        ),
    ]
    kwargs = {
        "n_docs": 3,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
        "decoder_start_token_id": _start_id(gen),
    }
    try:
        for new in (1, 8):
            for beams in (1, 3):
                for fn, extra in (
                    (rag_token_generate, {}),
                    (rag_sequence_generate, {"decoding": "thorough"}),
                    (rag_sequence_generate, {"decoding": "fast"}),
                ):
                    rows.clear()
                    widths.clear()
                    fn(
                        gen,
                        ids,
                        mask,
                        scores,
                        max_new_tokens=new,
                        num_beams=beams,
                        **kwargs,
                        **extra,
                    )
                    case = (fn.__name__, extra, new, beams)
                    assert rows == [6], (case, rows)
                    scored = 2 if extra.get("decoding") == "thorough" else 0  # B = 2 questions
                    assert 1 <= len(widths) - scored <= new, (case, widths)
                    steps = widths[: len(widths) - scored]
                    assert steps == [1] * len(steps), (case, widths)
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("mode", ["token", "fast", "thorough"])
def test_overwhelming_prior_dominates(mode: str) -> None:
    _, seq_ref, gen = _models("bart", 3, seed=7)
    ids, mask, _ = _inputs(3, 3, seed=40)
    per_passage = _per_passage_greedy(gen, ids, mask, 6)
    per_passage = per_passage.view(3, 3, per_passage.shape[-1])
    kwargs = {} if mode == "token" else {"decoding": mode}
    fn = rag_token_generate if mode == "token" else rag_sequence_generate
    for winner in range(3):
        scores = torch.zeros(3, 3)
        scores[:, winner] = 60.0  # p(z|x) ~ 1 - 1e-26
        out = fn(
            gen, ids, mask, scores, n_docs=3, max_new_tokens=6, eos_token_id=EOS,
            pad_token_id=PAD, decoder_start_token_id=_start_id(gen), **kwargs,
        )  # fmt: skip
        expected = per_passage[:, winner]
        width = out.sequences.shape[1]
        if mode == "thorough":  # the winner's likeliest candidate, maybe another's proposal
            own = _teacher_forced_doc_logprob(seq_ref, ids, mask, expected, _start_id(gen))
            assert bool((out.doc_logprob[:, winner] >= own[:, winner] - 1e-4).all())
        else:  # the winner's own greedy answer
            assert torch.equal(out.sequences, expected[:, :width])
        torch.testing.assert_close(out.doc_posterior[:, winner], torch.ones(3))
        torch.testing.assert_close(out.doc_posterior.sum(-1), torch.ones(3))


def _switch_point(table: Tensor, fast: bool) -> float:
    """Prior logit d (passages [d, 0]) where the pick flips from answer 0 to answer 1.

    table[c, k] = log p(y_c|x, z_k); answer c was proposed by passage c."""

    def picks_first(d: float) -> bool:
        prior = torch.log_softmax(torch.tensor([d, 0.0]), -1)
        if fast:  # a passage that did not propose y contributes 0
            return bool(prior[0] + table[0, 0] > prior[1] + table[1, 1])
        joint = torch.logsumexp(prior + table, dim=-1)  # [2]
        return bool(joint[0] > joint[1])

    lo, hi = -40.0, 40.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if picks_first(mid) else (mid, hi)
    return (lo + hi) / 2


def test_fast_and_thorough_differ_on_a_constructed_prior() -> None:
    """Passage B is passage A with one token changed, so each passage gives the other's answer a
    real likelihood; among such pairs take one where A and B propose different answers. The
    per-passage likelihoods do not depend on the prior, so a prior placed between the point where
    "fast" flips answers and the point where "thorough" does makes the two modes disagree."""
    _, seq_ref, gen = _models("bart", 2, seed=8)
    g = torch.Generator().manual_seed(51)
    n = 24
    base = torch.randint(3, VOCAB, (1, 9), generator=g)
    ids = base.repeat(2 * n, 1)
    for i in range(n):  # rows 2i (passage A) and 2i+1 (A with one token changed)
        ids[2 * i + 1, int(torch.randint(0, 9, (1,), generator=g))] = int(
            torch.randint(3, VOCAB, (1,), generator=g)
        )
    mask = torch.ones_like(ids)
    proposals = _per_passage_greedy(gen, ids, mask, 6).view(n, 2, -1)
    differ = [i for i in range(n) if not torch.equal(proposals[i, 0], proposals[i, 1])]
    assert differ, "no one-token change altered the answer"
    # table[i][c, k] = log p(answer of passage c | passage k), by transformers' forward
    answers = proposals.reshape(2 * n, -1)
    contexts = ids.view(n, 2, -1).repeat_interleave(2, dim=0).view(4 * n, -1)  # [A,B,A,B] per i
    per_doc = _teacher_forced_doc_logprob(
        seq_ref, contexts, torch.ones_like(contexts), answers, _start_id(gen)
    )
    tables = per_doc.view(n, 2, 2)
    gaps = {i: _switch_point(tables[i], True) - _switch_point(tables[i], False) for i in differ}
    i = max(gaps, key=lambda j: abs(gaps[j]))
    assert abs(gaps[i]) > 0.05, gaps
    d = _switch_point(tables[i], True) - gaps[i] / 2  # between the two switch points
    kwargs = {
        "n_docs": 2,
        "max_new_tokens": 6,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
        "decoder_start_token_id": _start_id(gen),
    }
    rows, scores = ids[2 * i : 2 * i + 2], torch.tensor([[d, 0.0]])
    fast = rag_sequence_generate(gen, rows, mask[:2], scores, decoding="fast", **kwargs)
    thorough = rag_sequence_generate(gen, rows, mask[:2], scores, decoding="thorough", **kwargs)
    width = proposals.shape[-1]
    pad = torch.nn.functional.pad
    fast_seq = pad(fast.sequences[0], (0, width - fast.sequences.shape[1]), value=PAD)
    thorough_seq = pad(thorough.sequences[0], (0, width - thorough.sequences.shape[1]), value=PAD)
    assert not torch.equal(fast_seq, thorough_seq)
    producer = 0 if torch.equal(fast_seq, proposals[i, 0]) else 1
    assert torch.equal(fast_seq, proposals[i, producer])
    assert torch.equal(thorough_seq, proposals[i, 1 - producer])
    # fast: the producing passage scores its answer, the other contributes exactly 0
    assert math.isinf(float(fast.doc_logprob[0, 1 - producer]))
    torch.testing.assert_close(fast.doc_logprob[0, producer], tables[i][producer, producer])
    torch.testing.assert_close(thorough.doc_logprob[0], tables[i][1 - producer])
    torch.testing.assert_close(fast.doc_posterior[0, producer], torch.tensor(1.0))


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_pruning_equals_decoding_the_kept_passages(mode: str) -> None:
    _, _, gen = _models("bart", 4, seed=9)
    ids, mask, _ = _inputs(2, 4, seed=60)
    scores = torch.tensor([[3.0, 0.0, 2.5, -4.0], [0.0, 1.0, -5.0, 0.5]])
    keep = doc_prior(scores).exp() >= 0.1  # question 0 keeps {0, 2}, question 1 keeps {0, 1, 3}
    assert keep.sum(-1).tolist() == [2, 3]
    fn = rag_token_generate if mode == "token" else rag_sequence_generate
    common = {
        "max_new_tokens": 6,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
        "decoder_start_token_id": _start_id(gen),
    }
    pruned = fn(gen, ids, mask, scores, n_docs=4, min_prior=0.1, **common)
    assert bool((pruned.doc_posterior[~keep] == 0).all())
    torch.testing.assert_close(pruned.doc_posterior.sum(-1), torch.ones(2))
    for b in range(2):  # same as decoding each question with only its kept passages
        docs = keep[b].nonzero().squeeze(-1)
        rows = b * 4 + docs
        alone = fn(gen, ids[rows], mask[rows], scores[b : b + 1, docs], n_docs=len(docs), **common)
        seq = pruned.sequences[b, : alone.sequences.shape[1]]
        assert torch.equal(seq, alone.sequences[0])
        torch.testing.assert_close(pruned.doc_posterior[b, docs], alone.doc_posterior[0])
        torch.testing.assert_close(pruned.logprob[b], alone.logprob[0], atol=1e-5, rtol=1e-5)


def test_bad_inputs_are_rejected_by_name() -> None:
    _, _, gen = _models("bart", 3, seed=0)
    ids, mask, scores = _inputs(2, 3, seed=70)
    common: dict[str, Any] = {
        "max_new_tokens": 4,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
        "decoder_start_token_id": _start_id(gen),
    }
    labels = torch.ones(2, 4, dtype=torch.long)
    loss: dict[str, Any] = {"decoder_start_token_id": EOS, "pad_token_id": PAD}
    cases: list[tuple[str, Callable[[], object]]] = [
        ("n_docs=4", lambda: rag_token_nll(gen, ids, mask, scores, labels, n_docs=4, **loss)),
        ("(2, 2)", lambda: rag_token_nll(gen, ids, mask, scores[:, :2], labels, n_docs=3, **loss)),
        (
            "'greedy'",
            lambda: rag_sequence_generate(
                gen, ids, mask, scores, n_docs=3, decoding="greedy", **common
            ),
        ),
        ("1.5", lambda: doc_prior(scores, min_prior=1.5)),
        (
            "labels",
            lambda: rag_token_nll(
                gen, ids, mask, scores, torch.ones(3, 4, dtype=torch.long), n_docs=3,
                decoder_start_token_id=EOS, pad_token_id=PAD,
            ),
        ),
    ]  # fmt: skip
    # the decoding settings are refused by name where they are configured
    for needle, bad in (("min_prior", {"min_prior": 1.5}), ("num_beams", {"num_beams": 0})):
        with pytest.raises(ValueError, match=needle):
            DecodingConfig(**bad)
    for needle, call in cases:
        with pytest.raises(InvalidInputError, match=re.escape(needle)):
            call()
