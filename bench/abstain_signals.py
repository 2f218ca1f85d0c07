"""Abstention signals measured on the demo question sets, through the real app.

Issue 16 asks for the abstention signal to be designed from measurement. The retrieval gate
(app/generation/abstain.py) was chosen on the best passage's cosine alone; this bench measures
the two signals left unmeasured beside it, on the answers the server gives with abstention off:

- support: the share of the answer's content words (stemmed, function words out) that occur in
  the retrieved passages, as the server computes it (app/generation/abstain.py,
  `answer_support`; an answer without content words counts as 1, never withheld);
- anchor: whether the answer is found next to what the question asks about (`anchor` below);
- likelihood: the answer's mean log-probability per token given the prompt with the passages
  (`lp_with`), the same without any passage (`lp_without`: the same instructions and question,
  an empty passage list), and their difference, the pointwise mutual information of answer and
  passages (`pmi`): a grounded answer is likelier with its passages than without them. Both
  passes are POST /v1/completions (echo, logprobs 0, max_tokens 0): one teacher-forced forward
  pass each, under the adapter that answered;
- coverage: the share of the question's content words (interrogatives out) that the best
  passage holds: retrieval only, a lexical check that the passages are about what is asked;
- the retrieval gate's own signal (`cosine`, the best passage's score), for comparison.

For each signal it prints the AUROC of telling the unanswerable questions from the answerable
ones (all, and those answered right: `hit`, the reference contained in the answer), and what
abstaining below a threshold would do *after* the retrieval gate: thresholds are picked on the
train sets (--split train) and read on the held-out ones.

    .venv/bin/python -m bench.abstain_signals --adapters base grounded --json /tmp/sig.json
    .venv/bin/python -m bench.abstain_signals --split train --json /tmp/sig_train.json
    .venv/bin/python -m bench.abstain_signals --from-json /tmp/sig.json \
        --train-json /tmp/sig_train.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from app.contracts import Passage
from app.generation.abstain import AbstainConfig, answer_support, content_words
from bench.answer_quality import README_QUESTIONS, ask_all, normalize, read

SENTENCES = re.compile(r"(?<=[.!?])\s+")
SIGNALS = ("cosine", "support", "anchor", "coverage", "lp_with", "lp_without", "pmi")
# the words a question asks with, which no passage needs to hold (after content_words' stemming)
INTERROGATIVES = frozenset(
    ["what", "who", "whom", "how", "mani", "much", "doe", "do", "did", "which", "have", "has"]
)
GATE = AbstainConfig().min_score  # LORAG_ABSTAIN_MIN_SCORE's default


def support(answer: str, passages: list[dict[str, Any]]) -> float:
    """The server's answer support (1 where the answer has no content word to check)."""
    share = answer_support(answer, [Passage("", "", p["title"], p["text"]) for p in passages])
    return 1.0 if share is None else share


def anchor(question: str, answer: str, passages: list[dict[str, Any]]) -> float:
    """Whether the answer is found next to what the question asks about: over the passages'
    sentences that hold at least half of what the answer adds (its content words that are not
    the question's), the best share of the question's content words in that sentence or its
    passage's title. An answer copied from a sentence about something else ("Who wrote
    Hamlet?" -> a philosopher named in a sentence without Hamlet) scores low; 0 where the
    answer adds nothing or is found nowhere."""
    asked = set(content_words(question))
    new = set(content_words(answer)) - asked
    if not asked or not new:
        return 0.0
    best = 0.0
    for p in passages:
        title = set(content_words(p["title"]))
        for sentence in SENTENCES.split(p["text"]):
            there = set(content_words(sentence))
            if len(new & there) * 2 >= len(new):
                best = max(best, len(asked & (there | title)) / len(asked))
    return best


def coverage(question: str, passages: list[dict[str, Any]]) -> float:
    """The best passage's share of the question's content words, interrogatives out (1 where
    the question has none left)."""
    asked = set(content_words(question)) - INTERROGATIVES
    if not asked:
        return 1.0
    held = (set(content_words(f"{p['title']} {p['text']}")) for p in passages)
    return max((len(asked & words) / len(asked) for words in held), default=0.0)


def answer_logprob(
    client: Any, model: str, tokenize: Any, prompts: list[str], answer: str
) -> list[float]:
    """The answer's mean log-probability per token (its end token included) after each prompt:
    one /v1/completions scoring pass per prompt."""
    end = (
        "<|im_end|>"  # the chat template's end of turn (SmolLM2-Instruct); what the answer ended on
    )
    texts = [p + answer + end for p in prompts]
    r = client.post(
        "/v1/completions",
        json={"model": model, "prompt": texts, "echo": True, "logprobs": 0, "max_tokens": 0},
    )
    if r.status_code != 200:
        raise RuntimeError(f"/v1/completions: {r.status_code} {r.text}")
    out = []
    for prompt, choice in zip(prompts, r.json()["choices"], strict=True):
        lps = choice["logprobs"]["token_logprobs"]
        n = len(tokenize(prompt))
        tail = [x for x in lps[n:] if x is not None]
        out.append(sum(tail) / len(tail))
    return out


def auroc(positives: list[float], negatives: list[float]) -> float:
    """P(a positive scores lower than a negative): the signal says "abstain" when low."""
    pairs = [(p < n) + 0.5 * (p == n) for p in positives for n in negatives]
    return sum(pairs) / len(pairs) if pairs else float("nan")


def measure(
    client: Any, adapter: str, questions: list[dict[str, Any]], args: Any
) -> list[dict[str, Any]]:
    state = client.app.state.lorag
    generator = state.components.generator
    model = adapter if adapter != "base" else generator.model_id

    def tokenize(text: str) -> list[int]:
        return generator.family.tokenize(generator.tokenizer, text, 10**9, chat=False)

    bodies = [
        {
            "question": q["question"],
            "top_k": args.top_k,
            "max_new_tokens": args.max_new_tokens,
            **({} if adapter == "base" else {"adapter": adapter}),
        }
        for q in questions
    ]
    t = time.perf_counter()
    outs = ask_all(client, bodies, args.concurrency)
    print(f"  {adapter}: {len(outs)} answers in {time.perf_counter() - t:.0f} s", flush=True)
    rows = []
    for q, o in zip(questions, outs, strict=True):
        passages = [Passage(p["id"], p["doc_id"], p["title"], p["text"]) for p in o["passages"]]
        limit = generator.max_input_tokens(args.max_new_tokens)
        with_p = generator.prompts.build(q["question"], passages, limit)
        without = generator.prompts.build(q["question"], [], limit)
        lp_with, lp_without = answer_logprob(
            client, model, tokenize, [with_p, without], o["answer"]
        )
        rows.append(
            derive(
                {
                    "question": q["question"],
                    "kind": q["kind"],
                    "reference": q.get("answer"),
                    "answer": o["answer"],
                    "passages": [{"title": p["title"], "text": p["text"]} for p in o["passages"]],
                    "cosine": max(p["score"] for p in o["passages"]),
                    "lp_with": lp_with,
                    "lp_without": lp_without,
                }
            )
        )
    return rows


def derive(row: dict[str, Any]) -> dict[str, Any]:
    """The signals computed from a row's answer and passages (again on --from-json rows)."""
    ref = row["reference"]
    return {
        **row,
        "hit": ref is not None and normalize(ref) in normalize(row["answer"]),
        "support": support(row["answer"], row["passages"]),
        "anchor": anchor(row["question"], row["answer"], row["passages"]),
        "coverage": coverage(row["question"], row["passages"]),
        "pmi": row["lp_with"] - row["lp_without"],
    }


def report(adapter: str, rows: list[dict[str, Any]], train: list[dict[str, Any]] | None) -> None:
    un = [r for r in rows if r["kind"] == "unanswerable"]
    an = [r for r in rows if r["kind"] == "answerable"]
    hit = [r for r in an if r["hit"]]
    print(f"\n{adapter}: {len(an)} answerable ({len(hit)} answered right), {len(un)} unanswerable")
    print("  signal     | AUROC unanswerable vs answerable | vs answered right")
    for s in SIGNALS:
        print(
            f"  {s:10s} | {auroc([r[s] for r in un], [r[s] for r in an]):32.3f} | "
            f"{auroc([r[s] for r in un], [r[s] for r in hit]):.3f}"
        )
    # after the gate: what the questions that pass it would do under each signal's threshold
    passed_u = [r for r in un if r["cosine"] >= GATE]
    passed_a = [r for r in an if r["cosine"] >= GATE]
    print(
        f"  the gate (cosine >= {GATE}) lets through {len(passed_u)} of {len(un)} unanswerable "
        f"and {len(passed_a)} of {len(an)} answerable ({sum(r['hit'] for r in passed_a)} right)"
    )
    print(
        "  after the gate, abstain below t | unanswerable abstained (total) | "
        "answerable abstained | hits lost"
    )
    for s in ("support", "anchor", "coverage", "lp_with", "pmi"):
        for t in thresholds(s, train):
            ab_u = sum(r[s] < t for r in passed_u) + len(un) - len(passed_u)
            ab_a = [r for r in passed_a if r[s] < t]
            print(
                f"  {s:8s} t={t:7.3f} | {ab_u / len(un):30.3f} | {len(ab_a) / len(an):20.3f} | "
                f"{sum(r['hit'] for r in ab_a)}"
            )


def thresholds(signal: str, train: list[dict[str, Any]] | None) -> list[float]:
    """The thresholds to read: where a train set is given, those that keep every train answer
    that was right and abstain on as many train unanswerable questions as possible (the
    quantiles of the right answers' values: 0, 5 and 10 % of them lost); else fixed grids."""
    if train:
        right = sorted(r[signal] for r in train if r["hit"])
        return [right[int(len(right) * f)] for f in (0.0, 0.05, 0.10)]
    grid = {
        "support": [0.25, 0.5, 0.75, 1.0],
        "anchor": [0.25, 0.5, 0.75, 1.0],
        "coverage": [0.5, 0.6, 0.67, 0.75],
        "lp_with": [-3.0, -2.0, -1.5, -1.0],
        "pmi": [0.0, 0.5, 1.0, 1.5],
    }
    return grid[signal]


def trained(train: dict[str, Any], adapter: str) -> list[dict[str, Any]] | None:
    rows = train.get(adapter)
    return [derive(r) for r in rows if r["kind"] != "readme"] if rows else None


def readme(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        if r["kind"] == "readme":
            print(
                f"    {r['question']!r} -> {r['answer']!r}: "
                + " ".join(f"{s}={r[s]:.3f}" for s in SIGNALS),
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", nargs="+", default=["base"])
    parser.add_argument("--split", choices=["heldout", "train"], default="heldout")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write every row here")
    parser.add_argument("--from-json", type=Path, default=None, help="report rows measured before")
    parser.add_argument(
        "--train-json", type=Path, default=None, help="pick thresholds on these rows"
    )
    args = parser.parse_args()
    train = json.loads(args.train_json.read_text()) if args.train_json else {}
    if args.from_json:
        for adapter, rows in json.loads(args.from_json.read_text()).items():
            rows = [derive(r) for r in rows]
            report(adapter, [r for r in rows if r["kind"] != "readme"], trained(train, adapter))
            readme(rows)
        return
    os.environ.setdefault("LORAG_LAZY_LOAD_ADAPTERS", "true")
    os.environ.setdefault("LORAG_REQUEST_TIMEOUT_S", "3600")
    os.environ["LORAG_ABSTAIN"] = "false"  # every question answered: the signals are read after
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    answerable = read(f"answerable_{args.split}.jsonl")
    unanswerable = read(f"unanswerable_{args.split}.jsonl")
    if args.limit:
        answerable, unanswerable = answerable[: args.limit], unanswerable[: args.limit]
    questions = [{**q, "kind": "answerable"} for q in answerable]
    questions += [{**q, "kind": "unanswerable"} for q in unanswerable]
    questions += [{"question": q, "kind": "readme"} for q in README_QUESTIONS]
    dump: dict[str, Any] = {}
    with TestClient(create_app(Settings())) as client:
        while client.get("/ready").status_code != 200:
            time.sleep(0.5)
        for adapter in args.adapters:
            rows = measure(client, adapter, questions, args)
            dump[adapter] = rows
            if args.json:
                args.json.write_text(json.dumps(dump, indent=1, ensure_ascii=False))
            report(adapter, [r for r in rows if r["kind"] != "readme"], trained(train, adapter))
            readme(rows)


if __name__ == "__main__":
    main()
