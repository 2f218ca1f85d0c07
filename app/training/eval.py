"""Held-out evaluation: per-token loss, and greedy answers scored against the references.

Answer metrics follow SQuAD: exact match and token F1 after lowercasing and dropping punctuation,
articles and extra spaces. Two task metrics for the demo adapters ride along: the mean number of
words per answer (`concise`) and the share of answers that end by citing a passage "[n]"
(`cited`), with the share citing the same number as the reference.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from app.contracts import GenRow
from app.generation.generator import Generator
from app.training.losses import Sample, answer_ids, batch_nll
from app.training.options import Objective

_CITE = re.compile(r"\[(\d+)\]\W*$")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


@dataclass(frozen=True)
class Metrics:
    loss: float  # mean NLL per answer token under the training objective
    exact_match: float | None = None
    f1: float | None = None
    mean_words: float | None = None
    cite_rate: float | None = None  # answers ending in "[n]"
    cite_match: float | None = None  # ... with the reference's n (when references cite)
    examples: int = 0

    def to_json(self) -> dict[str, float | int | None]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def normalize(text: str) -> str:
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def cited(text: str) -> int | None:
    """The passage number an answer ends by citing, e.g. "... [2]." -> 2; None if none."""
    m = _CITE.search(text.strip())
    return int(m.group(1)) if m else None


def heldout_loss(
    g: Generator, samples: Sequence[Sample], objective: Objective, *, batch_size: int, reserve: int
) -> float:
    was_training = g.model.training
    g.model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(samples), batch_size):
            nll, n = batch_nll(g, samples[i : i + batch_size], objective, reserve=reserve)
            total, count = total + float(nll), count + n
    g.model.train(was_training)
    return total / max(count, 1)


def greedy_answers(
    g: Generator,
    samples: Sequence[Sample],
    adapter: str | None,
    *,
    max_new_tokens: int,
    batch_size: int,
) -> list[str]:
    """The server's greedy answers (the same Generator.generate), with or without the adapter."""
    was_training = g.model.training
    g.model.eval()  # PEFT refuses per-row adapter_names in training mode
    answers: list[str] = []
    for i in range(0, len(samples), batch_size):
        rows = [
            GenRow(s.question, s.passages, adapter, max_new_tokens)
            for s in samples[i : i + batch_size]
        ]
        answers += g.generate(rows)
    g.model.train(was_training)
    return answers


def answer_budget(g: Generator, samples: Sequence[Sample], cap: int = 64) -> int:
    """max_new_tokens for evaluation: room for the longest reference and some slack."""
    longest = max(len(t) for t in answer_ids(g, [s.answer for s in samples]))
    return max(8, min(cap, longest + 8))


def score_answers(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    n = len(predictions)
    out = {
        "exact_match": sum(map(exact_match, predictions, references)) / n,
        "f1": sum(map(token_f1, predictions, references)) / n,
        "mean_words": sum(len(p.split()) for p in predictions) / n,
        "cite_rate": sum(cited(p) is not None for p in predictions) / n,
    }
    with_refs = [(p, r) for p, r in zip(predictions, references, strict=True) if cited(r)]
    if with_refs:
        out["cite_match"] = sum(cited(p) == cited(r) for p, r in with_refs) / len(with_refs)
    return out


def evaluate(
    g: Generator,
    samples: Sequence[Sample],
    objective: Objective,
    adapter: str | None,
    *,
    batch_size: int,
    reserve: int,
    max_new_tokens: int,
) -> tuple[Metrics, list[str]]:
    """Loss under the model as it is (adapter active), answers under `adapter` (None = base)."""
    loss = heldout_loss(g, samples, objective, batch_size=batch_size, reserve=reserve)
    answers = greedy_answers(
        g, samples, adapter, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    scores = score_answers(answers, [s.answer for s in samples])
    return Metrics(loss=loss, examples=len(samples), **scores), answers
