"""Answer quality on the demo corpus, through the real app: recall@k, EM/F1, abstention.

The question sets are bench/data/*_heldout.jsonl (scripts/make_answer_sets.py): answerable
questions with the passage that holds the answer, and questions on topics the corpus lacks.
Every question is a POST /ask to the real FastAPI app (its lifespan, the demo index, the
default generator, adapters lazily loaded from adapters/), sent concurrently so the engine
batches them as it batches users.

Per adapter and mode it prints:
- recall@k: the passage holding the answer is among the k retrieved (answerable only);
- EM and token F1 (SQuAD normalization; citation marks "[n]" removed first) and `hit`, the
  normalized reference contained in the normalized answer (the accuracy the abstention target
  is measured by); an abstained answerable question scores 0 on all three;
- cite: the answer cites "[n]" for the passage holding the answer, among answerable questions
  whose passage was retrieved; cite_right: the same among those answered right (`hit`), which
  tells citing the wrong passage from giving the wrong answer; moved: the marks the server's
  citation check moved (--check-citations false turns it off);
- EM, F1, hit and cite again per question shape (forward "What is X?" -> "a Y", reverse
  "What is the Y?" -> "X");
- abstention precision and recall: `abstained` over all questions, unanswerable as positives;
- for the retrieval gate, what each threshold on the best passage's score would give (the gate
  runs before generation, so this is what the server would answer at that threshold).

- retrieval recall@k for dense, sparse (BM25) and hybrid (RRF) search, alone with
  --retrieval-only (no generation: bench/retrieval_recall.py), or per --retrievals in the run.

    .venv/bin/python -m bench.answer_quality --adapters base concise cited grounded
    .venv/bin/python -m bench.answer_quality --retrieval-only
    .venv/bin/python -m bench.answer_quality --retrievals dense hybrid
    .venv/bin/python -m bench.answer_quality --abstain false --json /tmp/aq.json
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import re
import string
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data"
# the README's examples: each adapter's answer to them is printed after its figures
README_QUESTIONS = [
    "What is the capital of Alaska?",
    "What is Anarchism?",
    "Who wrote Hamlet?",
    "What is the boiling point of water?",
]
log = logging.getLogger("bench.answer_quality")


def normalize(text: str) -> str:
    text = re.sub(r"\[\d+\]", " ", text).lower()
    text = "".join(c for c in text if c not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1(prediction: str, reference: str) -> float:
    p, r = normalize(prediction).split(), normalize(reference).split()
    common = sum((collections.Counter(p) & collections.Counter(r)).values())
    if not p or not r or common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def read(name: str) -> list[dict[str, Any]]:
    with (DATA / name).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def ask_all(client: Any, bodies: list[dict[str, Any]], concurrency: int) -> list[dict[str, Any]]:
    def one(body: dict[str, Any]) -> dict[str, Any]:
        r = client.post("/ask", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"/ask {body['question']!r}: {r.status_code} {r.text}")
        return dict(r.json())

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, bodies))


def score(
    answerable: list[dict[str, Any]],
    unanswerable: list[dict[str, Any]],
    a_out: list[dict[str, Any]],
    u_out: list[dict[str, Any]],
) -> dict[str, float]:
    recall, em, f1s, hit, cite, cite_n, cite_right, right_n = 0, 0.0, 0.0, 0, 0, 0, 0, 0
    for q, out in zip(answerable, a_out, strict=True):
        ids = [p["id"] for p in out["passages"]]
        if q["passage_id"] in ids:
            recall += 1
        if out.get("abstained"):
            continue
        answer = out["answer"]
        em += normalize(answer) == normalize(q["answer"])
        f1s += f1(answer, q["answer"])
        right = normalize(q["answer"]) in normalize(answer)
        hit += right
        if q["passage_id"] in ids:
            cited = f"[{ids.index(q['passage_id']) + 1}]" in answer
            cite_n += 1
            cite += cited
            right_n += right
            cite_right += cited and right
    n = len(answerable)
    abst_u = sum(bool(o.get("abstained")) for o in u_out)
    abst_a = sum(bool(o.get("abstained")) for o in a_out)
    return {
        "recall": recall / n,
        "em": em / n,
        "f1": f1s / n,
        "hit": hit / n,
        "cite": cite / cite_n if cite_n else 0.0,
        "cite_right": cite_right / right_n if right_n else 0.0,
        "abstain_precision": abst_u / (abst_u + abst_a) if abst_u + abst_a else 0.0,
        "abstain_recall": abst_u / len(unanswerable) if unanswerable else 0.0,
        "abstained_answerable": abst_a / n,
        # marks the server's citation check moved (app/generation/citations.py)
        "moved": float(sum(o.get("citations_moved", 0) for o in a_out + u_out)),
    }


def gate_table(
    answerable: list[dict[str, Any]],
    a_out: list[dict[str, Any]],
    u_out: list[dict[str, Any]],
    thresholds: Sequence[float],
) -> list[str]:
    """What a retrieval-score gate at t would do to these (ungated) answers."""
    best_a = [max(p["score"] for p in o["passages"]) for o in a_out]
    best_u = [max(p["score"] for p in o["passages"]) for o in u_out]
    lines = ["  gate t | abstain on unanswerable | abstain on answerable | hit kept"]
    for t in thresholds:
        kept = sum(
            normalize(q["answer"]) in normalize(o["answer"])
            for q, o, s in zip(answerable, a_out, best_a, strict=True)
            if s >= t
        )
        lines.append(
            f"  {t:6.2f} | {sum(s < t for s in best_u) / len(best_u):23.2f} | "
            f"{sum(s < t for s in best_a) / len(best_a):21.2f} | {kept / len(best_a):8.3f}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", nargs="+", default=["base"])
    parser.add_argument("--modes", nargs="+", default=["concat"])
    parser.add_argument(
        "--retrievals", nargs="+", default=[None], choices=["dense", "sparse", "hybrid", None]
    )
    parser.add_argument(
        "--retrieval-only", action="store_true", help="recall@k per retrieval mode, no answers"
    )
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--limit", type=int, default=0, help="questions per set (0: all)")
    parser.add_argument(
        "--split",
        choices=["heldout", "train"],
        default="heldout",
        help="the question sets: held out (the figures) or the adapters' training questions",
    )
    parser.add_argument("--abstain", choices=["true", "false"], default=None)
    parser.add_argument(
        "--check-citations",
        choices=["true", "false"],
        default=None,
        help="LORAG_CHECK_CITATIONS for the server (default: the server's default, on)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write every answer here")
    parser.add_argument("--gate", nargs="*", type=float, default=[0.25, 0.3, 0.35, 0.4, 0.45, 0.5])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("LORAG_LAZY_LOAD_ADAPTERS", "true")
    # a busy machine must not turn slow answers into 504s: quality is measured, not latency
    os.environ.setdefault("LORAG_REQUEST_TIMEOUT_S", "3600")
    if args.abstain is not None:
        os.environ["LORAG_ABSTAIN"] = args.abstain
    if args.check_citations is not None:
        os.environ["LORAG_CHECK_CITATIONS"] = args.check_citations

    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    if args.retrieval_only:
        from bench.retrieval_recall import run

        run(Settings())
        return
    answerable = read(f"answerable_{args.split}.jsonl")
    unanswerable = read(f"unanswerable_{args.split}.jsonl")
    if args.limit:
        answerable, unanswerable = answerable[: args.limit], unanswerable[: args.limit]
    dump: dict[str, Any] = {}
    with TestClient(create_app(Settings())) as client:
        while client.get("/ready").status_code != 200:
            time.sleep(0.5)
        for adapter, mode, retrieval in (
            (a, m, r) for a in args.adapters for m in args.modes for r in args.retrievals
        ):
            bodies = [
                {
                    "question": q["question"],
                    "top_k": args.top_k,
                    "max_new_tokens": args.max_new_tokens,
                    "mode": mode,
                    **({} if adapter == "base" else {"adapter": adapter}),
                    **({} if retrieval is None else {"retrieval": retrieval}),
                }
                for q in answerable + unanswerable
            ]
            t = time.perf_counter()
            out = ask_all(client, bodies, args.concurrency)
            took = time.perf_counter() - t
            a_out, u_out = out[: len(answerable)], out[len(answerable) :]
            s = score(answerable, unanswerable, a_out, u_out)
            print(
                f"{adapter:9s} {mode:8s} {retrieval or 'default':8s} "
                f"n={len(answerable)}+{len(unanswerable)} "
                + " ".join(f"{k}={v:.3f}" for k, v in s.items())
                + f" ({took:.0f} s)",
                flush=True,
            )
            for shape in sorted({q.get("shape", "forward") for q in answerable}):
                rows = [i for i, q in enumerate(answerable) if q.get("shape", "forward") == shape]
                part = score([answerable[i] for i in rows], [], [a_out[i] for i in rows], [])
                print(
                    f"    {shape} questions (n={len(rows)}): "
                    + " ".join(
                        f"{k}={part[k]:.3f}" for k in ("em", "f1", "hit", "cite", "cite_right")
                    ),
                    flush=True,
                )
            cosines = retrieval in (None, "dense")  # the gate's scale (not BM25's or RRF's)
            if args.gate and cosines and not any(o.get("abstained") for o in out):
                print("\n".join(gate_table(answerable, a_out, u_out, args.gate)), flush=True)
            shown = ask_all(client, [{**bodies[0], "question": q} for q in README_QUESTIONS], 4)
            for q, o in zip(README_QUESTIONS, shown, strict=True):
                flag = " (abstained)" if o.get("abstained") else ""
                print(f"    {q!r} -> {o['answer']!r}{flag}", flush=True)
            dump[f"{adapter}/{mode}" + (f"/{retrieval}" if retrieval else "")] = {
                "scores": s,
                "answerable": a_out,
                "unanswerable": u_out,
                "readme": shown,
            }
            if args.json:  # after every adapter, so a failure later keeps what was measured
                args.json.write_text(json.dumps(dump, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
