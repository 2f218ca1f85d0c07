"""Beam search over groups of passage rows, marginalizing each step over the group.

G groups (questions) of K rows (passages), rows laid out [G, beams, K]. At each step the K rows
of a beam give next-token log-probs, mixed with the group's log prior:
    log p(y_t | x, y_<t) = logsumexp_k (log p(z_k|x) + log p(y_t | x, z_k, y_<t))
which is RAG-Token. With K=1 and a zero prior it is ordinary per-passage decoding, which is what
RAG-Sequence uses to propose hypotheses. Alongside the marginal score each beam carries its
per-passage sequence log-probs [K], so p(z|x,y) comes for free, without a second pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


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


class BeamGroup:
    """One group's beam search, a step at a time (a RAG-Token request's beams, or one passage's
    in RAG-Sequence).

    Like transformers' beam search: among the top 2*num_beams candidates an EOS counts only when
    ranked within the first num_beams; a group stops once it holds num_beams finished hypotheses
    and its best open beam can no longer beat the worst of them at the current length.
    """

    def __init__(
        self,
        k: int,
        num_beams: int,
        eos_token_id: int,
        pad_token_id: int,
        length_penalty: float,
        device: torch.device,
    ) -> None:
        self.num_beams = num_beams
        self.eos = eos_token_id
        self.pad = pad_token_id
        self.length_penalty = length_penalty
        self.n = 1  # open beams; num_beams after the first step
        self.tokens: list[list[int]] = [[]]  # [n] generated tokens of each open beam
        self.doc = torch.zeros(1, k, device=device)  # [n, K] per-passage log-probs of those
        self.alive = torch.zeros(1, device=device)  # [n] marginal log-prob of each open beam
        self.done: list[_Done] = []
        self.closed = False  # holds num_beams finished ones no open beam can beat
        self.t = 0  # steps taken

    def advance(self, log_prior: Tensor, lp: Tensor) -> list[tuple[int, int]]:
        """One step from log_prior [K] and the open beams' rows' log-probs lp [n, K, V]: the
        (open beam, token) each of the num_beams next beams continues. A closed group's rows
        continue beam 0 with padding, which nothing reads."""
        vocab = lp.shape[-1]
        cand = (self.alive[:, None] + marginal(log_prior[None], lp[None])[0]).view(-1)
        top_val, top_idx = cand.topk(min(2 * self.num_beams, cand.shape[0]))  # [2N]
        ranked = [
            (i // vocab, i % vocab, v)
            for i, v in zip(top_idx.tolist(), top_val.tolist(), strict=True)
        ]
        picked: list[tuple[int, int, float]] = [(0, self.pad, 0.0)] * self.num_beams
        if not self.closed:
            picked = self._pick(ranked, lp)
            best_open = picked[0][2] / (self.t + 1) ** self.length_penalty
            self.closed = len(self.done) >= self.num_beams and self.done[-1].score >= best_open
        self.doc = torch.stack([self.doc[beam] + lp[beam, :, tok] for beam, tok, _ in picked])
        self.tokens = [[*self.tokens[beam], tok] for beam, tok, _ in picked]
        self.alive = torch.tensor([val for _, _, val in picked], device=self.alive.device)
        self.n = self.num_beams
        self.t += 1
        return [(beam, tok) for beam, tok, _ in picked]

    def finish(self) -> list[_Done]:
        """The finished hypotheses, best first (out of length: open beams compete as they are)."""
        if not self.closed:
            for beam in range(self.n):
                seq = self.tokens[beam]
                val = float(self.alive[beam])
                score = val / len(seq) ** self.length_penalty
                self.done.append(_Done(score, val, seq, self.doc[beam]))
            self.done.sort(key=lambda d: -d.score)
            self.closed = True
        return self.done

    def _pick(
        self, ranked: list[tuple[int, int, float]], lp: Tensor
    ) -> list[tuple[int, int, float]]:
        """Split the top 2N (beam, token, score), best first, into finished hypotheses (into
        done) and the next beams."""
        picked: list[tuple[int, int, float]] = []
        for rank, (beam, tok, val) in enumerate(ranked):
            if tok == self.eos:
                if rank < self.num_beams:  # an EOS counts only when it ranks within the width
                    doc = self.doc[beam] + lp[beam, :, tok]
                    seq = [*self.tokens[beam], tok]
                    score = val / len(seq) ** self.length_penalty
                    self.done.append(_Done(score, val, seq, doc))
            else:
                picked.append((beam, tok, val))
            if len(picked) == self.num_beams:
                break
        self.done.sort(key=lambda d: -d.score)
        del self.done[self.num_beams :]
        return picked


def pack(done: list[list[_Done]], num_return: int, pad: int, device: torch.device) -> Hypotheses:
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
