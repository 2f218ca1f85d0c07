"""RAG-Token: p(y_i|x, y_<i) = sum_z p(z|x) p(y_i|x, z, y_<i), greedy or a beam search.

A request takes a row per kept passage (beams x kept passages with a beam search), contiguous
in the batch. At each step the rows' next-token log-probs are marginalized with the request's
prior and one token is fed to all its rows (with beams: the rows are reordered and forked as
the beams are). Alongside, each passage's log p(y|x,z) of the chosen tokens is summed, so the
posterior p(z|x,y) that the citations report comes without a second pass.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from app.contracts import GREEDY, Sampling
from app.generation.modes.base import Found, Request, Step, tokens_until
from app.generation.rag import doc_posterior, doc_prior, expand_to_docs, kept_docs
from app.generation.rag_search import BeamGroup, marginal, pack


class RagToken(Request):
    def __init__(
        self,
        key: Hashable,
        adapter: str | None,
        limit: int,
        prompts: Sequence[list[int]],  # [K] one per passage
        scores: Sequence[float],  # [K] retrieval scores: the prior's logits
        *,
        eos: int,
        pad: int,
        min_prior: float | None,
        num_beams: int,
        device: torch.device,
        sampling: Sampling = GREEDY,
    ) -> None:
        super().__init__(key, adapter, limit, sampling)
        log_prior = doc_prior(torch.tensor([list(scores)], dtype=torch.float32), min_prior)
        doc_index, prior = kept_docs(log_prior)  # [1, K'] each
        self.prompts = [prompts[j] for j in doc_index[0].tolist()]
        self.prior = prior.to(device)  # [1, K'] log p(z|x) of the kept passages
        self.doc_index = doc_index.to(device)  # [1, K'] which passage each row reads
        self.n_docs = len(prompts)
        self.eos = eos
        self.ids: list[int] = []
        self.logprob = 0.0  # log p(y|x) of the tokens so far (greedy)
        self.doc_lp = torch.zeros(prior.shape[1], device=device)  # [K'] log p(y|x,z) so far
        self.beams = (
            BeamGroup(prior.shape[1], num_beams, eos, pad, 1.0, device) if num_beams > 1 else None
        )

    @property
    def n(self) -> int:
        k = int(self.prior.shape[1])
        return k * self.beams.n if self.beams is not None else k

    def advance(self, logits: torch.Tensor, greedy: Sequence[int]) -> Step:
        k = int(self.prior.shape[1])
        lp = torch.log_softmax(logits.float(), dim=-1)  # [n, V]
        if self.beams is not None:
            group = self.beams
            picked = group.advance(self.prior[0], lp.view(group.n, k, -1))
            if group.closed or group.t >= self.limit:
                return Step(self._beam_answer())
            keep = [beam * k + j for beam, _ in picked for j in range(k)]
            return Step(None, keep, [tok for _, tok in picked for _ in range(k)])
        marg = marginal(self.prior, lp[None, None])[0, 0]  # [V]
        token = self.pick(marg, int(marg.argmax()))
        self.logprob += float(marg[token])
        self.doc_lp += lp[:, token]
        self.ids.append(token)
        if token == self.eos or len(self.ids) >= self.limit:
            return Step(self._answer(self.ids, self.logprob, self.doc_lp))
        return Step(None, list(range(k)), [token] * k)

    def partial(self) -> list[int] | None:
        return self.ids if self.beams is None else None

    def stop_here(self) -> Found:
        return self._answer(self.ids, self.logprob, self.doc_lp)

    def _beam_answer(self) -> Found:
        assert self.beams is not None
        hyps = pack([self.beams.finish()], 1, self.beams.pad, self.prior.device)
        length = int(hyps.lengths[0, 0])
        ids = hyps.sequences[0, 0, :length].tolist()
        return self._answer(ids, float(hyps.logprob[0, 0]), hyps.doc_logprob[0, 0])

    def _answer(self, ids: list[int], logprob: float, doc_lp: torch.Tensor) -> Found:
        """The answer with p(z|x,y) over the request's passages (0 where pruned)."""
        doc_lp = doc_lp[None].masked_fill(~torch.isfinite(self.prior), float("-inf"))  # [1, K']
        posterior = doc_posterior(self.prior, doc_lp)
        weights = expand_to_docs(posterior, self.doc_index, self.n_docs, 0.0)[0]
        per_doc = expand_to_docs(doc_lp, self.doc_index, self.n_docs, float("-inf"))[0]
        return Found(
            tokens_until(ids, self.eos)[: self.limit],
            weights.tolist(),
            logprob,
            tuple(per_doc.tolist()),
        )
