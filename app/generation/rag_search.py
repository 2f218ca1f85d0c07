"""Greedy and beam search over groups of passage rows, marginalizing each step over the group.

G groups (questions) of K rows (passages), rows laid out [G, beams, K]. At each step the K rows
of a beam give next-token log-probs, mixed with the group's log prior:
    log p(y_t | x, y_<t) = logsumexp_k (log p(z_k|x) + log p(y_t | x, z_k, y_<t))
which is RAG-Token. With K=1 and a zero prior it is ordinary per-passage decoding, which is what
RAG-Sequence uses to propose hypotheses. Alongside the marginal score each beam carries its
per-passage sequence log-probs [K], so p(z|x,y) comes for free, without a second pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from app.errors import InvalidInputError
from app.generation.rag_runners import Runner


@dataclass(frozen=True, slots=True)
class Hypotheses:
    sequences: Tensor  # [G, N, T] generated tokens, pad after each one's end
    lengths: Tensor  # [G, N] generated tokens, EOS included
    logprob: Tensor  # [G, N] sum of marginal token log-probs
    doc_logprob: Tensor  # [G, N, K] log p(y|x,z_k) along the same tokens
    score: Tensor  # [G, N] logprob / length**length_penalty (what beam search ranks by)


@dataclass(slots=True)
class _Done:
    score: float
    logprob: float
    tokens: list[int]
    doc_logprob: Tensor  # [K]


def marginal(log_prior: Tensor, lp: Tensor) -> Tensor:
    """log p(y_t|x, y_<t): log_prior [G, K], lp [G, n, K, V] -> [G, n, V]."""
    return torch.logsumexp(lp + log_prior[:, None, :, None], dim=2)


def greedy_search(
    runner: Runner,
    log_prior: Tensor,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    limits: Sequence[int] | None = None,
) -> Hypotheses:
    """Greedy decoding; a group that emits EOS, or reaches its own limit (limits[g], at most
    max_new_tokens), leaves the batch (its rows are dropped). Greedy search is
    prefix-consistent, so groups of different limits share a call and get what each gets alone,
    its p(y|x,z) over its own tokens included."""
    groups, k = log_prior.shape
    device = log_prior.device
    if limits is None:
        limits = [max_new_tokens] * groups
    if len(limits) != groups:
        raise InvalidInputError(f"limits has {len(limits)} entries for {groups} groups")
    limit = torch.tensor(limits, dtype=torch.long, device=device).clamp(max=max_new_tokens)
    seqs = torch.full((groups, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logprob = torch.zeros(groups, device=device)
    doc_lp = torch.zeros(groups, k, device=device)
    lengths = torch.zeros(groups, dtype=torch.long, device=device)
    active = torch.arange(groups, device=device)  # groups still decoding, in row order
    lp = runner.start()  # [G*K, V]
    for t in range(max_new_tokens):
        lp3 = lp.view(active.shape[0], k, -1)  # [A, K, V]
        marg = marginal(log_prior[active], lp3[:, None])[:, 0]  # [A, V]
        tok = marg.argmax(dim=-1)  # [A]
        seqs[active, t] = tok
        logprob[active] += marg.gather(1, tok[:, None]).squeeze(1)
        doc_lp[active] += lp3.gather(2, tok[:, None, None].expand(-1, k, 1)).squeeze(-1)
        lengths[active] += 1
        going = (tok != eos_token_id) & (lengths[active] < limit[active])  # [A]
        if t == max_new_tokens - 1 or not bool(going.any()):
            break
        if bool(going.all()):
            lp = runner.step(tok.repeat_interleave(k), None)
        else:
            keep = going.nonzero().squeeze(-1)  # positions among the active groups
            src = (keep[:, None] * k + torch.arange(k, device=device)).reshape(-1)
            active = active[keep]
            lp = runner.step(tok[keep].repeat_interleave(k), src)
    width = int(lengths.max())
    score = logprob / lengths.clamp(min=1)
    return Hypotheses(
        seqs[:, None, :width], lengths[:, None], logprob[:, None], doc_lp[:, None], score[:, None]
    )


def beam_search(
    runner: Runner,
    log_prior: Tensor,
    max_new_tokens: int,
    num_beams: int,
    num_return: int,
    eos_token_id: int,
    pad_token_id: int,
    length_penalty: float = 1.0,
) -> Hypotheses:
    """Beam search on the marginal; finished hypotheses are ranked by logprob / len**penalty.

    Like transformers' beam search: among the top 2*num_beams candidates an EOS counts only when
    ranked within the first num_beams; a group stops once it holds num_beams finished hypotheses
    and its best open beam can no longer beat the worst of them at the current length.
    """
    groups, k = log_prior.shape
    device = log_prior.device
    lp = runner.start()
    n = 1  # open beams per group; grows to num_beams after the first step
    beams = _Beams([[[]] for _ in range(groups)], torch.zeros(groups, 1, k, device=device))
    alive_score = torch.zeros(groups, 1, device=device)
    done: list[list[_Done]] = [[] for _ in range(groups)]
    closed = [False] * groups
    for t in range(max_new_tokens):
        lp4 = lp.view(groups, n, k, -1)
        vocab = lp4.shape[-1]
        cand = (alive_score[:, :, None] + marginal(log_prior, lp4)).view(groups, -1)
        top_val, top_idx = cand.topk(min(2 * num_beams, cand.shape[1]), dim=1)  # [G, 2N]
        ranked = [
            [(i // vocab, i % vocab, v) for i, v in zip(idx, val, strict=True)]
            for idx, val in zip(top_idx.tolist(), top_val.tolist(), strict=True)
        ]
        src, toks, scores, docs, seqs = [], [], [], [], []
        for g in range(groups):
            picked: list[tuple[int, int, float]] = [(0, pad_token_id, 0.0)] * num_beams
            if not closed[g]:  # a closed group's rows stay busy with padding, nothing is kept
                picked = _pick(ranked[g], beams, lp4, g, done[g], num_beams, eos_token_id,
                               length_penalty)  # fmt: skip
                best_open = picked[0][2] / (t + 1) ** length_penalty
                closed[g] = len(done[g]) >= num_beams and done[g][-1].score >= best_open
            for beam, tok, val in picked:
                src.append((g * n + beam) * k + torch.arange(k, device=device))
                toks.append(tok)
                scores.append(val)
                docs.append(beams.doc[g, beam] + lp4[g, beam, :, tok])
                seqs.append([*beams.tokens[g][beam], tok])
        n = num_beams
        beams = _Beams([seqs[g * n : (g + 1) * n] for g in range(groups)], torch.stack(docs))
        beams.doc = beams.doc.view(groups, n, k)
        alive_score = torch.tensor(scores, device=device).view(groups, n)
        if all(closed) or t == max_new_tokens - 1:
            break
        tokens = torch.tensor(toks, device=device).repeat_interleave(k)
        lp = runner.step(tokens, torch.cat(src))
    for g in range(groups):
        if closed[g]:
            continue
        for beam in range(n):  # out of length: open beams compete as they are
            seq = beams.tokens[g][beam]
            val = float(alive_score[g, beam])
            done[g].append(_Done(val / len(seq) ** length_penalty, val, seq, beams.doc[g, beam]))
        done[g].sort(key=lambda d: -d.score)
    return _pack(done, num_return, pad_token_id, device)


@dataclass(slots=True)
class _Beams:
    tokens: list[list[list[int]]]  # [G][n] generated tokens of each open beam
    doc: Tensor  # [G, n, K] per-passage log-probs of those tokens


def _pick(
    ranked: list[tuple[int, int, float]],  # top 2N (beam, token, score), best first
    beams: _Beams,
    lp4: Tensor,  # [G, n, K, V]
    g: int,
    done: list[_Done],
    num_beams: int,
    eos_token_id: int,
    length_penalty: float,
) -> list[tuple[int, int, float]]:
    """Split one group's candidates into finished hypotheses (into `done`) and next beams."""
    picked: list[tuple[int, int, float]] = []
    for rank, (beam, tok, val) in enumerate(ranked):
        if tok == eos_token_id:
            if rank < num_beams:  # an EOS counts only when it ranks within the beam width
                doc = beams.doc[g, beam] + lp4[g, beam, :, tok]
                seq = [*beams.tokens[g][beam], tok]
                done.append(_Done(val / len(seq) ** length_penalty, val, seq, doc))
        else:
            picked.append((beam, tok, val))
        if len(picked) == num_beams:
            break
    done.sort(key=lambda d: -d.score)
    del done[num_beams:]
    return picked


def _pack(done: list[list[_Done]], num_return: int, pad: int, device: torch.device) -> Hypotheses:
    best = [d[:num_return] for d in done]
    width = max(len(h.tokens) for hyps in best for h in hyps)
    groups = len(best)
    seqs = torch.full((groups, num_return, width), pad, dtype=torch.long, device=device)
    lengths = torch.zeros(groups, num_return, dtype=torch.long, device=device)
    logprob = torch.full((groups, num_return), float("-inf"), device=device)
    score = torch.full((groups, num_return), float("-inf"), device=device)
    k = best[0][0].doc_logprob.shape[0]
    doc = torch.full((groups, num_return, k), float("-inf"), device=device)
    for g, hyps in enumerate(best):
        for i, h in enumerate(hyps):
            seqs[g, i, : len(h.tokens)] = torch.tensor(h.tokens, device=device)
            lengths[g, i] = len(h.tokens)
            logprob[g, i], score[g, i], doc[g, i] = h.logprob, h.score, h.doc_logprob
    return Hypotheses(seqs, lengths, logprob, doc, score)


def search(
    runner: Runner,
    log_prior: Tensor,
    *,
    max_new_tokens: int,
    num_beams: int,
    num_return: int,
    eos_token_id: int,
    pad_token_id: int,
    length_penalty: float = 1.0,
    limits: Sequence[int] | None = None,
) -> Hypotheses:
    """Greedy search (num_beams 1; per-group `limits` allowed) or beam search."""
    if max_new_tokens < 1:
        raise InvalidInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_beams < 1:
        raise InvalidInputError(f"num_beams must be >= 1, got {num_beams}")
    if num_beams == 1:
        return greedy_search(runner, log_prior, max_new_tokens, eos_token_id, pad_token_id, limits)
    if limits is not None and len(set(limits)) > 1:
        raise InvalidInputError("beam search needs one max_new_tokens for every group")
    return beam_search(
        runner,
        log_prior,
        max_new_tokens,
        num_beams,
        num_return,
        eos_token_id,
        pad_token_id,
        length_penalty,
    )
