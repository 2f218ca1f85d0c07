"""RAG-Sequence: p(y|x) = sum_z p(z|x) p(y|x,z), from per-passage hypotheses.

A request takes a row per kept passage; each decodes its own hypothesis (greedy, or a beam
search of its own whose rows are its open beams) and leaves when that ends. When the last has
ended, the distinct hypotheses are scored one of two ways (Lewis et al. 2020, 2.4) and ranked:

- "thorough": every hypothesis teacher-forced under every kept passage (one forward pass,
  reusing the prefill's encoder states for seq2seq), and marginalized;
- "fast": a passage that did not propose a hypothesis contributes p(y|x,z) = 0, the proposing
  ones their search scores; no extra pass.

The best hypothesis by marginal log-probability wins (no length normalization, as transformers'
`RagSequenceForGeneration.generate`). With `min_prior`, pruned passages neither propose nor score.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch
from torch import Tensor

from app.contracts import GREEDY, Decoding, Sampling
from app.errors import InvalidInputError
from app.generation.modes.base import Found, Request, Step
from app.generation.rag import Candidate, doc_posterior, doc_prior
from app.generation.rag_search import BeamGroup, Hypotheses, pack

# scores answers [P, T] (mask [P, T]) under the request's kept passages rows [P]: log-probs [P, T]
Scorer = Callable[["RagSequence", Tensor, Tensor, Tensor], Tensor]


class RagSequence(Request):
    def __init__(
        self,
        key: Hashable,
        adapter: str | None,
        limit: int,
        prompts: Sequence[list[int]],  # [K] one per passage
        scores: Sequence[float],  # [K]
        *,
        decoding: Decoding,
        eos: int,
        pad: int,
        min_prior: float | None,
        num_beams: int,
        device: torch.device,
        scorer: Scorer,
        sampling: Sampling = GREEDY,
    ) -> None:
        super().__init__(key, adapter, limit, sampling)
        check_decoding(decoding)
        log_prior = doc_prior(torch.tensor([list(scores)], dtype=torch.float32), min_prior)
        self.log_prior = log_prior.to(device)  # [1, K] log p(z|x), -inf where pruned
        self.pairs = torch.isfinite(self.log_prior).reshape(-1).nonzero().squeeze(-1)  # [P]
        self.prompts = [prompts[j] for j in self.pairs.tolist()]
        self.decoding = decoding
        self.eos, self.pad = eos, pad
        self.num_beams = num_beams
        self.scorer = scorer
        n = len(self.prompts)
        self.open = list(range(n))  # the pairs still decoding, in batch-row order
        self.ids: list[list[int]] = [[] for _ in range(n)]  # each pair's hypothesis so far
        self.logprob = torch.zeros(n, device=device)  # log p(hypothesis so far | x, z)
        self.encoder_states: Tensor | None = None  # [P, S, d] seq2seq "thorough"
        self.beams = (
            [BeamGroup(1, num_beams, eos, pad, 1.0, device) for _ in range(n)]
            if num_beams > 1
            else None
        )

    @property
    def n(self) -> int:
        if self.beams is None:
            return len(self.open)
        return sum(self.beams[p].n for p in self.open)

    def prefilled(self, encoder_states: Tensor | None) -> None:
        if encoder_states is not None and self.decoding == "thorough":
            width = max(len(p) for p in self.prompts)  # its own prompts, right-padded
            self.encoder_states = encoder_states[:, :width].clone()

    def advance(self, logits: Tensor, greedy: Sequence[int]) -> Step:
        lp = torch.log_softmax(logits.float(), dim=-1)  # [n, V]
        step = Step()
        still: list[int] = []
        if self.beams is not None:
            at = 0
            for pair in self.open:
                group = self.beams[pair]
                m = group.n
                picked = group.advance(self.log_prior.new_zeros(1), lp[at : at + m, None])
                if not group.closed and group.t < self.limit:
                    still.append(pair)
                    step.keep += [at + beam for beam, _ in picked]
                    step.tokens += [tok for _, tok in picked]
                at += m
        else:
            for i, pair in enumerate(self.open):
                token = self.pick(lp[i], greedy[i])
                self.ids[pair].append(token)
                self.logprob[pair] += lp[i, token]
                if token != self.eos and len(self.ids[pair]) < self.limit:
                    step.keep.append(i)
                    step.tokens.append(token)
                    still.append(pair)
        self.open = still
        if not still:
            step.done = self._rank()
        return step

    def _rank(self) -> Found:
        """Its hypotheses marginalized over its kept passages."""
        device = self.log_prior.device
        if self.beams is not None:  # every pair's num_beams best
            hyps = pack([b.finish() for b in self.beams], self.num_beams, self.pad, device)
        else:
            n = len(self.ids)
            width = max(len(t) for t in self.ids)
            seqs = torch.full((n, 1, width), self.pad, dtype=torch.long, device=device)
            for i, t in enumerate(self.ids):
                seqs[i, 0, : len(t)] = torch.tensor(t, device=device)
            lengths = torch.tensor([[len(t)] for t in self.ids], device=device)
            logprob = self.logprob[:, None]
            hyps = Hypotheses(seqs, lengths, logprob, logprob[:, :, None], logprob / lengths)
        with torch.inference_mode():
            return self._marginalize(hyps)

    def _marginalize(self, hyps: Hypotheses) -> Found:
        """Each distinct hypothesis's log p(y|x) = logsumexp_z log p(z|x) + log p(y|x,z); the
        best one is the answer, with its posterior p(z|x,y)."""
        log_prior = self.log_prior[0]  # [K]
        cands, produced = _collect(hyps, self.pairs)
        if self.decoding == "thorough":
            table = self._thorough(cands)
        else:
            table = torch.full((len(cands), len(log_prior)), float("-inf"), device=log_prior.device)
            for c, by_doc in enumerate(produced):
                for k, value in by_doc.items():
                    table[c, k] = value
        marginal = torch.logsumexp(log_prior + table, dim=-1)  # [C]
        order = torch.argsort(marginal, descending=True, stable=True).tolist()
        best = order[0]
        posterior = doc_posterior(log_prior[None], table[best][None])[0]
        return Found(
            list(cands[best])[: self.limit],
            posterior.tolist(),
            float(marginal[best]),
            tuple(table[best].tolist()),
            tuple(Candidate(cands[c], float(marginal[c])) for c in order),
        )

    def _thorough(self, cands: list[tuple[int, ...]]) -> Tensor:
        """log p(y_c|x,z_k) [C, K]: every hypothesis under every kept passage, one pass."""
        device = self.log_prior.device
        n_docs = self.log_prior.shape[1]
        where = [(c, k) for c in range(len(cands)) for k in self.pairs.tolist()]
        answers = [cands[c] for c, _ in where]
        width = max(len(a) for a in answers)
        ans = torch.zeros((len(answers), width), dtype=torch.long, device=device)
        mask = torch.zeros_like(ans)
        for i, a in enumerate(answers):
            ans[i, : len(a)] = torch.tensor(a, device=device)
            mask[i, : len(a)] = 1
        rows = torch.tensor([self.slot[k] for _, k in where], device=device)
        seq_lp = self.scorer(self, rows, ans, mask).sum(-1)  # [C * P]
        table = torch.full((len(cands), n_docs), float("-inf"), device=device)
        for (c, k), value in zip(where, seq_lp, strict=True):
            table[c, k] = value
        return table

    @property
    def slot(self) -> dict[int, int]:
        """The scored row (index among its kept passages) of each kept passage."""
        return {k: i for i, k in enumerate(self.pairs.tolist())}


def check_decoding(decoding: str) -> None:
    if decoding not in ("thorough", "fast"):
        raise InvalidInputError(f"decoding must be 'thorough' or 'fast', got {decoding!r}")


def _collect(
    hyps: Hypotheses, pairs: Tensor
) -> tuple[list[tuple[int, ...]], list[dict[int, float]]]:
    """The distinct hypotheses, in order of first appearance, and for each the best search
    score of every passage that proposed it ("fast" RAG-Sequence)."""
    cands: list[tuple[int, ...]] = []
    produced: list[dict[int, float]] = []
    for row, k in enumerate(pairs.tolist()):
        for i in range(hyps.sequences.shape[1]):
            length = int(hyps.lengths[row, i])
            if length == 0:  # fewer finished hypotheses than beams
                continue
            seq = tuple(hyps.sequences[row, i, :length].tolist())
            if seq not in cands:
                cands.append(seq)
                produced.append({})
            by_doc = produced[cands.index(seq)]
            by_doc[k] = max(float(hyps.logprob[row, i]), by_doc.get(k, float("-inf")))
    return cands, produced
