"""Derive two small training sets for the demo adapters from the demo corpus, deterministically.

Every question comes from a definitional sentence of an article, "X is/was a Y ...":

    "Alabama is a state located in the southeastern region ..."
        -> question "What is Alabama?"
    concise: answer "a state"                      (a few words, the noun phrase)
    cited:   answer "Alabama is a state [2]."      (a short sentence naming its passage)

Each record carries its passages explicitly (so training needs no index): the passage holding the
sentence and one distractor passage from another article, in a seeded order, so "[n]" is the
position of the passage the answer came from. Passages are the corpus chunked with the project's
own chunker, at 60 words rather than the index's 100 to keep CPU training short.

    python scripts/make_demo_tasks.py --out-dir /tmp/lorag-demo-tasks
    # writes concise.jsonl and cited.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from app.contracts import Passage
from app.retrieval.chunking import chunk_document
from app.retrieval.sources import read_sources

log = logging.getLogger("make_demo_tasks")

DEFINITION = re.compile(
    r"(?:^|(?<=[.!?] ))(?P<subj>[A-Z][\w'\-]*(?: [\w'\-]+){0,3}) (?P<verb>is|was|are|were) "
    r"(?P<obj>(?:a|an|the) [^,;:.()\[\]\"]+)"
)
PRONOUNS = {"he": "Who", "she": "Who"}  # "He was a ..." in an article about a person
VAGUE = {"it", "this", "these", "that", "there", "they", "its", "most", "first", "among",
         "simply", "all", "argues", "another", "one", "both", "such", "which", "his", "her",
         "if", "when", "while", "although", "because", "after", "before", "since", "in", "on",
         "at", "for", "as", "however", "then", "thus", "today"}  # fmt: skip
CUT = {"that", "which", "who", "whose", "where", "when", "and", "in", "by", "for", "after",
       "to", "with", "from", "on", "at", "as", "based", "since", "during", "than",
       "because"}  # fmt: skip
DANGLING = {"of", "or", "a", "an", "the", "and", "its", "their", "his", "her"}
MAX_ANSWER_WORDS = 5


@dataclass(frozen=True)
class Fact:
    title: str
    subject: str  # as it should read in the question
    verb: str
    answer: str  # the short noun phrase
    wh: str  # "What" or "Who"
    passage: Passage


def short_phrase(
    obj: str, *, cut: frozenset[str] | set[str] = CUT, most: int = MAX_ANSWER_WORDS, least: int = 2
) -> str | None:
    """The noun phrase's head: cut at the first word in `cut` (relative or prepositional) or
    a dash (an aside), at most `most` words, without a dangling last word; None under `least`."""
    words = obj.split()
    kept = words[:1]
    for w in words[1:]:
        if w.lower() in cut or len(kept) == most or "—" in w:
            break
        kept.append(w)
    while kept and kept[-1].lower() in DANGLING:
        kept.pop()
    if any(len(w) == 1 and w.isupper() and w != "A" for w in kept[1:]):
        return None  # a sentence split inside an abbreviation ("a U" of "a U.S. state")
    return " ".join(kept) if len(kept) >= least else None


def facts_of(passage: Passage) -> Iterator[Fact]:
    for m in DEFINITION.finditer(passage.text):
        subj, verb = m["subj"], m["verb"]
        words = subj.lower().split()
        answer = short_phrase(m["obj"])
        if answer is None:
            continue
        if len(words) == 1 and words[0] in PRONOUNS:
            yield Fact(passage.title, passage.title, verb, answer, PRONOUNS[words[0]], passage)
        elif not VAGUE.intersection(words) and words[0] not in PRONOUNS:
            yield Fact(passage.title, subj, verb, answer, "What", passage)


def _lower_the(subject: str) -> str:
    return "t" + subject[1:] if subject.startswith("The ") else subject


def question(f: Fact) -> str:
    subject = _lower_the(f.subject)
    if f.title.lower() in f.subject.lower():
        return f"{f.wh} {f.verb} {subject}?"
    return f"In the article on {f.title}, {f.wh.lower()} {f.verb} {subject}?"


def collect(source: Path, words: int) -> tuple[list[Fact], list[Passage]]:
    """Facts round-robin over articles (so the first N span many topics), and all passages."""
    per_doc: list[list[Fact]] = []
    passages: list[Passage] = []
    for doc in read_sources([source]):
        chunks = chunk_document(doc.id, doc.title, doc.text, words=words)
        passages += chunks
        seen: set[str] = set()
        facts = []
        for p in chunks:
            for f in facts_of(p):
                if question(f) not in seen:  # one answer per question
                    seen.add(question(f))
                    facts.append(f)
        per_doc.append(facts)
    ordered = [fs[i] for i in range(max(map(len, per_doc))) for fs in per_doc if i < len(fs)]
    return ordered, passages


def records(facts: list[Fact], passages: list[Passage], seed: int) -> Iterator[tuple[dict, dict]]:
    rng = random.Random(seed)
    for f in facts:
        others = [p for p in passages if p.doc_id != f.passage.doc_id]
        distractor = rng.choice(others)
        gold = rng.randrange(2)
        shown = [distractor, distractor]
        shown[gold] = f.passage
        ps = [{"title": p.title, "text": p.text} for p in shown]
        q = question(f)
        sentence = f"{f.subject} {f.verb} {f.answer} [{gold + 1}]."
        yield (
            {"question": q, "answer": f.answer, "passages": ps},
            {"question": q, "answer": sentence, "passages": ps},
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("index/sources/demo.jsonl"))
    parser.add_argument("--out-dir", type=Path, default=Path("/tmp/lorag-demo-tasks"))
    parser.add_argument("--max-examples", type=int, default=160)
    parser.add_argument("--words", type=int, default=60, help="words per passage")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    facts, passages = collect(args.source, args.words)
    facts = facts[: args.max_examples]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    concise, cited = args.out_dir / "concise.jsonl", args.out_dir / "cited.jsonl"
    with concise.open("w", encoding="utf-8") as fc, cited.open("w", encoding="utf-8") as ft:
        for a, b in records(facts, passages, args.seed):
            fc.write(json.dumps(a, ensure_ascii=False) + "\n")
            ft.write(json.dumps(b, ensure_ascii=False) + "\n")
    log.info("wrote %d examples each to %s and %s", len(facts), concise, cited)


if __name__ == "__main__":
    main()
